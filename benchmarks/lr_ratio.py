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

import argparse
import logging
import shutil
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn

from tlfinetune import FreezeSchedule, TransferClassifier
from tlfinetune import backbone as bb
from tlfinetune.data import ImageDataModule
from tlfinetune.demo import generate_demo_dataset

SOURCE_CLASSES = ("circle", "square", "triangle")
TARGET_CLASSES = ("cross", "ring", "stripes")


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


def main() -> None:
    """Parse the arguments, run the study, write the table."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", default="proxy", help="'proxy' (pretrain on demo shapes), "
                   "'imagenet' or a weights/checkpoint path")  # fmt: skip
    p.add_argument("--target", default=None, help="ImageFolder with train/ and val/ (default: "
                   "the demo's other three classes)")  # fmt: skip
    p.add_argument("--ratios", default="1.0,0.3,0.1,0.03,0.01")
    p.add_argument("--regimes", default="partial,full")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3, help="head lr (Adam; the seed's default)")
    p.add_argument("--source_epochs", type=int, default=10)
    p.add_argument("--source_lr", type=float, default=3e-4)
    p.add_argument("--source_per_class", type=int, default=1000)
    p.add_argument("--target_per_class", type=int, default=20)
    p.add_argument("--val_per_class", type=int, default=100)
    p.add_argument("--image_size", type=int, default=32)
    p.add_argument("--precision", default="bf16-mixed", help="of the target fine-tuning runs")
    p.add_argument("--source_precision", default=None, help="of the source pretraining "
                   "(default: --precision); fix it to compare target precisions")  # fmt: skip
    p.add_argument("--out", default="lr_ratio.md")
    args = p.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("tlfinetune").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    started = time.perf_counter()
    lines: list[str] = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        weights, target = args.weights, Path(args.target) if args.target else None
        if weights == "proxy" or target is None:
            demo = generate_demo_dataset(
                tmp / "demo",
                train_per_class=max(args.source_per_class, args.target_per_class),
                val_per_class=args.val_per_class,
                test_per_class=1,
                image_size=args.image_size,
                seed=1,
            )
        if weights == "proxy":
            counts = {"train": args.source_per_class, "val": args.val_per_class}
            source = _subset(demo, tmp / "source", SOURCE_CLASSES, counts)
            ckpt = tmp / "source.ckpt"
            acc = _fit(source, "none", "full", 1.0, 0, args.source_epochs, args.source_lr,
                       args.image_size, args.source_precision or args.precision, save=ckpt,
                       backbone="vgg16_bn")  # fmt: skip
            weights = str(fold_batchnorm(ckpt, tmp / "vgg16-proxy.pth"))
            lines.append(
                f"Source: vgg16_bn from random init, full regime, Adam lr {args.source_lr:g}, "
                f"{args.source_epochs} epochs on {', '.join(SOURCE_CLASSES)} x "
                f"{args.source_per_class} images at {args.image_size} px, "
                f"{args.source_precision or args.precision}: val acc "
                f"{acc[-1]:.3f} (per epoch: {', '.join(f'{a:.2f}' for a in acc)}); BatchNorm "
                f"folded into a plain vgg16 state dict (same outputs within 1e-4)."
            )
            print(lines[-1], flush=True)
        if target is None:
            counts = {"train": args.target_per_class, "val": args.val_per_class}
            target = _subset(demo, tmp / "target", TARGET_CLASSES, counts)
        seeds = range(args.seeds)
        common = (args.epochs, args.lr, args.image_size, args.precision)
        rows: list[tuple[str, list[list[float]]]] = []
        runs_of = [("frozen, random-init backbone", "none", "frozen", 1.0),
                   ("frozen (head only)", weights, "frozen", 1.0)]  # fmt: skip
        for regime in args.regimes.split(","):
            for ratio in (float(r) for r in args.ratios.split(",")):
                runs_of.append((f"{regime}, backbone_lr_ratio {ratio:g}", weights, regime, ratio))
        for label, w, regime, ratio in runs_of:
            rows.append((label, [_fit(target, w, regime, ratio, s, *common) for s in seeds]))
            print(_row(*rows[-1]), flush=True)
    minutes = (time.perf_counter() - started) / 60
    what = args.target or f"{', '.join(TARGET_CLASSES)} (demo shapes the source never saw)"
    table = [
        f"Target: {what}, {args.target_per_class} train images per class, {args.val_per_class} "
        f"val per class, {args.image_size} px, {args.precision}, Adam head lr {args.lr:g}, "
        f"{args.epochs} epochs, seeds 0-{args.seeds - 1}; mean (min-max) over seeds. "
        f"{minutes:.0f} min in all.",
        "",
        "| run | best val acc | last val acc |",
        "|---|---|---|",
        *(_row(label, runs) for label, runs in rows),
    ]
    Path(args.out).write_text("\n".join(lines + [""] + table) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
