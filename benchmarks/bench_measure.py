"""How ``python benchmarks/bench.py`` measures, and the row a measurement fills.

The timers, memory samplers and reference speeds every setup is measured with (tlfinetune's own
``trainer.fit`` and the peers alike), so that all rows of the table are measured the same way;
:class:`Result` is that row. ``bench.py`` documents what each measurement means.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import json
import math
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from tlfinetune import fusion
from tlfinetune.data import ImageDataModule

__all__ = [
    "EpochTimer",
    "JobTimer",
    "PeakMemory",
    "Result",
    "forward_bound",
    "measure_decode",
]


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
    # The no_grad forward bound around this row: mean of the measurements just before and just
    # after it, so that the row and its bound saw the same machine (a shared one drifts).
    bound: float = float("nan")
    # A cached step's arithmetic over an uncached one's (benchmarks/arithmetic.py): the lowest
    # later ÷ first epoch time the cache could give. NaN where no cache served.
    floor: float = float("nan")
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
            "bound": self.bound,
            "floor": self.floor,
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
    before ``on_train_epoch_start``, and that work (worker start-up) belongs to the epoch it
    feeds, as does filling a feature cache, which happens during the first epoch's steps.
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


class JobTimer(pl.Callback):
    """Wall-clock stamps of a whole ``fit``, written as JSON when the fit ends.

    Given to ``python -m tlfinetune fit`` as ``--trainer.callbacks+=bench_measure.JobTimer``
    (with ``benchmarks/`` on ``PYTHONPATH``), so that the CLI a user runs is timed from inside
    without changing it. Stamps are ``time.time()`` (comparable with the parent process that
    launched the command) of: this callback's creation (imports and parsing done), ``setup``,
    ``on_fit_start``, the sanity check, and per epoch the start of training, the start and end
    of validation (this callback runs before ``ModelCheckpoint``, which Lightning puts last, so
    the time from the end of validation to the next epoch's start is checkpointing and the
    other end-of-epoch work) and the end of the training epoch; then ``on_fit_end`` and
    ``teardown``. :func:`split_job` turns them into the report's columns.

    Args:
        path: JSON file to write.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.stamps: dict[str, Any] = {"created": time.time(), "epochs": []}

    def _epoch(self, trainer: pl.Trainer) -> dict[str, float]:
        while len(self.stamps["epochs"]) <= trainer.current_epoch:
            self.stamps["epochs"].append({})
        return self.stamps["epochs"][trainer.current_epoch]

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:  # noqa: D102
        self.stamps["setup"] = time.time()

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:  # noqa: D102
        self.stamps["fit_start"] = time.time()

    def on_sanity_check_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:  # noqa: D102
        self.stamps["sanity_start"] = time.time()

    def on_sanity_check_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:  # noqa: D102
        self.stamps["sanity_end"] = time.time()

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:  # noqa: D102
        self._epoch(trainer)["train_start"] = time.time()

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:  # noqa: D102
        if not trainer.sanity_checking:
            self._epoch(trainer)["val_start"] = time.time()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:  # noqa: D102
        if not trainer.sanity_checking:
            self._epoch(trainer)["val_end"] = time.time()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:  # noqa: D102
        self._epoch(trainer)["train_end"] = time.time()

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:  # noqa: D102
        self.stamps["fit_end"] = time.time()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:  # noqa: D102
        self.stamps["teardown"] = time.time()
        with open(self.path, "w", encoding="utf-8") as f:
            json.dump(self.stamps, f)


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
    fused: bool = False,
) -> float:
    """Images/s of ``features`` under ``torch.no_grad`` on one fixed random batch.

    Two warm-up batches, two to estimate the time of one, then as many as fill ``seconds``
    (at least three), timed together. ``fused``: through :func:`tlfinetune.fusion.run`, as
    tlfinetune runs frozen layers (each Conv2d + ReLU one oneDNN kernel on CPU), instead of
    ``features(x)`` as a hand-written loop would.
    """
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = features.to(device=device, memory_format=fmt).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, 3, image_size, image_size, generator=g).to(device)
    x = x.contiguous(memory_format=fmt)
    if fused:
        model = functools.partial(fusion.run, model)
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
