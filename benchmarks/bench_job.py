"""``python benchmarks/bench.py --job seed``: the seed's own job, tlfinetune against its Keras code.

The seed's snippet 1 at its real size: VGG16 frozen, ``Flatten -> Dense(256, relu) ->
Dense(5, softmax)``, Adam (lr 1e-3), batch 32, 10 epochs, 255 training and 35 validation images
at 224 px, no augmentation. Both sides run as the user runs them, each as its own process, on the
same JPEG files, and are timed from the parent's launch of the process to its exit:

- tlfinetune: ``python -m tlfinetune fit --config configs/vgg16_transfer.yaml --model.weights
  none --data.root DATA --data.augment false --trainer.precision P`` (the CLI, not the same
  objects in this process: start-up, the run folder, checkpoints, ``config.yaml``, the learning
  curves and the interpreter's exit are part of what a user waits for). One extra callback,
  :class:`bench_measure.JobTimer` (``--trainer.callbacks+=``), stamps the phases from inside;
- Keras: ``benchmarks/seed_keras.py``, the seed's code line for line (its docstring says how
  the in-memory arrays are made), with Keras's default policy ``float32`` unless ``--keras``
  names others.

:func:`split_job` turns each process's stamps into the report's columns (start-up, the sanity
check, first epoch training and validation, later epochs training and validation, between
epochs, the end, the total), whose sum is the whole command's wall time; the ratio Keras ÷
tlfinetune is given per precision of tlfinetune, for the total and for the time inside fit.
The no_grad forward bound of the backbone at 224 px (batch 32, channels-last, each precision) is
measured in this process before and after each tlfinetune run, as ``features(x)`` and as
tlfinetune runs frozen layers (:func:`tlfinetune.fusion.run`), and the first epoch's training
images/s is divided by each one's mean.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from bench_measure import _release_memory, forward_bound
from bench_report import _machine, publish

from tlfinetune import backbone as bb
from tlfinetune.errors import ConfigError

__all__ = ["COLUMNS", "seed_job", "split_job"]

HERE = Path(__file__).resolve().parent
CONFIG = HERE.parent / "configs" / "vgg16_transfer.yaml"
IMAGE_SIZE, BATCH, TRAIN, VAL, CLASSES = 224, 32, 255, 35, 5
PRECISIONS = ("32-true", "bf16-mixed")
POLICIES = ("float32", "mixed_bfloat16")
# (key, header): the phases of one run, in the order they happen; they add up to ``total``.
COLUMNS = (
    ("startup", "start-up"),
    ("sanity", "sanity check"),
    ("first_train", "first epoch: training"),
    ("first_val", "first epoch: validation"),
    ("later_train", "later epochs: training"),
    ("later_val", "later epochs: validation"),
    ("between", "between epochs"),
    ("end", "end"),
    ("total", "total"),
)


def split_job(stamps: dict[str, Any], launch: float, exit_: float) -> dict[str, float]:
    """The phases of one run, in seconds, from its ``time.time()`` stamps.

    ``stamps`` holds ``fit_start``, ``fit_end``, optional ``sanity_start``/``sanity_end`` and
    ``epochs``: per epoch ``train_start``, ``train_end`` and, when it validated, ``val_start``
    and ``val_end``. Validation runs inside the training epoch (in Lightning and in Keras), so an
    epoch's training is ``train_start`` to ``val_start``; "between" is from the end of one
    epoch's validation (or training) to the next epoch's start, and after the last epoch to
    ``fit_end`` (checkpoint writing, loader set-up, end-of-epoch callbacks); ``startup`` is from
    the launch to the first epoch's start less the sanity check; ``end`` from ``fit_end`` to
    the process's exit. Also ``in_fit`` (``fit_start`` to ``fit_end``), ``epochs`` and
    ``first_train_s`` per image counts are left to the caller.

    Raises:
        ValueError: when a stamp is missing or the stamps go back in time.
    """
    epochs = stamps.get("epochs") or []
    if not epochs:
        raise ValueError("the run recorded no epoch")
    for e in epochs:
        if "train_start" not in e or "train_end" not in e:
            raise ValueError(f"an epoch lacks its start or end stamp: {sorted(e)}")
    train, val, between = [], [], []
    for i, e in enumerate(epochs):
        done = e.get("val_end", e["train_end"])
        train.append(e.get("val_start", e["train_end"]) - e["train_start"])
        val.append(e["val_end"] - e["val_start"] if "val_start" in e else 0.0)
        nxt = epochs[i + 1]["train_start"] if i + 1 < len(epochs) else stamps["fit_end"]
        between.append(nxt - max(done, e["train_end"]))
    sanity = stamps.get("sanity_end", 0.0) - stamps.get("sanity_start", 0.0)
    parts = {
        "startup": epochs[0]["train_start"] - launch - sanity,
        "sanity": sanity,
        "first_train": train[0],
        "first_val": val[0],
        "later_train": sum(train[1:]),
        "later_val": sum(val[1:]),
        "between": sum(between),
        "end": exit_ - stamps["fit_end"],
    }
    if any(v < 0 for v in [*parts.values(), *train, *val, *between]):
        raise ValueError(f"the stamps are not in order: {parts}")
    parts["total"] = exit_ - launch
    parts["in_fit"] = stamps["fit_end"] - stamps["fit_start"]
    parts["epochs"] = len(epochs)
    return parts


def _run(cmd: list[str], env: dict[str, str], cwd: Path, stamps: Path, log: Path) -> dict:
    """Launch ``cmd``, wait, return its phases; its output goes to ``log``."""
    with open(log, "w", encoding="utf-8") as out:
        launch = time.time()
        rc = subprocess.run(cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT).returncode
        exit_ = time.time()
    if rc != 0 or not stamps.is_file():
        tail = log.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-5:]
        raise RuntimeError(f"{shlex.join(cmd)} failed (exit {rc}): " + " / ".join(tail))
    parts = split_job(json.loads(stamps.read_text(encoding="utf-8")), launch, exit_)
    parts["load"] = os.getloadavg()[0]
    return parts


def _list(value: str, allowed: tuple[str, ...], what: str) -> list[str]:
    items = [x.strip() for x in value.split(",") if x.strip() and x.strip() != "none"]
    bad = [x for x in items if x not in allowed]
    if bad:
        raise ConfigError(f"--{what} {','.join(bad)}: choose from {','.join(allowed)}.")
    return items


def seed_job(
    precisions: str = "bf16-mixed,32-true",
    keras: str = "float32",
    data: str | None = None,
    output: str | None = "bench_seed.md",
    epochs: int = 10,
    bound_seconds: float = 3.0,
    keep: str | None = None,
) -> dict[str, Any]:
    """Time the seed's job: tlfinetune's CLI per precision, and the seed's Keras code.

    Args:
        precisions: tlfinetune's ``--trainer.precision`` values to run, in this order.
        keras: Keras policies to run the seed's code with (``float32``: Keras's default, what
            the seed runs; ``mixed_bfloat16``); ``none`` skips Keras. Skipped with a note when
            TensorFlow is not installed in this Python.
        data: a folder with ``train/<class>`` and ``val/<class>`` to use instead of the 255 + 35
            synthetic JPEGs of 224 px in 5 classes written for the run.
        output: markdown file to write (none: print only).
        epochs: epochs of each run (the seed's 10).
        bound_seconds: how long to time each no_grad forward bound.
        keep: a folder to keep the data, run folders and logs in (default: a temporary one).

    Returns:
        ``config``, ``command``, ``machine``, ``rows`` (one dict per run: ``setup``,
        ``precision``, the phases of :data:`COLUMNS`, ``in_fit``, ``first_ips``, ``bound``,
        ``bound_fused``), ``notes`` and the ``markdown`` report.
    """
    from bench import write_images  # bench.py imports this module: import it when called

    precision_list = _list(precisions, PRECISIONS, "precisions")
    policy_list = _list(keras, POLICIES, "keras")
    if epochs < 2:
        raise ConfigError(f"--epochs must be at least 2 (first and later epochs), got {epochs}.")
    notes: list[str] = []
    # Found, not imported: the Keras process imports it; here it would only take memory.
    if policy_list and importlib.util.find_spec("tensorflow") is None:
        notes.append(f"Keras skipped: TensorFlow is not installed in {sys.executable}.")
        policy_list = []
    command = "python benchmarks/bench.py --job seed " + shlex.join(
        f"--{k}={v}"
        for k, v in (
            ("precisions", ",".join(precision_list)),
            ("keras", ",".join(policy_list) or "none"),
            ("data", data),
            ("epochs", epochs),
            ("output", output),
        )
        if v is not None
    )
    rows: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        if keep:
            work = Path(keep)
            work.mkdir(parents=True, exist_ok=True)
        else:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tlft-seed-")))
        if data is None:
            root = work / "data"
            if not (root / "train").is_dir():
                write_images(root, TRAIN, IMAGE_SIZE, "jpeg", 0, val_images=VAL, classes=CLASSES)
            described = f"{TRAIN} + {VAL} synthetic JPEGs of {IMAGE_SIZE} px, {CLASSES} classes"
        else:
            root = Path(data).resolve()
            described = f"folder {data}"
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(HERE.parent), str(HERE), *filter(None, [env.get("PYTHONPATH")])]
        )
        train_images = sum(1 for p in (root / "train").rglob("*") if p.is_file())

        def bounds(precision: str) -> tuple[float, float]:
            # (plain, fused): the module's own forward, and tlfinetune's (fusion.run)
            _release_memory()
            features = bb.build_backbone("vgg16")
            run = "bf16-mixed" if precision == "bf16-mixed" else "32-true"
            return tuple(
                forward_bound(
                    features, BATCH, IMAGE_SIZE, run, torch.device("cpu"), True, bound_seconds,
                    fused=fused,
                )
                for fused in (False, True)
            )  # fmt: skip

        for precision in precision_list:
            before = bounds(precision)
            folder = work / f"tlfinetune-{precision}"
            stamps = folder / "stamps.json"
            folder.mkdir(parents=True, exist_ok=True)
            stamps.unlink(missing_ok=True)
            cmd = [
                sys.executable, "-m", "tlfinetune", "fit",
                "--config", str(CONFIG),
                "--model.weights", "none",
                "--data.root", str(root),
                "--data.augment", "false",
                "--trainer.precision", precision,
                "--trainer.max_epochs", str(epochs),
                "--trainer.default_root_dir", str(folder / "runs"),
                "--trainer.callbacks+=bench_measure.JobTimer",
                "--trainer.callbacks.path", str(stamps),
            ]  # fmt: skip
            _progress(f"tlfinetune {precision}: {shlex.join(cmd[1:])}")
            row = _run(cmd, env, folder, stamps, folder / "output.log")
            row.update(setup="tlfinetune", precision=precision)
            after = bounds(precision)
            row["bound"] = (before[0] + after[0]) / 2
            row["bound_fused"] = (before[1] + after[1]) / 2
            row["first_ips"] = train_images / row["first_train"]
            rows.append(row)
            _progress(f"tlfinetune {precision}: {row['total']:.1f} s")
        for policy in policy_list:
            folder = work / f"keras-{policy}"
            folder.mkdir(parents=True, exist_ok=True)
            stamps = folder / "stamps.json"
            stamps.unlink(missing_ok=True)
            cmd = [
                sys.executable, str(HERE / "seed_keras.py"),
                "--data", str(root),
                "--out", str(stamps),
                "--epochs", str(epochs),
                "--policy", policy,
            ]  # fmt: skip
            _progress(f"Keras {policy}: {shlex.join(cmd[1:])}")
            row = _run(cmd, env, folder, stamps, folder / "output.log")
            keras_stamps = json.loads(stamps.read_text(encoding="utf-8"))
            row["data_load"] = keras_stamps["loaded"] - keras_stamps["imported"]
            row.update(setup="Keras (TensorFlow)", precision=policy)
            row["bound"] = row["bound_fused"] = float("nan")
            row["first_ips"] = train_images / row["first_train"]
            rows.append(row)
            _progress(f"Keras {policy}: {row['total']:.1f} s")

    notes += [
        "Each run is its own process, timed from its launch to its exit; the phases add up to "
        "the total. start-up: imports, parsing, reading the data set up (Keras: loading the "
        "arrays too), building the model, up to the first epoch. sanity check: Lightning's "
        "validation of 2 batches before training (Keras has none). Validation runs inside each "
        "epoch. between epochs: after an epoch's validation to the next epoch's start, and after "
        "the last to the end of fit (tlfinetune: writing last.ckpt and the best checkpoint, "
        "setting up the next epoch's loader; Keras: nothing). end: from the end of fit to the "
        "process's exit (tlfinetune: the learning curves, the summary, interpreter exit).",
        "in fit: on_fit_start (Keras on_train_begin) to the end of fit.",
        "first epoch img/s ÷ bound: the first epoch's training images/s over the no_grad "
        "forward images/s of VGG16 at 224 px, batch 32, channels-last, at the run's precision, "
        "measured in the benchmark's process just before and after the run (their mean): "
        "`features(x)` as a hand-written loop runs it, and fused as tlfinetune runs frozen "
        "layers (tlfinetune.fusion: each Conv2d + ReLU one oneDNN kernel on CPU).",
        "Keras ÷ tlfinetune: each Keras run's time over this tlfinetune run's, total and in fit.",
    ]
    results: dict[str, Any] = {
        "config": {
            "data": described,
            "train_images": train_images,
            "epochs": epochs,
            "precisions": precision_list,
            "keras": policy_list,
        },
        "command": command,
        "machine": _machine(torch.device("cpu")),
        "rows": rows,
        "notes": notes,
    }
    report = job_markdown(results)
    results["markdown"] = report
    publish(report, output)
    if output:
        _progress(f"wrote {output}")
    return results


def _progress(message: str) -> None:
    print(f"[bench seed] {message}", file=sys.stderr, flush=True)


def _f(x: float, digits: int = 2) -> str:
    return "-" if x != x else f"{x:,.{digits}f}"


def job_markdown(results: dict[str, Any]) -> str:
    """The report: the setting, one row per run with its phases, and the ratios."""
    cfg, rows = results["config"], results["rows"]
    head = ["setup", "precision", *(h for _, h in COLUMNS), "in fit", "first epoch img/s"]
    head += ["÷ bound (bound img/s)", "÷ fused bound (img/s)", "load"]
    lines = [
        "## The seed's job: VGG16 frozen, Flatten-256-5, Adam, batch 32, 224 px",
        "",
        f"Command: `{results['command']}`",
        "",
        f"- Machine: {results['machine']}",
        f"- Data: {cfg['data']}; augment off; {cfg['epochs']} epochs",
        "",
        "Seconds per phase:",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in rows:
        cells = [r["setup"], r["precision"], *(_f(r[k]) for k, _ in COLUMNS), _f(r["in_fit"])]
        cells.append(_f(r["first_ips"], 1))
        for key in ("bound", "bound_fused"):
            ratio = r["first_ips"] / r[key] if r[key] == r[key] else float("nan")
            cells.append(f"{_f(ratio)}× ({_f(r[key], 1)})")
        cells.append(_f(r["load"]))
        lines.append("| " + " | ".join(cells) + " |")
    ours = [r for r in rows if r["setup"] == "tlfinetune"]
    theirs = [r for r in rows if r["setup"] != "tlfinetune"]
    if ours and theirs:
        lines += ["", "Keras ÷ tlfinetune (total / in fit / first epoch / later epochs):", ""]
        lines += ["| Keras | tlfinetune | total | in fit | first epoch | later epochs |"]
        lines += ["|---|---|---|---|---|---|"]
        for k in theirs:
            for t in ours:

                def ratio(key: str, k: dict = k, t: dict = t) -> str:
                    return f"{k[key] / t[key]:.1f}×" if t[key] > 0 else "-"

                first = (k["first_train"] + k["first_val"]) / (t["first_train"] + t["first_val"])
                later_k = k["later_train"] + k["later_val"]
                later_t = t["later_train"] + t["later_val"]
                cells = [k["precision"], t["precision"], ratio("total"), ratio("in_fit")]
                cells += [f"{first:.1f}×", f"{later_k / later_t:.1f}×" if later_t else "-"]
                lines.append("| " + " | ".join(cells) + " |")
    keras_rows = [r for r in theirs if "data_load" in r]
    if keras_rows:
        loads = ", ".join(f"{r['precision']} {r['data_load']:.1f} s" for r in keras_rows)
        lines += ["", f"Keras's start-up includes loading the arrays: {loads}."]
    lines += [""] + [f"- {note}" for note in results["notes"]]
    return "\n".join(lines) + "\n"
