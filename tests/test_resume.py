"""Resume: a run stopped at an epoch boundary and resumed ends where an uninterrupted one ends."""

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from tiny import tiny_tensors

from tlfinetune import FreezeSchedule, ImageDataModule, TransferClassifier
from tlfinetune.cache import FeatureCache
from tlfinetune.runs import AtomicCheckpointIO

pytestmark = pytest.mark.slow


def datamodule(workers):
    x, y = tiny_tensors(n=40, size=32, num_classes=3, seed=1)
    x = x.permute(0, 2, 3, 1)
    return ImageDataModule.from_arrays(
        x[:28],
        y[:28],
        x[28:],
        y[28:],
        image_size=32,
        batch_size=8,
        augment=False,
        num_workers=workers,
        seed=5,
    )


class ValMetrics(pl.Callback):
    """Each epoch's validation metrics (not the sanity check's)."""

    def __init__(self):
        self.epochs = {}

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            metrics = trainer.callback_metrics.items()
            self.epochs[trainer.current_epoch] = {k: v.clone() for k, v in metrics if "val/" in k}


def run(
    folder, epochs, milestone, ckpt=None, cache=True, workers=0, dropout=0.3, **family
):  # family: another backbone and its FreezeSchedule, instead of VGG's milestone
    pl.seed_everything(7)
    backbone = family.get("backbone", "test_vgg16")
    model = TransferClassifier(
        backbone=backbone, weights="none", head_dropout=dropout, feature_cache=cache
    )
    schedule = family.get("schedule") or FreezeSchedule(
        regime="frozen", milestones={milestone: "block5"}, backbone_lr_ratio=0.5
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=epochs,
        deterministic=True,
        logger=False,
        default_root_dir=folder,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[
            schedule,
            ModelCheckpoint(dirpath=folder / "ckpt", save_last=True),
            FeatureCache(),  # serves only when the model's feature_cache is on
            ValMetrics(),
        ],
        plugins=[AtomicCheckpointIO()],
    )
    trainer.fit(model, datamodule(workers), ckpt_path=ckpt)
    return model, trainer


@pytest.mark.parametrize(
    "milestone, cache, workers",
    [(1, True, 0), (3, True, 0), (1, False, 2), (3, False, 0)],
    ids=["milestone-before-ckpt", "milestone-after-ckpt", "workers-uncached", "uncached"],
)
def test_resumed_run_equals_uninterrupted(tmp_path, milestone, cache, workers):
    whole, t_whole = run(tmp_path / "a", 4, milestone, cache=cache, workers=workers)
    run(tmp_path / "b", 2, milestone, cache=cache, workers=workers)
    last = tmp_path / "b" / "ckpt" / "last.ckpt"
    resumed, t_resumed = run(tmp_path / "b", 4, milestone, ckpt=last, cache=cache, workers=workers)
    assert t_resumed.current_epoch == 4
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6, msg=name)
    grads = [[p.requires_grad for p in m.parameters()] for m in (whole, resumed)]
    assert grads[0] == grads[1]
    lrs = [[g["lr"] for g in t.optimizers[0].param_groups] for t in (t_whole, t_resumed)]
    assert lrs[0] == lrs[1] and len(lrs[0]) == 2
    # Validation after the resume too (its sanity check ran the frozen prefix of epoch 0's
    # phase, before the epoch was restored: nothing of it may serve epoch 2's validation).
    whole_val, resumed_val = (
        next(c for c in t.callbacks if isinstance(c, ValMetrics)).epochs
        for t in (t_whole, t_resumed)
    )
    assert sorted(resumed_val) == [2, 3]
    for epoch, metrics in resumed_val.items():
        assert metrics.keys() == whole_val[epoch].keys() and len(metrics) >= 2
        for name, value in metrics.items():
            torch.testing.assert_close(value, whole_val[epoch][name], rtol=0, atol=1e-6)


def test_resumed_batchnorm_family_equals_uninterrupted(tmp_path):
    """RegNet (BatchNorm in every block): block4 trains from the start, block3 from epoch 3,
    after the checkpoint of epoch 2; the stem and block1-2 stay frozen throughout."""

    def schedule():
        return FreezeSchedule(regime="partial", unfreeze_from="block4", milestones={3: "block3"})

    pl.seed_everything(7)
    init = TransferClassifier(backbone="test_regnet", weights="none").backbone.state_dict()
    whole, _ = run(tmp_path / "a", 4, None, backbone="test_regnet", schedule=schedule())
    run(tmp_path / "b", 2, None, backbone="test_regnet", schedule=schedule())
    last = tmp_path / "b" / "ckpt" / "last.ckpt"
    resumed, t_resumed = run(
        tmp_path / "b", 4, None, ckpt=last, backbone="test_regnet", schedule=schedule()
    )
    assert t_resumed.current_epoch == 4
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name  # weights and BatchNorm statistics, bit for bit
    stats = {k: v for k, v in resumed.backbone.state_dict().items() if k.endswith("running_mean")}
    moved = {k.split(".")[0].split("_")[0] for k, v in stats.items() if not torch.equal(v, init[k])}
    assert moved == {"block3", "block4"}  # the frozen stem and block1-2 kept theirs
