"""Where a cached step of the seed's job spends its time, against its arithmetic (issue 18).

After its first epoch the seed's frozen job trains from cached VGG16 features: a step is the head
alone (Flatten -> Linear(25,088, 256) -> ReLU -> Linear(256, 5)) on bf16 features (32, 512, 7, 7),
its backward, and Adam over the head's 6.4 M parameters. Measured in this one process, each as
the median over ``--steps`` steps, ``--rounds`` times interleaved:

- the arithmetic: the head's forward + backward alone, and the optimizer's step alone (fused Adam,
  what the module builds), the two things a step cannot avoid;
- a plain PyTorch loop doing the whole step (forward, loss, backward, step, zero_grad);
- ``TransferClassifier``'s step inside ``trainer.fit`` (bf16-mixed), fed cached batches the way
  the feature cache feeds them, from ``on_train_batch_start`` to ``on_train_batch_end``; and a
  whole cached epoch of the seed's job (8 training steps, then validation of 2 batches), from
  the epoch's start to the end of its validation.

Then the operators a Lightning step spends its time in (``torch.profiler``, self CPU time).

    python benchmarks/cached_step.py --steps 40 --rounds 2
"""

from __future__ import annotations

import statistics
import time

import lightning.pytorch as pl
import torch
from jsonargparse import CLI
from torch.utils.data import DataLoader

from tlfinetune import TransferClassifier
from tlfinetune.cache import _as_is, _Features
from tlfinetune.machine import keep_freed_memory

BATCH, TRAIN, VAL, CLASSES = 32, 255, 35, 5
SHAPE = (512, 7, 7)  # VGG16's features at 224 px


class _Stamps(pl.Callback):
    """Step times (batch start to end) and cached epoch times (start to end of validation)."""

    def __init__(self) -> None:
        self.steps: list[float] = []
        self.epochs: list[float] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._epoch = time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._step = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.steps.append(time.perf_counter() - self._step)

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.epochs.append(time.perf_counter() - self._epoch)


def _model() -> TransferClassifier:
    model = TransferClassifier(
        num_classes=CLASSES, backbone="vgg16", weights="none", image_size=224, head="flatten",
        head_hidden=256, feature_cache=False,
    )  # fmt: skip
    return model


def _trainer(epochs: int, **kwargs) -> pl.Trainer:
    """The seed job's Trainer (bf16-mixed on the CPU) with nothing around the steps."""
    return pl.Trainer(
        accelerator="cpu", precision="bf16-mixed", max_epochs=epochs, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, **kwargs,
    )  # fmt: skip


def _loader(n: int, start: int, seed: int) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(n, *SHAPE, generator=g).to(torch.bfloat16)
    labels = torch.randint(0, CLASSES, (n,), generator=g)
    return DataLoader(_Features(features, labels, start), batch_size=BATCH, collate_fn=_as_is)


def median_ms(fn, steps: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def _plain(steps: int) -> dict[str, float]:
    model = _model()
    head = model.head.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(head.parameters(), lr=1e-3, fused=True)
    x = torch.randn(BATCH, *SHAPE).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, CLASSES, (BATCH,))

    def forward_backward() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
            loss = torch.nn.functional.cross_entropy(head(x).float(), y)
        loss.backward()

    def whole_step() -> None:
        forward_backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    forward_backward()  # gradients for the optimizer-alone timing
    return {
        "forward + backward": median_ms(forward_backward, steps),
        "optimizer step": median_ms(opt.step, steps),
        "plain loop step": median_ms(whole_step, steps),
    }


def _lightning(epochs: int) -> tuple[float, float, float]:
    model = _model()
    start = len(model.backbone)
    stamps = _Stamps()
    trainer = _trainer(epochs, callbacks=[stamps])
    trainer.fit(model, _loader(TRAIN, start, 0), _loader(VAL, start, 1))
    later = stamps.epochs[1:]  # the first epoch warms up the kernels
    return (
        1000 * statistics.median(stamps.steps[len(stamps.steps) // epochs :]),
        1000 * statistics.median(later),
        1000 * min(later),
    )


def _profile() -> str:
    model = _model()
    start = len(model.backbone)
    _trainer(2, limit_val_batches=0).fit(model, _loader(TRAIN, start, 0))  # warm
    trainer = _trainer(1, limit_val_batches=0)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        trainer.fit(model, _loader(TRAIN, start, 0))
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14)


def main(steps: int = 40, rounds: int = 2, epochs: int = 6, profile: bool = True) -> None:
    """Print the table (milliseconds) and, with ``profile``, the operators of a cached epoch.

    Args:
        steps: steps per median of the plain measurements.
        rounds: interleaved rounds of every measurement.
        epochs: epochs of each ``trainer.fit`` (the first is left out of the medians).
        profile: also print torch.profiler's table of one cached epoch inside fit.
    """
    torch.manual_seed(0)
    rows: dict[str, list[float]] = {}
    for _ in range(rounds):
        for key, value in _plain(steps).items():
            rows.setdefault(key, []).append(value)
        step, epoch, fastest = _lightning(epochs)
        rows.setdefault("TransferClassifier step in fit", []).append(step)
        rows.setdefault("cached epoch in fit (8 steps + validation)", []).append(epoch)
        rows.setdefault("fastest cached epoch in fit", []).append(fastest)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; ms per round:")
    for key, values in rows.items():
        print(f"  {key:44s} " + " / ".join(f"{v:7.1f}" for v in values))
    floor = [a + b for a, b in zip(rows["forward + backward"], rows["optimizer step"], strict=True)]
    train_batches = -(-TRAIN // BATCH)
    print(f"  {'arithmetic of a step (fwd + bwd + optimizer)':44s} " + " / ".join(
        f"{v:7.1f}" for v in floor))  # fmt: skip
    ratio = [e / (train_batches * f) for e, f in zip(rows[
        "cached epoch in fit (8 steps + validation)"], floor, strict=True)]  # fmt: skip
    print(f"  cached epoch ÷ ({train_batches} × arithmetic of a step): " + " / ".join(
        f"{r:.2f}×" for r in ratio))  # fmt: skip
    if profile:
        print("\nOne cached epoch inside fit (8 steps), operators by self CPU time:")
        print(_profile())


if __name__ == "__main__":
    keep_freed_memory()  # as tlfinetune's command runs
    CLI(main, as_positional=False)
