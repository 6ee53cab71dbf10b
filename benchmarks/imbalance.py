"""Imbalanced classes: balanced accuracy with no remedy, with auto class weights, sampled balanced.

A synthetic three-class task whose class is which colour channel is a little brighter than the
others (noisy, so the classes overlap), with 10:1 imbalance in training (200 / 20 / 20 images)
and a balanced validation set (60 per class). Each setting trains the same model (the
``test_vgg16`` stand-in backbone, random init, ``full`` regime, Adam 1e-3, 32 px) for the same
epochs from the same seeds; the score is the balanced accuracy (mean per-class recall) of the
last epoch on the validation set, from the same report code ``validate`` uses.

    python benchmarks/imbalance.py --seeds 0 1 2 --epochs 6

Results are in benchmarks/README.md ("Imbalanced classes").
"""

from __future__ import annotations

import argparse
import logging
import statistics
import warnings

import lightning.pytorch as pl
import torch

from tlfinetune import FreezeSchedule, ImageDataModule, TransferClassifier
from tlfinetune.report import compute_metrics, evaluate

SETTINGS = {
    "none": {},
    "class_weights auto": {"class_weights": "auto"},
    "sampler balanced": {"sampler": "balanced"},
}


def images(counts: list[int], seed: int, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """NHWC uint8 images: noise, plus a small lift of the class's colour channel."""
    g = torch.Generator().manual_seed(seed)
    y = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    x = torch.randint(0, 160, (len(y), 3, size, size), generator=g)
    x[torch.arange(len(y)), y] += 40
    return x.clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1), y


def run(setting: str, seed: int, epochs: int) -> dict[str, float]:
    """One fit; the validation set's accuracy and balanced accuracy after the last epoch."""
    options = SETTINGS[setting]
    train_x, train_y = images([200, 20, 20], seed=100 + seed)
    val_x, val_y = images([60, 60, 60], seed=999)  # the same validation set for every run
    dm = ImageDataModule.from_arrays(
        train_x, train_y, val_x, val_y, class_names=["big", "small1", "small2"],
        image_size=32, batch_size=32, num_workers=0, augment=False, seed=seed,
        sampler=options.get("sampler", "random"),
    )  # fmt: skip
    pl.seed_everything(seed, verbose=False)
    model = TransferClassifier(
        backbone="test_vgg16", weights="none", class_weights=options.get("class_weights")
    )
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=epochs, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        callbacks=[FreezeSchedule(regime="full", backbone_lr_ratio=1.0)],
    )  # fmt: skip
    trainer.fit(model, dm)
    metrics = compute_metrics(evaluate(model, dm.val_dataloader()))
    return {"accuracy": metrics["accuracy"], "balanced_accuracy": metrics["balanced_accuracy"]}


def main() -> None:  # noqa: D103
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=6)
    args = parser.parse_args()
    logging.getLogger("tlfinetune").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    rows = {s: [] for s in SETTINGS}
    for seed in args.seeds:  # settings interleaved within each seed
        for setting in SETTINGS:
            result = run(setting, seed, args.epochs)
            rows[setting].append(result)
            print(f"seed {seed} {setting:<20} {result}", flush=True)
    print("\n| setting | balanced accuracy per seed | mean | accuracy (mean) |")
    print("|---|---|---|---|")
    for setting, results in rows.items():
        bal = [r["balanced_accuracy"] for r in results]
        acc = statistics.mean(r["accuracy"] for r in results)
        shown = ", ".join(f"{b:.3f}" for b in bal)
        print(f"| {setting} | {shown} | {statistics.mean(bal):.3f} | {acc:.3f} |")


if __name__ == "__main__":
    main()
