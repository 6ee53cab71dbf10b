"""``python -m tlfinetune bench``: training throughput per regime, against its own lower bound.

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
- whether the feature cache (``tlfinetune.cache.FeatureCache``) served the epochs, when the
  package has one, and the same regime with the cache switched off, when that can be done;
- peak memory during training: resident memory of this process (sampled every 10 ms), and on
  CUDA ``torch.cuda.max_memory_allocated``;
- data decode + transform images/s on their own (no model): in the main process and through the
  training DataLoader with its workers;
- as peers in the same run: a plain hand-written PyTorch loop doing the same job
  (:func:`torch_peer`; what it does is spelled out there) and, when TensorFlow is installed, the
  seed's Keras code (:func:`keras_peer`).

Times are wall-clock (``time.perf_counter``); nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import functools
import gc
import inspect
import logging
import math
import os
import platform
import shlex
import sys
import tempfile
import threading
import time
import traceback
import typing
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from tlfinetune import backbone as bb
from tlfinetune.data import ImageDataModule
from tlfinetune.demo import DEMO_CLASSES, render_demo_image
from tlfinetune.errors import ConfigError
from tlfinetune.freeze import FreezeSchedule
from tlfinetune.module import TransferClassifier
from tlfinetune.transforms import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["EpochTimer", "Result", "bench", "main", "markdown", "torch_peer"]

log = logging.getLogger(__name__)

Precision = Literal["32-true", "bf16-mixed", "16-mixed"]
REGIMES = ("frozen", "partial", "full")
PEERS = ("torch", "keras")
# Lightning's chatter ("GPU available", "Trainer.fit stopped") and the model's per-fit warning
# about random weights (the benchmark uses them on purpose: speed does not depend on them).
_QUIET = {"lightning.pytorch": logging.WARNING, "lightning.fabric": logging.WARNING}
_QUIET_MORE = {"tlfinetune": logging.WARNING, "tlfinetune.module": logging.ERROR}


# --- measurements --------------------------------------------------------------------------------


@dataclass
class Result:
    """One row of the table: one setup (tlfinetune or a peer) in one regime."""

    setup: str
    regime: str
    epochs: list[tuple[int, float]] = field(default_factory=list)  # (images, seconds) per epoch
    cpu: list[float] = field(default_factory=list)  # CPU seconds of this process per epoch
    cache: list[bool | None] = field(default_factory=list)  # cache active at each epoch's end
    peak_rss_mb: float = float("nan")
    rss_start_mb: float = float("nan")
    peak_cuda_mb: float | None = None
    total_s: float = float("nan")
    load: float = float("nan")  # 1-minute load average when the row ended
    note: str = ""

    @property
    def first_ips(self) -> float:
        """Images/s of the first epoch."""
        n, s = self.epochs[0] if self.epochs else (0, 0.0)
        return n / s if s > 0 else float("nan")

    @property
    def later_ips(self) -> float:
        """Images/s of the epochs after the first, together."""
        n = sum(e[0] for e in self.epochs[1:])
        s = sum(e[1] for e in self.epochs[1:])
        return n / s if s > 0 else float("nan")

    @property
    def cache_state(self) -> str:
        """``yes`` if the cache served any epoch, ``no`` if it existed and never did, else n/a."""
        known = [c for c in self.cache if c is not None]
        if not known:
            return "n/a"
        return "yes" if any(known) else "no"

    def as_dict(self) -> dict[str, Any]:
        """The row as plain data (for JSON and tests)."""
        cpu = self.cpu + [float("nan")] * (len(self.epochs) - len(self.cpu))
        return {
            "setup": self.setup,
            "regime": self.regime,
            "epochs": [
                {"images": n, "seconds": s, "cpu_seconds": c}
                for (n, s), c in zip(self.epochs, cpu, strict=True)
            ],
            "first_ips": self.first_ips,
            "later_ips": self.later_ips,
            "cache": self.cache_state,
            "peak_rss_mb": self.peak_rss_mb,
            "rss_start_mb": self.rss_start_mb,
            "peak_cuda_mb": self.peak_cuda_mb,
            "total_s": self.total_s,
            "load": self.load,
            "note": self.note,
        }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cache_state(trainer: Any) -> bool | None:
    """Whether a ``FeatureCache`` callback serves the current epoch; None without one."""
    for cb in getattr(trainer, "callbacks", None) or []:
        if type(cb).__name__ == "FeatureCache":
            active = getattr(cb, "active", None)
            return None if active is None else bool(active)
    return None


def _batch_len(batch: Any) -> int:
    first = batch[0] if isinstance(batch, (tuple, list)) else batch
    return int(first.shape[0]) if hasattr(first, "shape") else len(first)


class EpochTimer(pl.Callback):
    """Wall time and images of every training epoch, from the end of the previous epoch.

    The first epoch starts at ``on_fit_start``: Lightning builds (or reloads) the train loader
    before ``on_train_epoch_start``, and that work (worker start-up, a feature cache's one pass
    over the data) belongs to the epoch it feeds.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.epochs: list[tuple[int, float]] = []
        self.cache: list[bool | None] = []
        self.cpu: list[float] = []
        self._t = self._c = 0.0
        self._n = 0

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:  # noqa: D102
        _sync(self.device)
        self._t, self._c, self._n = time.perf_counter(), time.process_time(), 0

    def on_train_batch_end(  # noqa: D102
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, i: int
    ) -> None:
        self._n += _batch_len(batch)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:  # noqa: D102
        _sync(self.device)
        now, cpu = time.perf_counter(), time.process_time()
        self.epochs.append((self._n, now - self._t))
        self.cpu.append(cpu - self._c)
        self.cache.append(_cache_state(trainer))
        self._t, self._c, self._n = now, cpu, 0


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):  # not Linux: the process high-water mark
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak) * (1 if sys.platform == "darwin" else 1024)


def _release_memory() -> None:
    """Free what the last setup left, so the next one's peak is its own."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class PeakMemory:
    """Peak resident memory of this process (sampled every 10 ms) and peak CUDA allocation."""

    def __init__(self, device: torch.device, interval: float = 0.01) -> None:
        self.device, self.interval = device, interval
        self.start = self.peak = 0
        self.cuda_peak: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, _rss_bytes())

    def __enter__(self) -> PeakMemory:
        self.start = self.peak = _rss_bytes()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, _rss_bytes())
        if self.device.type == "cuda":
            self.cuda_peak = torch.cuda.max_memory_allocated(self.device)

    def fill(self, row: Result) -> None:
        """Copy the measurements into a row, in MB."""
        row.peak_rss_mb = self.peak / 2**20
        row.rss_start_mb = self.start / 2**20
        row.peak_cuda_mb = None if self.cuda_peak is None else self.cuda_peak / 2**20


def _autocast(device: torch.device, precision: str, lightning: bool = False) -> Any:
    """The autocast for ``precision``: Lightning's own (no cast cache) or a user's default."""
    if precision == "32-true":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16-mixed" else torch.float16
    if lightning:
        return torch.autocast(device.type, dtype=dtype, cache_enabled=False)
    return torch.autocast(device.type, dtype=dtype)


def forward_bound(
    features: nn.Module,
    batch_size: int,
    image_size: int,
    precision: str,
    device: torch.device,
    channels_last: bool = True,
    seconds: float = 5.0,
) -> float:
    """Images/s of ``features`` under ``torch.no_grad`` on one fixed random batch.

    Two warm-up batches, two to estimate the time of one, then as many as fill ``seconds``
    (at least three), timed together.
    """
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = features.to(device=device, memory_format=fmt).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, 3, image_size, image_size, generator=g).to(device)
    x = x.contiguous(memory_format=fmt)
    with torch.no_grad(), _autocast(device, precision, lightning=True):
        for _ in range(2):
            model(x)
        _sync(device)
        # Estimate the time of a batch, then run enough batches with one sync at the end: on
        # CUDA a sync per batch would leave the GPU idle while the next batch is queued.
        t0 = time.perf_counter()
        for _ in range(2):
            model(x)
        _sync(device)
        per_batch = (time.perf_counter() - t0) / 2
        n = max(3, math.ceil(seconds / max(per_batch, 1e-6)))
        t0 = time.perf_counter()
        for _ in range(n):
            model(x)
        _sync(device)
        elapsed = time.perf_counter() - t0
    return n * batch_size / elapsed


def measure_decode(dm: ImageDataModule) -> dict[str, float]:
    """Images/s of decode + transform alone: in this process, and through the train loader.

    The loader is iterated twice (its workers persist); ``loader`` is the second pass,
    ``loader_first`` the first, worker start-up included.
    """
    dm.setup("fit")
    dataset = dm.train_dataset
    assert dataset is not None
    t0 = time.perf_counter()
    for i in range(len(dataset)):  # type: ignore[arg-type]
        dataset[i]
    in_process = len(dataset) / (time.perf_counter() - t0)  # type: ignore[arg-type]
    loader = dm.train_dataloader()
    passes = []
    for _ in range(2):
        n, t0 = 0, time.perf_counter()
        for x, _y in loader:
            n += len(x)
        passes.append(n / (time.perf_counter() - t0))
    del loader
    return {"in_process": in_process, "loader_first": passes[0], "loader": passes[1]}


# --- data ----------------------------------------------------------------------------------------


def write_images(
    folder: Path, images: int, image_size: int, fmt: str = "jpeg", seed: int = 0
) -> Path:
    """Write ``images`` demo-style images (6 shape classes) into ``folder/train/<class>/``.

    ``folder/val/<class>/`` gets one image per class (validation is not run by the benchmark).
    Real files, so training goes through the same decode path as a user's folder.
    """
    classes = DEMO_CLASSES[: max(2, min(len(DEMO_CLASSES), images // 2))]
    suffix = {"jpeg": "jpg", "png": "png"}[fmt]
    for split, count in (("train", images), ("val", len(classes))):
        for c, name in enumerate(classes):
            sub = folder / split / name
            sub.mkdir(parents=True, exist_ok=True)
            n = count // len(classes) + (c < count % len(classes))
            for i in range(n):
                rng = np.random.default_rng([seed, int(split == "val"), c, i])
                pixels = render_demo_image(name, rng, image_size)
                options = {"quality": 90} if fmt == "jpeg" else {"compress_level": 1}
                Image.fromarray(pixels, "RGB").save(sub / f"{i:05d}.{suffix}", **options)
    return folder


# --- the tlfinetune setup ------------------------------------------------------------------------


def _cache_switch() -> tuple[str, dict[str, Any], dict[str, Any], list[Any]] | None:
    """How to switch the feature cache off, if this version of the package has one.

    Returns ``(how, model kwargs, data kwargs, extra callbacks)``, or None.
    """
    for cls, target in ((TransferClassifier, "model"), (ImageDataModule, "data")):
        if "feature_cache" in inspect.signature(cls.__init__).parameters:
            kw = {"feature_cache": False}
            return (
                f"{cls.__name__}(feature_cache=False)",
                kw if target == "model" else {},
                kw if target == "data" else {},
                [],
            )
    try:
        from tlfinetune.cache import FeatureCache  # type: ignore[import-not-found]
    except ImportError:
        return None
    if "enabled" in inspect.signature(FeatureCache.__init__).parameters:
        return (
            "FeatureCache(enabled=False) in the Trainer's callbacks",
            {},
            {},
            [FeatureCache(enabled=False)],
        )
    return None


@dataclass
class _Setting:
    """Everything a setup needs, resolved once."""

    root: Path | str  # a folder, or "demo"
    image_size: int
    batch_size: int
    precision: str
    epochs: int
    backbone: str
    weights: str
    unfreeze_from: str
    device: torch.device
    num_workers: int | None
    seed: int
    work_dir: Path

    def datamodule(self, **kwargs: Any) -> ImageDataModule:
        return ImageDataModule(
            root=self.root,
            image_size=self.image_size,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            augment=False,
            seed=self.seed,
            **kwargs,
        )

    def trainable_from(self, regime: str) -> int:
        n = bb.get_spec(self.backbone).num_modules
        return {
            "frozen": n,
            "partial": bb.resolve_unfreeze_from(self.backbone, self.unfreeze_from),
            "full": 0,
        }[regime]


def run_tlfinetune(
    s: _Setting, regime: str, *, cache_off: tuple[Any, ...] | None = None, label: str = "tlfinetune"
) -> Result:
    """``trainer.fit`` on the normal path, timed per epoch."""
    torch.manual_seed(s.seed)
    model_kw, data_kw, extra = (
        (cache_off[1], cache_off[2], cache_off[3]) if cache_off else ({}, {}, [])
    )
    dm = s.datamodule(**data_kw)
    model = TransferClassifier(backbone=s.backbone, weights=s.weights, **model_kw)
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
        callbacks=[FreezeSchedule(regime=regime, unfreeze_from=s.unfreeze_from), *extra, timer],
    )
    with PeakMemory(s.device) as mem:
        trainer.fit(model, dm)
    row.total_s = time.perf_counter() - t0
    mem.fill(row)
    row.epochs, row.cache, row.cpu = timer.epochs, timer.cache, timer.cpu
    if cache_off and row.cache_state == "yes":
        row.note = "the cache could not be switched off"
    return row


# --- peers ---------------------------------------------------------------------------------------


def torch_peer(
    s: _Setting, regime: str, loader: Any, num_classes: int, features: nn.Module
) -> Result:
    """A plain hand-written PyTorch loop doing the same job, as a user would write it.

    What it does, exactly:

    - model: ``torchvision.models.<backbone>().features`` (here a fresh copy with the same
      weights as the tlfinetune model) followed by the seed's head
      ``Flatten -> Linear(C*h*w, 256) -> ReLU -> Linear(256, classes)``; default (NCHW) memory
      layout, ``model.train()``;
    - freezing: ``requires_grad = False`` on ``features[:k]`` (``k`` as the FreezeSchedule's);
      Adam (lr 1e-3) over the parameters that require grad;
    - data: the very DataLoader tlfinetune trains from (same files, transform, batch size,
      workers); each batch ``x.float() / 255`` then ImageNet mean/std, moved to the device;
    - step: forward under ``torch.autocast`` for mixed precision (a ``GradScaler`` for
      ``16-mixed``), ``F.cross_entropy``, ``zero_grad``, ``backward``, ``step``; running loss
      and accuracy with ``.item()`` every step, as a training loop prints them.

    Frozen layers need no ``torch.no_grad`` here: with no parameter or input requiring grad,
    autograd records nothing for them.
    """
    device = s.device
    torch.manual_seed(s.seed)
    row = Result("plain PyTorch", regime)
    t_build = time.perf_counter()
    with torch.no_grad():
        c, h, w = features(torch.zeros(1, 3, s.image_size, s.image_size)).shape[1:]
    head = nn.Sequential(
        nn.Flatten(), nn.Linear(c * h * w, 256), nn.ReLU(), nn.Linear(256, num_classes)
    )
    model = nn.Sequential(features, head).to(device)
    k = s.trainable_from(regime)
    for p in features[:k].parameters():
        p.requires_grad = False
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    scaler = torch.amp.GradScaler(device.type, enabled=s.precision == "16-mixed")
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    build_s = time.perf_counter() - t_build
    model.train()
    with PeakMemory(device) as mem:
        _sync(device)
        t = t0 = time.perf_counter()
        c = time.process_time()
        for _epoch in range(s.epochs):
            seen, correct, running = 0, 0, 0.0
            for x, y in loader:
                x = (x.to(device).float() / 255 - mean) / std
                y = y.to(device)
                with _autocast(device, s.precision):
                    logits = model(x)
                    loss = F.cross_entropy(logits.float(), y)
                optimizer.zero_grad()
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                running += loss.item() * len(y)
                correct += (logits.argmax(1) == y).sum().item()
                seen += len(y)
            _sync(device)
            now = time.perf_counter()
            row.epochs.append((seen, now - t))
            row.cpu.append(time.process_time() - c)
            t, c = now, time.process_time()
        row.total_s = now - t0 + build_s
    mem.fill(row)
    return row


def keras_peer(s: _Setting, regime: str, num_classes: int) -> Result:
    """The seed's Keras code on TensorFlow, when it is installed (not run where it is not).

    ``keras.applications.VGG16(weights=None, include_top=False)``, frozen as the seed does it
    (``base.trainable = False``, or ``layers[:15]`` for ``partial`` with ``block5``), then
    ``Flatten, Dense(256, relu), Dense(classes, softmax)``, ``adam``, sparse categorical
    cross-entropy, ``model.fit`` on ``image_dataset_from_directory`` of the same files (resized,
    not centre-cropped) with ``preprocess_input``. ``bf16-mixed``/``16-mixed`` set the
    ``mixed_bfloat16``/``mixed_float16`` policy.
    """
    import tensorflow as tf  # type: ignore[import-not-found]

    keras = tf.keras
    row = Result("Keras (TensorFlow)", regime)
    apps = {"vgg16": keras.applications.VGG16, "vgg19": keras.applications.VGG19}
    if s.backbone not in apps:
        row.note = f"Keras has no {s.backbone}"
        return row
    policy = {"bf16-mixed": "mixed_bfloat16", "16-mixed": "mixed_float16"}.get(
        s.precision, "float32"
    )
    keras.mixed_precision.set_global_policy(policy)
    try:
        size = (s.image_size, s.image_size)
        ds = keras.utils.image_dataset_from_directory(
            str(s.root / "train"), image_size=size, batch_size=s.batch_size, seed=s.seed
        )
        preprocess = keras.applications.vgg16.preprocess_input
        ds = ds.map(lambda x, y: (preprocess(x), y)).prefetch(tf.data.AUTOTUNE)
        t_build = time.perf_counter()
        base = apps[s.backbone](weights=None, include_top=False, input_shape=(*size, 3))
        k = s.trainable_from(regime)
        keras_k = {layer.index: layer.keras_index for layer in bb.get_spec(s.backbone).layers}.get(
            k
        )
        if regime == "frozen":
            base.trainable = False
        elif regime == "partial":
            if keras_k is None:
                row.note = f"no Keras layer starts at module {k}"
                return row
            for layer in base.layers[:keras_k]:
                layer.trainable = False
        model = keras.Sequential(
            [
                base,
                keras.layers.Flatten(),
                keras.layers.Dense(256, activation="relu"),
                keras.layers.Dense(num_classes, activation="softmax", dtype="float32"),
            ]
        )
        model.compile(
            optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"]
        )
        build_s = time.perf_counter() - t_build
        files = sum(1 for p in (s.root / "train").rglob("*") if p.is_file())
        times: list[float] = []

        class Timer(keras.callbacks.Callback):
            def on_train_begin(self, logs: Any = None) -> None:
                self.t = time.perf_counter()

            def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
                now = time.perf_counter()
                times.append(now - self.t)
                self.t = now

        with PeakMemory(torch.device("cpu")) as mem:
            t0 = time.perf_counter()
            model.fit(ds, epochs=s.epochs, verbose=0, callbacks=[Timer()])
            row.total_s = time.perf_counter() - t0 + build_s
        mem.fill(row)
        row.epochs = [(files, t) for t in times]
    finally:
        keras.mixed_precision.set_global_policy("float32")
    return row


# --- the report ----------------------------------------------------------------------------------


def _fmt(x: float | None, digits: int = 1) -> str:
    if x is None or x != x:  # None or NaN
        return "-"
    return f"{x:,.{digits}f}"


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}×" if a == a and b == b and b > 0 else "-"


def markdown(results: dict[str, Any]) -> str:
    """The report: a header with the setting, the bound and decode lines, and the table."""
    cfg, bound, decode = results["config"], results["bound"], results["decode"]
    cuda = cfg["device"].startswith("cuda")
    rows: list[Result] = results["_rows"]
    cl_all = bound.get("channels_last_all") or [bound["channels_last"]]
    torch_rows = {r.regime: r for r in rows if r.setup == "plain PyTorch"}
    lines = [
        f"## tlfinetune bench: {cfg['backbone']}, {cfg['image_size']} px, "
        f"batch {cfg['batch_size']}, {cfg['precision']}, {cfg['device']}",
        "",
        f"Command: `{results['command']}`",
        "",
        f"- Machine: {results['machine']}",
        f"- Data: {cfg['data']}; augment off; {cfg['train_images']} training images, "
        f"{cfg['epochs']} epochs; DataLoader workers: {cfg['num_workers']}",
        f"- no_grad forward bound ({cfg['backbone']} backbone alone, one fixed batch, same "
        f"precision and batch size; best of {len(cl_all)} measurements through the run): "
        f"**{_fmt(bound['channels_last'])} img/s** channels-last (range {_fmt(min(cl_all))}"
        f"-{_fmt(max(cl_all))}); NCHW {_fmt(bound['nchw'])} img/s",
        f"- Decode + transform alone (no model): {_fmt(decode['in_process'], 0)} img/s in the main "
        f"process; {_fmt(decode['loader'], 0)} img/s through the training DataLoader "
        f"({_fmt(decode['loader_first'], 0)} img/s on its first pass, worker start-up included)",
        "",
    ]
    memory = "peak RSS MB (start)"
    head = [
        "setup",
        "regime",
        "first epoch img/s",
        "later epochs img/s",
        "later ÷ first epoch time",
        "first ÷ bound",
        "later ÷ bound",
        "vs plain PyTorch (first / later)",
        "feature cache",
        memory,
    ]
    if cuda:
        head.append("peak CUDA MB")
    head += ["total s", "load"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    b = bound["channels_last"]
    for r in rows:
        peer = torch_rows.get(r.regime)
        vs = "-"
        if peer is not None and r is not peer and r.setup.startswith("tlfinetune"):
            vs = f"{_ratio(r.first_ips, peer.first_ips)} / {_ratio(r.later_ips, peer.later_ips)}"
        later_share = r.first_ips / r.later_ips if r.later_ips == r.later_ips else float("nan")
        cells = [
            r.setup + (f" ({r.note})" if r.note else ""),
            r.regime,
            _fmt(r.first_ips),
            _fmt(r.later_ips),
            "-" if later_share != later_share else f"{100 * later_share:.1f} %",
            _ratio(r.first_ips, b),
            _ratio(r.later_ips, b),
            vs,
            r.cache_state,
            f"{_fmt(r.peak_rss_mb, 0)} ({_fmt(r.rss_start_mb, 0)})",
        ]
        if cuda:
            cells.append(_fmt(r.peak_cuda_mb, 0))
        cells += [_fmt(r.total_s), _fmt(r.load, 2)]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [""] + [f"- {note}" for note in results["notes"]]
    return "\n".join(lines) + "\n"


def _machine(device: torch.device) -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS, Windows
        cores = os.cpu_count() or 1
    parts = [f"{cpu}, {cores} CPU cores, torch threads {torch.get_num_threads()}"]
    if device.type == "cuda":
        parts.append(torch.cuda.get_device_name(device))
    import lightning

    parts.append(
        f"Python {platform.python_version()}, torch {torch.__version__}, "
        f"lightning {lightning.__version__}"
    )
    return "; ".join(parts)


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


# --- the command ---------------------------------------------------------------------------------


def bench(
    image_size: int = 64,
    batch_size: int = 32,
    precision: Precision = "32-true",
    images: int = 256,
    epochs: int = 3,
    regimes: str = "frozen,partial,full",
    backbone: str = "vgg16",
    weights: str = "none",
    unfreeze_from: str = "block5",
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
        backbone: torchvision VGG variant.
        weights: backbone weights (``none``, ``imagenet`` or a file); speed does not depend on
            them, and ``none`` needs no download.
        unfreeze_from: where the ``partial`` regime starts training (block, Keras layer name or
            index).
        device: ``auto`` takes CUDA when available.
        output: markdown file to write (none: print only).
        peers: comma-separated peers run in the same process: ``torch`` (a plain hand-written
            loop), ``keras`` (the seed's code, when TensorFlow is installed); ``none`` for none.
        num_workers: DataLoader workers; default the data module's (``min(4, cpus - 1)``).
        uncached: regimes also run with the feature cache switched off, when the package has
            a switch for it.
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
    command = "python -m tlfinetune bench " + shlex.join(
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
        workers = dm._resolved_num_workers()
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
            # Measured again after every regime: on a shared machine the best of them is the
            # bound, and their spread shows how much the machine's speed moved during the run.
            # NCHW (for comparison with the plain loop's layout) only at the start.
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

        switch = _cache_switch() if uncached_list else None
        if uncached_list and switch is None:
            notes.append("No switch to turn a feature cache off was found: no uncached rows.")
        elif switch is not None:
            notes.append(f"'tlfinetune, cache off' rows: {switch[0]}.")
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
            try:
                row = run()
            except Exception as exc:  # noqa: BLE001 - report it in the table, go on
                traceback.print_exc()
                first = (str(exc).strip().splitlines() or [""])[0]
                row = Result(setup, regime, note=f"failed: {type(exc).__name__}: {first}"[:240])
            with contextlib.suppress(OSError, AttributeError):
                row.load = os.getloadavg()[0]
            rows.append(row)
            _progress(_line(row))

        def peer(regime: str) -> Result:
            loader = s.datamodule().train_dataloader()
            features = bb.build_backbone(backbone)
            features.load_state_dict(weights_state)
            return torch_peer(s, regime, loader, num_classes, features)

        for regime in regime_list:
            add("tlfinetune", regime, functools.partial(run_tlfinetune, s, regime))
            if switch is not None and regime in uncached_list:
                label = "tlfinetune, cache off"
                run = functools.partial(
                    run_tlfinetune, s, regime, cache_off=_cache_switch(), label=label
                )
                add(label, regime, run)
            if "torch" in peer_list:
                add("plain PyTorch", regime, functools.partial(peer, regime))
            if keras_ok:
                add(
                    "Keras (TensorFlow)",
                    regime,
                    functools.partial(keras_peer, s, regime, num_classes),
                )
            _release_memory()
            measure_bound()

    bound = {
        "channels_last": max(bounds["channels_last"]),
        "nchw": max(bounds["nchw"]),
        "channels_last_all": bounds["channels_last"],
        "nchw_all": bounds["nchw"],
    }
    notes += [
        "Epoch times are wall-clock from the end of the previous epoch (from on_fit_start for the "
        "first), so loader start-up and a feature cache's one pass over the data count in the "
        "first epoch. Validation is off (limit_val_batches=0).",
        "first ÷ bound, later ÷ bound: training img/s over the no_grad forward img/s of the "
        "channels-last backbone. Below 1 the step costs more than a forward pass; above 1 a cache "
        "skips the backbone.",
        "Peak RSS: resident memory of the main process during training (DataLoader workers not "
        "included), with the RSS at the start of training in brackets.",
        "load: the 1-minute load average when the row finished; above the number of cores, "
        "other processes competed for the CPU and the row's times are pessimistic.",
        "plain PyTorch: torchvision VGG features + the seed's Flatten-Dense(256)-Dense head, "
        "requires_grad=False on the frozen layers, Adam, NCHW, autocast for mixed precision, the "
        "same DataLoader (tlfinetune.bench.torch_peer documents it line by line).",
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
            "num_workers": workers,
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
    print(report)
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(report, encoding="utf-8")
        _progress(f"wrote {output}")
    return results


def _line(row: Result) -> str:
    return (
        f"{row.setup:<22} {row.regime:<8} first {row.first_ips:8.1f} img/s, later "
        f"{row.later_ips:8.1f} img/s, cache {row.cache_state}, {row.total_s:.1f} s"
    )


def _parser() -> argparse.ArgumentParser:
    """The command line of :func:`bench`, built from its signature and its docstring."""
    doc = inspect.getdoc(bench) or ""
    summary, _, rest = doc.partition("\n\n")
    helps: dict[str, str] = {}
    name = None
    for line in rest.split("Args:", 1)[-1].split("Returns:", 1)[0].splitlines():
        head, sep, text = line.strip().partition(": ")
        if sep and line.startswith("    ") and not line.startswith("     "):
            name, helps[head] = head, text
        elif name and line.strip():
            helps[name] += " " + line.strip()
    parser = argparse.ArgumentParser(
        prog="tlfinetune bench",
        description=summary,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    hints = typing.get_type_hints(bench)
    for param in inspect.signature(bench).parameters.values():
        hint = hints[param.name]
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = type(None) in typing.get_args(hint)
        kwargs: dict[str, Any] = {"default": param.default, "help": helps.get(param.name, "")}
        if typing.get_origin(hint) is Literal:
            kwargs["choices"] = list(args)
        else:
            base = args[0] if optional else hint
            kwargs["type"] = _or_none(base) if optional else base
        parser.add_argument(f"--{param.name}", **kwargs)
    return parser


def _or_none(base: type) -> Any:
    def parse(text: str) -> Any:
        return None if text.lower() in ("none", "null", "") else base(text)

    parse.__name__ = base.__name__
    return parse


def main(argv: Sequence[str] | None = None) -> None:
    """``tlfinetune bench [--image_size 64] [--batch_size 32] [--precision 32-true] ...``."""
    args = _parser().parse_args(None if argv is None else list(argv))
    bench(**vars(args))
