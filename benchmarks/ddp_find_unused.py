"""What ``find_unused_parameters=True`` costs per training step under DDP x2 on the CPU.

FreezeSchedule used to turn it on whenever milestones existed: the layers a later milestone
unfreezes were registered with DDP's reducer up front but got no gradient until then. It now
wraps the model again whenever the trainable set changes instead. This runs the ``partial``
regime (block5 trains) with a milestone at epoch 100 (never reached) two ways, alternately
A, B, A, B...:

- A (now): the model re-wrapped at the start of the fit, ``find_unused_parameters`` off;
- B (before): block4 registered with DDP but unused, ``find_unused_parameters=True``,

so the trainable layers, the data and the arithmetic are the same and only DDP's work differs:
B traverses the autograd graph each step and all-reduces block4's zero gradients. Each run is a
fresh 2-process fit; the time per step is the median of rank 0's steps after the first three.

    python benchmarks/ddp_find_unused.py --pairs 3 --steps 20
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import lightning.pytorch as pl
import torch
from jsonargparse import CLI
from torch.utils.data import DataLoader, TensorDataset


class StepTimes(pl.Callback):
    """Wall time of each training step on this rank."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.find_unused: bool | None = None  # of the DDP wrapper in use while training
        self._start = 0.0

    def on_train_batch_start(self, *args) -> None:  # noqa: D102
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, *args) -> None:  # noqa: D102
        self.times.append(time.perf_counter() - self._start)
        self.find_unused = getattr(trainer.strategy.model, "find_unused_parameters", None)


def worker_fit(before: bool, steps: int, size: int, batch: int, out: Path) -> None:
    from lightning.pytorch.strategies import DDPStrategy

    from tlfinetune import FreezeSchedule, TransferClassifier, freeze

    if before:  # the previous behaviour: one wrapper for the whole fit, unused parameters
        freeze.rewrap_ddp = lambda trainer: False

    pl.seed_everything(0)
    n = steps * batch * 2
    x = torch.randint(0, 255, (n, 3, size, size), dtype=torch.uint8)
    y = torch.arange(n) % 3
    loader = DataLoader(TensorDataset(x, y), batch_size=batch)
    model = TransferClassifier(weights="none", num_classes=3, image_size=size)
    schedule = FreezeSchedule(regime="partial", unfreeze_from="block5", milestones={100: "block4"})
    times = StepTimes()
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy=DDPStrategy(find_unused_parameters=before),
        max_epochs=1, precision="bf16-mixed",
        logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[schedule, times],
    )  # fmt: skip
    trainer.fit(model, train_dataloaders=loader)
    if trainer.is_global_zero:
        out.write_text(
            json.dumps(
                {
                    "find_unused_parameters": times.find_unused,
                    "median_s": statistics.median(times.times[3:]),
                }
            )
        )


def ddp_find_unused(
    pairs: int = 3,
    steps: int = 20,
    size: int = 64,
    batch: int = 16,
    worker: Literal["A", "B"] | None = None,
    out: Path | None = None,
) -> None:
    """Time a DDP x2 training step with the model re-wrapped (A) and with unused parameters (B).

    Runs ``pairs`` x (A, B) fresh 2-process fits alternately and prints each one's median step
    time and the ratio B / A per pair.

    Args:
        pairs: Number of (A, B) pairs of fits.
        steps: Training steps per process in each fit.
        size: Side of the random training images, in pixels.
        batch: Images per batch, per process.
        worker: Internal (the parent passes it to each fit's process): run one fit, ``A``
            re-wrapped or ``B`` as before, and write rank 0's result to ``out``.
        out: Internal: the JSON file a ``worker`` writes.
    """
    if worker:
        worker_fit(worker == "B", steps, size, batch, out)
        return
    results: dict[str, list[float]] = {"A": [], "B": []}
    for pair in range(pairs):
        for setting in ("A", "B"):
            out = Path(f"/tmp/ddp_find_unused_{os.getpid()}_{pair}{setting}.json")
            cmd = [sys.executable, __file__, "--worker", setting, "--out", str(out),
                   "--steps", str(steps), "--size", str(size),
                   "--batch", str(batch)]  # fmt: skip
            subprocess.run(cmd, check=True, capture_output=True)
            row = json.loads(out.read_text())
            out.unlink()
            results[setting].append(row["median_s"])
            print(f"pair {pair} {setting}: find_unused_parameters={row['find_unused_parameters']}"
                  f", {row['median_s'] * 1000:.1f} ms/step", flush=True)  # fmt: skip
    ratios = [b / a for a, b in zip(results["A"], results["B"], strict=True)]
    print(f"B / A per pair: {', '.join(f'{r:.3f}' for r in ratios)}; "
          f"median {statistics.median(ratios):.3f}")  # fmt: skip


def main(argv: Sequence[str] | None = None) -> None:
    """``python benchmarks/ddp_find_unused.py [--pairs 3] [--steps 20] ...``: see above.

    The flags are :func:`ddp_find_unused`'s typed signature, read by jsonargparse as the
    package's own command line is.
    """
    CLI(ddp_find_unused, args=None if argv is None else list(argv), as_positional=False)


if __name__ == "__main__":
    main()
