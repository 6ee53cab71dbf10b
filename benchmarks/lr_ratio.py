"""Which ``backbone_lr_ratio`` should fine-tuning use? A measured answer.

The ratio scales the learning rate of every backbone layer that trains against the head's. It
only matters for pretrained filters, so the study needs a pretrained backbone. ImageNet weights
cannot be downloaded on an offline machine, so by default the study makes its own chain of
transfer from the demo dataset's shapes:

1. source: train ``vgg16_bn`` from random init (``regime: full``) on three shape classes (plain
   VGG16 from random init does not get off the ground here; BatchNorm does), then fold each
   BatchNorm into the convolution before it. The result is a plain torchvision ``vgg16`` state
   dict that computes exactly what the trained ``vgg16_bn`` computes in eval mode: pretrained
   VGG16 weights, as ImageNet's are, only learned on shapes.
2. target: fine-tune plain ``vgg16`` from that file (``--model.weights vgg16-proxy.pth``) on the
   three *other* shape classes with few images per class, once per regime (``partial`` = the
   seed's block5, ``full``) x ratio x seed, and record the best and the last validation accuracy.
   ``frozen`` (ratio irrelevant) and a random-init backbone are the reference rows.

With ImageNet weights in torchvision's cache, ``--weights imagenet --target FOLDER`` runs the same
sweep on a real dataset (an ImageFolder with ``train/`` and ``val/``) instead of the proxy.

Run from the repository root::

    python benchmarks/lr_ratio.py --out lr_ratio.md

It writes a markdown table (mean and range over seeds) to ``--out``; on 2 CPU cores the default
run takes about 15 minutes.
"""

from __future__ import annotations

import logging
import shutil
import statistics
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import lightning.pytorch as pl
import torch
from jsonargparse import CLI
from torch import nn

from tlfinetune import FreezeSchedule, TransferClassifier
from tlfinetune import backbone as bb
from tlfinetune.data import ImageDataModule
from tlfinetune.demo import generate_demo_dataset

SOURCE_CLASSES = ("circle", "square", "triangle")
TARGET_CLASSES = ("cross", "ring", "stripes")
# What pl.Trainer(precision=...) takes (the short aliases too, which argparse passed on as well).
Precision = Literal[
    "64-true", "32-true", "16-true", "bf16-true", "16-mixed", "bf16-mixed", "64", "32", "16", "bf16"
]


def _subset(demo: Path, out: Path, classes: tuple[str, ...], counts: dict[str, int]) -> Path:
    """An ImageFolder with some of the demo's classes and the first ``counts[split]`` images."""
    for split, n in counts.items():
        for name in classes:
            folder = out / split / name
            folder.mkdir(parents=True)
            for f in sorted((demo / split / name).iterdir())[:n]:
                shutil.copy(f, folder / f.name)
    return out


def _fit(
    root: Path,
    weights: str,
    regime: str,
    ratio: float,
    seed: int,
    epochs: int,
    lr: float,
    image_size: int,
    precision: str,
    save: Path | None = None,
    backbone: str = "vgg16",
) -> list[float]:
    """One fit; returns the validation accuracy after each epoch."""
    pl.seed_everything(seed, workers=True, verbose=False)
    data = ImageDataModule(
        root=root, image_size=image_size, batch_size=32, augment=False, seed=seed, num_workers=1
    )
    model = TransferClassifier(
        backbone=backbone,
        weights=weights,
        optimizer=lambda params: torch.optim.Adam(params, lr=lr),
    )
    accuracies: list[float] = []

    class Record(pl.Callback):
        def on_validation_epoch_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
            if not trainer.sanity_checking:
                accuracies.append(float(trainer.callback_metrics["val/acc"]))

    trainer = pl.Trainer(
        max_epochs=epochs,
        precision=precision,
        callbacks=[FreezeSchedule(regime=regime, backbone_lr_ratio=ratio), Record()],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=str(root.parent / "trainer"),
    )
    trainer.fit(model, datamodule=data)
    if save is not None:
        trainer.save_checkpoint(save)
    return accuracies


def fold_batchnorm(checkpoint: Path, out: Path) -> Path:
    """A trained ``vgg16_bn`` checkpoint -> a torchvision ``vgg16`` state dict, BatchNorm folded.

    In eval mode ``bn(conv(x)) = conv'(x)`` with ``w' = w * g`` and ``b' = (b - mean) * g + beta``,
    ``g = gamma / sqrt(var + eps)``: the plain network computes the same function.
    """
    bn_model = TransferClassifier.load_from_checkpoint(checkpoint, map_location="cpu").eval()
    plain = bb.build_backbone("vgg16").eval()
    convs = [m for m in bn_model.backbone if isinstance(m, nn.Conv2d)]
    norms = [m for m in bn_model.backbone if isinstance(m, nn.BatchNorm2d)]
    targets = [m for m in plain if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        for conv, norm, target in zip(convs, norms, targets, strict=True):
            g = norm.weight / torch.sqrt(norm.running_var + norm.eps)
            target.weight.copy_(conv.weight * g.view(-1, 1, 1, 1))
            target.bias.copy_((conv.bias - norm.running_mean) * g + norm.bias)
        x = torch.randn(4, 3, 64, 64)
        torch.testing.assert_close(plain(x), bn_model.backbone.float()(x), rtol=1e-4, atol=1e-4)
    torch.save({f"features.{k}": v for k, v in plain.state_dict().items()}, out)
    return out


def _row(label: str, runs: list[list[float]]) -> str:
    best = [max(a) for a in runs]
    last = [a[-1] for a in runs]

    def cell(values: list[float]) -> str:
        return f"{statistics.mean(values):.3f} ({min(values):.3f}-{max(values):.3f})"

    return f"| {label} | {cell(best)} | {cell(last)} |"


def lr_ratio(
    weights: str = "proxy",
    target: str | None = None,
    ratios: str = "1.0,0.3,0.1,0.03,0.01",
    regimes: str = "partial,full",
    seeds: int = 5,
    epochs: int = 8,
    lr: float = 1e-3,
    source_epochs: int = 10,
    source_lr: float = 3e-4,
    source_per_class: int = 1000,
    target_per_class: int = 20,
    val_per_class: int = 100,
    image_size: int = 32,
    precision: Precision = "bf16-mixed",
    source_precision: Precision | None = None,
    out: str = "lr_ratio.md",
) -> None:
    """Run the backbone_lr_ratio study and write its markdown table.

    Args:
        weights: ``proxy`` (pretrain on demo shapes), ``imagenet`` or a weights/checkpoint path.
        target: ImageFolder with ``train/`` and ``val/`` (default: the demo's other three
            classes).
        ratios: Comma-separated ``backbone_lr_ratio`` values to sweep.
        regimes: Comma-separated regimes to sweep them in.
        seeds: Seeds per run (0 to seeds - 1).
        epochs: Epochs of each target fine-tuning run.
        lr: Head learning rate (Adam; the seed's default).
        source_epochs: Epochs of the source pretraining.
        source_lr: Learning rate of the source pretraining (Adam).
        source_per_class: Source training images per class.
        target_per_class: Target training images per class.
        val_per_class: Validation images per class (source and target).
        image_size: Side of the images, in pixels.
        precision: Precision of the target fine-tuning runs.
        source_precision: Precision of the source pretraining (default: ``precision``); fix it
            to compare target precisions.
        out: Markdown file to write.
    """
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("tlfinetune").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    started = time.perf_counter()
    lines: list[str] = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        target_root = Path(target) if target else None
        if weights == "proxy" or target_root is None:
            demo = generate_demo_dataset(
                tmp / "demo",
                train_per_class=max(source_per_class, target_per_class),
                val_per_class=val_per_class,
                test_per_class=1,
                image_size=image_size,
                seed=1,
            )
        if weights == "proxy":
            counts = {"train": source_per_class, "val": val_per_class}
            source = _subset(demo, tmp / "source", SOURCE_CLASSES, counts)
            ckpt = tmp / "source.ckpt"
            acc = _fit(source, "none", "full", 1.0, 0, source_epochs, source_lr,
                       image_size, source_precision or precision, save=ckpt,
                       backbone="vgg16_bn")  # fmt: skip
            weights = str(fold_batchnorm(ckpt, tmp / "vgg16-proxy.pth"))
            lines.append(
                f"Source: vgg16_bn from random init, full regime, Adam lr {source_lr:g}, "
                f"{source_epochs} epochs on {', '.join(SOURCE_CLASSES)} x "
                f"{source_per_class} images at {image_size} px, "
                f"{source_precision or precision}: val acc "
                f"{acc[-1]:.3f} (per epoch: {', '.join(f'{a:.2f}' for a in acc)}); BatchNorm "
                f"folded into a plain vgg16 state dict (same outputs within 1e-4)."
            )
            print(lines[-1], flush=True)
        if target_root is None:
            counts = {"train": target_per_class, "val": val_per_class}
            target_root = _subset(demo, tmp / "target", TARGET_CLASSES, counts)
        seed_range = range(seeds)
        common = (epochs, lr, image_size, precision)
        rows: list[tuple[str, list[list[float]]]] = []
        runs_of = [("frozen, random-init backbone", "none", "frozen", 1.0),
                   ("frozen (head only)", weights, "frozen", 1.0)]  # fmt: skip
        for regime in regimes.split(","):
            for ratio in (float(r) for r in ratios.split(",")):
                runs_of.append((f"{regime}, backbone_lr_ratio {ratio:g}", weights, regime, ratio))
        for label, w, regime, ratio in runs_of:
            rows.append(
                (label, [_fit(target_root, w, regime, ratio, s, *common) for s in seed_range])
            )
            print(_row(*rows[-1]), flush=True)
    minutes = (time.perf_counter() - started) / 60
    what = target or f"{', '.join(TARGET_CLASSES)} (demo shapes the source never saw)"
    table = [
        f"Target: {what}, {target_per_class} train images per class, {val_per_class} "
        f"val per class, {image_size} px, {precision}, Adam head lr {lr:g}, "
        f"{epochs} epochs, seeds 0-{seeds - 1}; mean (min-max) over seeds. "
        f"{minutes:.0f} min in all.",
        "",
        "| run | best val acc | last val acc |",
        "|---|---|---|",
        *(_row(label, runs) for label, runs in rows),
    ]
    Path(out).write_text("\n".join(lines + [""] + table) + "\n")
    print("\n".join(table))


def main(argv: Sequence[str] | None = None) -> None:
    """``python benchmarks/lr_ratio.py [--out lr_ratio.md] [--ratios ...] ...``: see above.

    The flags are :func:`lr_ratio`'s typed signature, read by jsonargparse as the package's own
    command line is.
    """
    CLI(lr_ratio, args=None if argv is None else list(argv), as_positional=False)


if __name__ == "__main__":
    main()
