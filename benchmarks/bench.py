"""``python benchmarks/bench.py``: training throughput per regime, against its own lower bound.

One process, one run, one table. For each regime (``frozen``, ``partial``, ``full``) at the given
image size, batch size and precision it measures:

- training images/s of ``trainer.fit`` (the normal path: :class:`~tlfinetune.data.ImageDataModule`
  with ``augment=False``, :class:`~tlfinetune.module.TransferClassifier`,
  :class:`~tlfinetune.freeze.FreezeSchedule`), first epoch and later epochs separately. An epoch
  is timed from the end of the previous one (from ``on_fit_start`` for the first), so work that
  Lightning does between epochs (building loaders, filling a feature cache) counts;
- the ratio of those to the **no_grad forward bound**: the same backbone, channels-last, under
  the same autocast, run under ``torch.no_grad`` on one fixed batch of the same size, measured
  in the same process. A training step does at least that much work, unless a cache skips it;
- whether the feature cache (``tlfinetune.cache.FeatureCache``) served the epochs, and the same
  regime with the cache switched off (``TransferClassifier(feature_cache=False)``);
- peak memory during training: resident memory of this process (sampled every 10 ms), and on
  CUDA ``torch.cuda.max_memory_allocated``;
- data decode + transform images/s on their own (no model): in the main process and through the
  training DataLoader with its workers;
- as peers in the same run: a plain hand-written PyTorch loop doing the same job
  (:func:`torch_peer`; what it does is spelled out there) and, when TensorFlow is installed, the
  seed's Keras code (:func:`keras_peer`).

Times are wall-clock (``time.perf_counter``); nothing here asserts a time.

The harness measures the package from outside it (as timm keeps ``benchmark.py`` beside
``timm/``): this script runs the benchmark and holds its command line, and the pieces live beside
it in ``benchmarks/``:

- ``bench_measure.py``: :class:`Result` (one row of the table) and the measurements
  (:class:`EpochTimer`, :class:`PeakMemory`, :func:`forward_bound`, :func:`measure_decode`);
- ``bench_setting.py``: the setting every setup of a run shares;
- ``bench_peers.py``: :func:`torch_peer` and :func:`keras_peer`;
- ``bench_report.py``: the markdown report (:func:`markdown`);
- ``bench_job.py`` (``--job seed``): the seed's own job at 224 px, ``python -m tlfinetune fit``
  against the seed's Keras code (``seed_keras.py``), each a process timed phase by phase.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shlex
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import torch
from arithmetic import step_arithmetic
from bench_measure import (
    EpochTimer,
    PeakMemory,
    Result,
    _release_memory,
    forward_bound,
    measure_decode,
)
from bench_peers import keras_peer, torch_peer
from bench_report import _machine, markdown, publish
from bench_setting import _Setting
from jsonargparse import CLI
from PIL import Image

from tlfinetune import backbone as bb
from tlfinetune.demo import DEMO_CLASSES, render_demo_image
from tlfinetune.errors import ConfigError, TLFinetuneError
from tlfinetune.freeze import FreezeSchedule
from tlfinetune.machine import compute_threads, default_num_workers, keep_freed_memory
from tlfinetune.module import TransferClassifier

__all__ = ["EpochTimer", "Result", "bench", "main", "markdown", "torch_peer"]

log = logging.getLogger(__name__)

Precision = Literal["32-true", "bf16-mixed", "16-mixed"]
REGIMES = ("frozen", "partial", "full")
PEERS = ("torch", "keras")
# Lightning's chatter ("GPU available", "Trainer.fit stopped") and the model's per-fit warning
# about random weights (the benchmark uses them on purpose: speed does not depend on them).
_QUIET = {"lightning.pytorch": logging.WARNING, "lightning.fabric": logging.WARNING}
_QUIET_MORE = {"tlfinetune": logging.WARNING, "tlfinetune.module": logging.ERROR}


# --- data ----------------------------------------------------------------------------------------


def write_images(
    folder: Path,
    images: int,
    image_size: int,
    fmt: str = "jpeg",
    seed: int = 0,
    val_images: int | None = None,
    classes: int | None = None,
) -> Path:
    """Write ``images`` demo-style images into ``folder/train/<class>/``.

    ``folder/val/<class>/`` gets ``val_images`` images (default one per class: the regime
    benchmark does not validate). ``classes`` shape classes (default up to 6, two images each at
    least). Real files, so training goes through the same decode path as a user's folder.
    """
    n_classes = classes or max(2, min(len(DEMO_CLASSES), images // 2))
    classes_used = DEMO_CLASSES[:n_classes]
    suffix = {"jpeg": "jpg", "png": "png"}[fmt]
    val_count = len(classes_used) if val_images is None else val_images
    for split, count in (("train", images), ("val", val_count)):
        for c, name in enumerate(classes_used):
            sub = folder / split / name
            sub.mkdir(parents=True, exist_ok=True)
            n = count // len(classes_used) + (c < count % len(classes_used))
            for i in range(n):
                rng = np.random.default_rng([seed, int(split == "val"), c, i])
                pixels = render_demo_image(name, rng, image_size)
                options = {"quality": 90} if fmt == "jpeg" else {"compress_level": 1}
                Image.fromarray(pixels, "RGB").save(sub / f"{i:05d}.{suffix}", **options)
    return folder


# --- the tlfinetune setup ------------------------------------------------------------------------


def run_tlfinetune(
    s: _Setting, regime: str, *, cache_off: bool = False, label: str = "tlfinetune"
) -> Result:
    """``trainer.fit`` on the normal path, timed per epoch."""
    torch.manual_seed(s.seed)
    dm = s.datamodule()
    model = TransferClassifier(backbone=s.backbone, weights=s.weights, feature_cache=not cache_off)
    timer = EpochTimer(s.device)
    row = Result(label, regime)
    t0 = time.perf_counter()
    trainer = pl.Trainer(
        accelerator="cuda" if s.device.type == "cuda" else "cpu",
        devices=1,
        precision=s.precision,
        max_epochs=s.epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=s.work_dir,
        callbacks=[FreezeSchedule(regime=regime, unfreeze_from=s.unfreeze_from), timer],
    )
    with PeakMemory(s.device) as mem:
        trainer.fit(model, dm)
    row.total_s = time.perf_counter() - t0
    mem.fill(row)
    row.epochs, row.cache, row.cpu = timer.epochs, timer.cache, timer.cpu
    if row.cache_state == "yes":  # requires_grad as the later epochs ran
        arithmetic = step_arithmetic(model.backbone, model.head, s.image_size)
        row.floor = arithmetic.cached_share
    if cache_off and row.cache_state == "yes":
        row.note = "the cache could not be switched off"
    return row


# --- the command ---------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    quiet = {**_QUIET, **_QUIET_MORE}
    loggers = [logging.getLogger(name) for name in quiet]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(quiet[lg.name])
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _split(value: str | Sequence[str], allowed: Sequence[str], what: str) -> list[str]:
    items = value.split(",") if isinstance(value, str) else list(value)
    items = [x.strip() for x in items if x.strip() and x.strip() != "none"]
    bad = [x for x in items if x not in allowed]
    if bad:
        raise ConfigError(f"--{what} {','.join(bad)}: choose from {','.join(allowed)}.")
    return items


def _progress(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def bench(
    image_size: int = 64,
    batch_size: int = 32,
    precision: Precision = "32-true",
    images: int = 256,
    epochs: int = 3,
    regimes: str = "frozen,partial,full",
    backbone: str = "vgg16",
    weights: str = "none",
    unfreeze_from: str | None = None,
    device: Literal["auto", "cpu", "cuda"] = "auto",
    output: str | None = "bench.md",
    peers: str = "torch",
    num_workers: int | None = None,
    uncached: str = "frozen,partial",
    data: str | None = None,
    image_format: Literal["jpeg", "png"] = "jpeg",
    bound_seconds: float = 3.0,
    seed: int = 0,
) -> dict[str, Any]:
    """Measure training throughput of each regime against the no_grad forward bound.

    Everything runs in this one process: the bound, data decode alone, ``trainer.fit`` per
    regime (with and without the feature cache) and the peers. The markdown report is printed
    and written to ``output``.

    Args:
        image_size: side of the square training images, in pixels.
        batch_size: images per batch (the bound uses the same).
        precision: Lightning precision; the bound and the peers use the same autocast.
        images: number of synthetic training images to write (ignored with ``data``).
        epochs: epochs per fit; the first is reported apart from the later ones.
        regimes: comma-separated regimes to run: frozen, partial, full.
        backbone: any backbone tlfinetune takes (``python -m tlfinetune backbones``). The
            ``torch`` peer puts the seed's Flatten head on it; tlfinetune uses the backbone's
            default head (``gap`` outside VGG).
        weights: backbone weights (``none``, ``imagenet`` or a file); speed does not depend on
            them, and ``none`` needs no download.
        unfreeze_from: where the ``partial`` regime starts training (a stage, unit, Keras layer
            name or index); default the backbone's last stage (VGG ``block5``, ResNet ``layer4``).
        device: ``auto`` takes CUDA when available.
        output: markdown file to write (none: print only).
        peers: comma-separated peers run in the same process: ``torch`` (a plain hand-written
            loop), ``keras`` (the seed's code, when TensorFlow is installed); ``none`` for none.
        num_workers: DataLoader workers, the same for every setup; default what the data
            module picks for this device (:func:`tlfinetune.machine.default_num_workers`).
        uncached: regimes also run with the feature cache switched off.
        data: an ImageFolder-layout folder (or ``demo``) to train on instead of synthetic
            images.
        image_format: ``jpeg`` or ``png`` for the synthetic images.
        bound_seconds: how long to time the no_grad forward bound.
        seed: seed of the data, the models and the training order.

    Returns:
        ``config``, ``command``, ``machine``, ``bound`` (img/s), ``decode`` (img/s), ``rows``
        (one dict per setup and regime), ``notes`` and the ``markdown`` report.
    """
    regime_list = _split(regimes, REGIMES, "regimes")
    peer_list = _split(peers, PEERS, "peers")
    uncached_list = _split(uncached, REGIMES, "uncached")
    if not regime_list:
        raise ConfigError("--regimes is empty: give one or more of frozen, partial, full.")
    for name, value, low in (("image_size", image_size, 32), ("batch_size", batch_size, 1)):
        if value < low:
            raise ConfigError(f"--{name} must be at least {low}, got {value}.")
    if epochs < 1 or images < 2:
        raise ConfigError(f"--epochs must be >= 1 and --images >= 2 (got {epochs}, {images}).")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available.")
    dev = torch.device("cuda" if device != "cpu" and torch.cuda.is_available() else "cpu")
    notes: list[str] = []
    # Lightning runs 16-mixed as bf16-mixed on the CPU (fp16 autocast is not supported there);
    # the bound and the peers must use what the Trainer really runs.
    run_precision = "bf16-mixed" if precision == "16-mixed" and dev.type == "cpu" else precision
    if run_precision != precision:
        notes.append(f"{precision} on the CPU runs as {run_precision}, as Lightning does.")
    command = "python benchmarks/bench.py " + shlex.join(
        f"--{k}={v}"
        for k, v in (
            ("image_size", image_size),
            ("batch_size", batch_size),
            ("precision", precision),
            ("images", images),
            ("epochs", epochs),
            ("regimes", ",".join(regime_list)),
            ("backbone", backbone),
            ("weights", weights),
            ("unfreeze_from", unfreeze_from),
            ("device", device),
            ("peers", ",".join(peer_list) or "none"),
            ("num_workers", "null" if num_workers is None else num_workers),
            ("uncached", ",".join(uncached_list) or "none"),
            ("data", data),
            ("image_format", image_format),
            ("output", output),
        )
        if v is not None
    )
    rows: list[Result] = []
    with contextlib.ExitStack() as stack:
        stack.enter_context(_quiet())
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tlfinetune-bench-")))
        if data is None:
            t0 = time.perf_counter()
            root = write_images(work / "data", images, image_size, image_format, seed)
            _progress(f"wrote {images} {image_format} images in {time.perf_counter() - t0:.1f} s")
            described = f"synthetic {image_format.upper()} demo-style images of {image_size} px"
        else:
            root = data if data == "demo" else Path(data)
            described = "the embedded demo dataset" if data == "demo" else f"folder {data}"
        if num_workers is None:  # resolved once, so that every setup gets the same loader
            num_workers = default_num_workers(compute_threads=compute_threads(dev.type))
        s = _Setting(
            root=root,
            image_size=image_size,
            batch_size=batch_size,
            precision=run_precision,
            epochs=epochs,
            backbone=backbone,
            weights=weights,
            unfreeze_from=unfreeze_from,
            device=dev,
            num_workers=num_workers,
            seed=seed,
            work_dir=work / "runs",
        )
        dm = s.datamodule()
        decode = measure_decode(dm)
        train_images = len(dm.train_dataset)  # type: ignore[arg-type]
        num_classes = dm.num_classes
        _progress(
            f"decode: {decode['in_process']:.0f} img/s in process, "
            f"{decode['loader']:.0f} img/s via the loader"
        )

        torch.manual_seed(seed)
        weights_state = TransferClassifier(
            num_classes=num_classes, image_size=image_size, backbone=backbone, weights=weights
        ).backbone.state_dict()
        bounds: dict[str, list[float]] = {"channels_last": [], "nchw": []}

        def measure_bound(layouts: Sequence[str] = ("channels_last",)) -> None:
            # Measured again after every row: each row is divided by the bound just before and
            # after it (a shared machine's speed drifts by 10-20 % within a run), and the spread
            # of all of them shows how much it moved. NCHW (the plain loop's layout) only once.
            for layout in layouts:
                features = bb.build_backbone(backbone)
                features.load_state_dict(weights_state)
                bounds[layout].append(
                    forward_bound(
                        features,
                        batch_size,
                        image_size,
                        run_precision,
                        dev,
                        layout == "channels_last",
                        bound_seconds,
                    )
                )
            _progress(f"no_grad forward bound: {bounds['channels_last'][-1]:.1f} img/s")

        measure_bound(("channels_last", "nchw"))

        if uncached_list:
            notes.append("'tlfinetune, cache off' rows: TransferClassifier(feature_cache=False).")
        keras_ok = False
        if "keras" in peer_list:
            try:
                import tensorflow  # type: ignore[import-not-found]  # noqa: F401

                keras_ok = True
            except ImportError:
                notes.append("Keras peer skipped: TensorFlow is not installed.")

        def add(setup: str, regime: str, run: Callable[[], Result]) -> None:
            # A setup that fails becomes a row saying why; the others are still measured.
            _release_memory()
            before = bounds["channels_last"][-1]
            try:
                row = run()
            except Exception as exc:  # noqa: BLE001 - report it in the table, go on
                traceback.print_exc()
                first = (str(exc).strip().splitlines() or [""])[0]
                row = Result(setup, regime, note=f"failed: {type(exc).__name__}: {first}"[:240])
            with contextlib.suppress(OSError, AttributeError):
                row.load = os.getloadavg()[0]
            _release_memory()
            measure_bound()
            row.bound = (before + bounds["channels_last"][-1]) / 2
            rows.append(row)
            _progress(_line(row))

        def peer(regime: str) -> Result:
            loader = s.datamodule().train_dataloader()
            features = bb.build_backbone(backbone)
            features.load_state_dict(weights_state)
            return torch_peer(s, regime, loader, num_classes, features)

        for regime in regime_list:
            add("tlfinetune", regime, functools.partial(run_tlfinetune, s, regime))
            if regime in uncached_list:
                label = "tlfinetune, cache off"
                run = functools.partial(run_tlfinetune, s, regime, cache_off=True, label=label)
                add(label, regime, run)
            if "torch" in peer_list:
                add("plain PyTorch", regime, functools.partial(peer, regime))
            if keras_ok:
                add(
                    "Keras (TensorFlow)",
                    regime,
                    functools.partial(keras_peer, s, regime, num_classes),
                )

    bound = {
        "channels_last": max(bounds["channels_last"]),
        "nchw": max(bounds["nchw"]),
        "channels_last_all": bounds["channels_last"],
        "nchw_all": bounds["nchw"],
    }
    notes += [
        "Epoch times are wall-clock from the end of the previous epoch (from on_fit_start for the "
        "first), so loader start-up and filling a feature cache (during the first epoch's own "
        "steps) count in the first epoch. Validation is off (limit_val_batches=0).",
        "first ÷ bound, later ÷ bound: training img/s over the no_grad forward img/s of the "
        "channels-last backbone measured just before and just after that row (their mean is the "
        "bound column). Below 1 the step costs more than a forward pass; above 1 a cache skips "
        "the backbone.",
        "arithmetic floor: the multiply-accumulates of a step served from the feature cache over "
        "those of an uncached step (convolutions and linear layers: forward of the frozen "
        "prefix; forward, weight and input gradients of what trains; benchmarks/arithmetic.py). "
        "No implementation of the same step brings later ÷ first epoch time below it unless its "
        "later kernels run faster per operation than the first epoch's.",
        "Peak RSS: resident memory of the main process during training (DataLoader workers not "
        "included), with the RSS at the start of training in brackets.",
        "load: the 1-minute load average when the row finished; above the number of cores, "
        "other processes competed for the CPU and the row's times are pessimistic.",
        "plain PyTorch: torchvision VGG features + the seed's Flatten-Dense(256)-Dense head, "
        "requires_grad=False on the frozen layers, Adam, NCHW, autocast for mixed precision, the "
        "same DataLoader (benchmarks/bench_peers.py: torch_peer documents it line by line).",
    ]
    results: dict[str, Any] = {
        "config": {
            "image_size": image_size,
            "batch_size": batch_size,
            "precision": run_precision,
            "epochs": epochs,
            "regimes": regime_list,
            "backbone": backbone,
            "weights": weights,
            "device": str(dev),
            "num_workers": num_workers,
            "train_images": train_images,
            "data": described,
        },
        "command": command,
        "machine": _machine(dev),
        "bound": bound,
        "decode": decode,
        "rows": [r.as_dict() for r in rows],
        "notes": notes,
        "_rows": rows,
    }
    report = markdown(results)
    del results["_rows"]
    results["markdown"] = report
    publish(report, output)
    if output:
        _progress(f"wrote {output}")
    return results


def _line(row: Result) -> str:
    return (
        f"{row.setup:<22} {row.regime:<8} first {row.first_ips:8.1f} img/s, later "
        f"{row.later_ips:8.1f} img/s, cache {row.cache_state}, {row.total_s:.1f} s"
    )


def _job(args: list[str]) -> tuple[str, list[str]]:
    """``--job NAME`` (or ``--job=NAME``) taken out of ``args``; ``regimes`` without one."""
    for i, arg in enumerate(args):
        if arg.startswith("--job="):
            return arg.split("=", 1)[1], args[:i] + args[i + 1 :]
        if arg == "--job" and i + 1 < len(args):
            return args[i + 1], args[:i] + args[i + 2 :]
    return "regimes", args


def main(argv: Sequence[str] | None = None) -> None:
    """``python benchmarks/bench.py [--image_size 64] [--batch_size 32] ...``: see :func:`bench`.

    The flags are :func:`bench`'s typed signature, read by jsonargparse as the package's own
    command line is; a bad value is one paragraph on stderr and exit status 2.
    ``--job seed`` runs the seed's own job instead, tlfinetune's CLI against the seed's Keras
    code (:func:`bench_job.seed_job`; ``--job seed --help`` lists its flags).
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if argv is None:  # the benchmark's own process: the allocator as tlfinetune's command has it
        keep_freed_memory()
    job, args = _job(args)
    try:
        if job == "seed":
            from bench_job import seed_job

            CLI(seed_job, args=args, as_positional=False)
        elif job == "regimes":
            CLI(bench, args=args, as_positional=False)
        else:
            raise ConfigError(f"--job {job}: choose regimes (the default) or seed.")
    except TLFinetuneError as exc:
        sys.stderr.write(f"error: {exc}\n")
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
