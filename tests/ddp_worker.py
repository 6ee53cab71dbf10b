"""`python ddp_worker.py OUT`: the DDP runs of test_distributed.py, test_cache_ddp.py and
test_report.py.

2-process DDP (gloo) on CPU. The runs share one launch (conftest's ``ddp_runs`` fixture): each
launch costs two interpreter starts, one after the other, most of a DDP test's time. Each run
writes under OUT/<its name>: milestone, cache (cache_ddp_worker.py), report.
"""

import json
import sys
from pathlib import Path

import cache_ddp_worker
import lightning.pytorch as pl
import torch
from tiny import TinyData
from tiny import trainer as tiny_trainer
from torch.utils.data import DataLoader, TensorDataset

from tlfinetune import FreezeSchedule, TransferClassifier
from tlfinetune.predict import PredictionWriter
from tlfinetune.report import EvaluationReport


def milestone_run(out: Path) -> None:
    """Partial regimes whose milestone unfreezes a block at epoch 2: VGG (then 9 images
    predicted) and RegNet (a BatchNorm family)."""
    pl.seed_everything(0)
    model = TransferClassifier(
        backbone="test_vgg16", weights="none", num_classes=3, image_size=32, channels_last=False
    )
    init = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    trainer = tiny_trainer(
        3,
        callbacks=[
            FreezeSchedule(regime="partial", unfreeze_from="block5", milestones={2: "block4"})
        ],
        devices=2,
        strategy="ddp",
    )
    trainer.fit(model, TinyData(n=32))
    metrics = {k: v.item() for k, v in trainer.callback_metrics.items()}
    writer = PredictionWriter(output=str(out / "predictions.csv"))
    predictor = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        logger=False,
        callbacks=[writer],
        enable_progress_bar=False,
    )
    images = TinyData(n=9).x  # 9 images: the distributed sampler pads one rank with a repeat
    loader = DataLoader(TensorDataset(images, torch.arange(9)), batch_size=2)
    predictor.predict(model, loader, return_predictions=False)
    # A BatchNorm family: block4 trains from the start, block3 from epoch 2 (after DDP wrapped).
    pl.seed_everything(0)
    bn = TransferClassifier(backbone="test_regnet", weights="none", num_classes=3, image_size=32)
    bn_init = {k: v.clone() for k, v in bn.backbone.state_dict().items()}
    schedule = FreezeSchedule(regime="partial", unfreeze_from="block4", milestones={2: "block3"})
    bn_trainer = tiny_trainer(3, callbacks=[schedule], devices=2, strategy="ddp")
    bn_trainer.fit(bn, TinyData(n=32))
    rank = trainer.global_rank
    torch.save(
        {
            "init": init,
            "final": model.backbone.state_dict(),
            "metrics": metrics,
            "bn_init": bn_init,
            "bn_final": bn.backbone.state_dict(),
        },
        out / f"rank{rank}.pt",
    )


def report_run(out: Path) -> None:
    """`Trainer.test` with the evaluation report: rank 0 writes it, from both ranks' images."""
    data = TinyData(n=26)  # 13 per process: no sample repeated by the DistributedSampler
    model = TransferClassifier(backbone="test_vgg16", weights="none", num_classes=3, image_size=32)
    t = tiny_trainer(
        devices=2,
        strategy="ddp",
        default_root_dir=out,
        callbacks=[EvaluationReport(max_mistakes=5)],
    )
    (logged,) = t.test(model, data)
    if t.global_rank == 0:
        (out / "logged.json").write_text(json.dumps(logged))


RUNS = {"milestone": milestone_run, "cache": cache_ddp_worker.run, "report": report_run}

if __name__ == "__main__":
    root = Path(sys.argv[1])
    for name, run in RUNS.items():
        (root / name).mkdir(exist_ok=True)
        run(root / name)
