"""FreezeSchedule on the test_vgg16 stand-in: VGG16's module indices, 1/16 of its channels."""

import warnings

import lightning.pytorch as pl
import pytest
import torch
from tiny import TinyData, trainer

from tlfinetune import ConfigError, FreezeSchedule, TransferClassifier
from tlfinetune.freeze import REGIMES, regime_start


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before, module):
    """Names of the tensors of ``module`` that differ from ``before`` (bitwise)."""
    return {k for k, v in module.state_dict().items() if not torch.equal(v, before[k])}


def train(model, schedule, epochs=1, **kwargs):
    t = trainer(epochs, callbacks=[schedule] if schedule else [], **kwargs)
    t.fit(model, TinyData())
    return t


def test_frozen_regime_trains_only_the_head():
    model = TransferClassifier(backbone="test_vgg16", weights="none", num_classes=3, image_size=32)
    backbone0, head0 = snapshot(model.backbone), snapshot(model.head)
    train(model, FreezeSchedule(regime="frozen"), epochs=2)
    assert changed(backbone0, model.backbone) == set()
    assert changed(head0, model.head) == set(head0)


def test_default_schedule_is_frozen_when_trainer_has_none():
    # num_classes and image size from the data
    model = TransferClassifier(backbone="test_vgg16", weights="none")
    backbone0 = snapshot(model.backbone)
    train(model, None)
    assert changed(backbone0, model.backbone) == set()
    assert model.hparams.num_classes == 3 and model.hparams.class_names == ["c0", "c1", "c2"]


@pytest.mark.parametrize("spec", [15, "15", "block5_conv1", "block5"])
def test_partial_regime_trains_exactly_block5(spec):
    model = TransferClassifier(backbone="test_vgg16", weights="none", num_classes=3, image_size=32)
    backbone0 = snapshot(model.backbone)
    t = train(model, FreezeSchedule(regime="partial", unfreeze_from=spec, backbone_lr_ratio=1.0))
    assert changed(backbone0, model.backbone) == {
        f"{i}.{p}" for i in (24, 26, 28) for p in ("weight", "bias")
    }
    # Only trainable parameters reach the optimizer: block5 (6 tensors) and the head (4).
    groups = t.optimizers[0].param_groups
    assert [g["name"] for g in groups] == ["head", "backbone"]
    assert [len(g["params"]) for g in groups] == [4, 6]


def test_full_regime_trains_everything():
    model = TransferClassifier(backbone="test_vgg16", weights="none", num_classes=3, image_size=32)
    backbone0 = snapshot(model.backbone)
    train(model, FreezeSchedule(regime="full"))
    assert changed(backbone0, model.backbone) == set(backbone0)


def test_milestones_unfreeze_at_the_right_epoch_with_the_right_lr():
    model = TransferClassifier(backbone="test_vgg16", weights="none", num_classes=3, image_size=32)
    seen = []

    class Recorder(pl.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            seen.append(("start", trainer.current_epoch, snapshot(pl_module.backbone)))

        def on_train_epoch_end(self, trainer, pl_module):
            groups = trainer.optimizers[0].param_groups
            lrs = [g["lr"] for g in groups]
            grads = [
                i
                for i, m in enumerate(pl_module.backbone)
                for p in m.parameters()
                if p.requires_grad
            ]
            seen.append(("end", trainer.current_epoch, snapshot(pl_module.backbone), lrs, grads))

    schedule = FreezeSchedule(
        regime="frozen", milestones={1: "block5", 2: "block4_conv1"}, backbone_lr_ratio=0.1
    )
    t = trainer(3, callbacks=[schedule, Recorder()])
    t.fit(model, TinyData())
    starts = {e: s for kind, e, s, *_ in seen if kind == "start"}
    ends = {e: rest for kind, e, *rest in seen if kind == "end"}
    block5 = {f"{i}.{p}" for i in (24, 26, 28) for p in ("weight", "bias")}
    block4 = {f"{i}.{p}" for i in (17, 19, 21) for p in ("weight", "bias")}

    def diff(a, b):
        return {k for k in a if not torch.equal(a[k], b[k])}

    assert diff(starts[0], ends[0][0]) == set()  # nothing trains early
    assert diff(starts[1], ends[1][0]) == block5
    assert diff(starts[2], ends[2][0]) == block5 | block4
    assert set(ends[0][2]) == set() and set(ends[1][2]) == {24, 26, 28}
    for epoch in range(3):
        head_lr, backbone_lr = ends[epoch][1]
        assert backbone_lr == pytest.approx(head_lr * 0.1)


@pytest.mark.parametrize("scheduler", ["onecycle", "plateau"])
def test_lr_scheduler_keeps_working_across_the_unfreeze(scheduler):
    from functools import partial

    if scheduler == "onecycle":
        factory = partial(torch.optim.lr_scheduler.OneCycleLR, max_lr=0.01, total_steps=9)
    else:
        factory = partial(torch.optim.lr_scheduler.ReduceLROnPlateau, patience=0, factor=0.5)
    model = TransferClassifier(
        backbone="test_vgg16", weights="none", num_classes=3, image_size=32, lr_scheduler=factory
    )
    schedule = FreezeSchedule(regime="frozen", milestones={1: "block5"}, backbone_lr_ratio=0.5)
    t = trainer(3, callbacks=[schedule])
    backbone0 = snapshot(model.backbone)
    t.fit(model, TinyData())
    head, body = t.optimizers[0].param_groups
    assert body["lr"] == pytest.approx(head["lr"] * 0.5)
    assert changed(backbone0, model.backbone)  # block5 did train after the milestone


def test_frozen_batchnorm_keeps_running_stats():
    model = TransferClassifier(backbone="vgg11_bn", weights="none", num_classes=3, image_size=32)
    bn0 = {k: v.clone() for k, v in model.backbone.state_dict().items() if "running" in k}
    assert bn0
    train(model, FreezeSchedule(regime="frozen"), epochs=2)
    after = model.backbone.state_dict()
    assert all(torch.equal(after[k], v) for k, v in bn0.items())


def test_trainable_batchnorm_updates_running_stats_in_partial_regime():
    model = TransferClassifier(backbone="vgg11_bn", weights="none", num_classes=3, image_size=32)
    state0 = snapshot(model.backbone)
    train(model, FreezeSchedule(regime="partial", unfreeze_from="block5"))
    moved = {k for k in changed(state0, model.backbone) if "running_mean" in k}
    first = min(int(k.split(".")[0]) for k in moved)
    assert moved and first >= 22  # block5 of vgg11_bn starts at module 22


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(regime="partial", unfreeze_from="block9"), ["block9", "block5"]),
        (dict(regime="partial", unfreeze_from=40), ["40", "0-18"]),
        (dict(milestones={3: "block4", 6: "block5"}), ["milestone 6", "unfreezes nothing new"]),
    ],
)
def test_schedule_mistakes_are_reported_with_choices(kwargs, words):
    model = TransferClassifier(backbone="test_vgg16", weights="none", num_classes=3, image_size=32)
    with pytest.raises(ConfigError) as err:
        train(model, FreezeSchedule(**kwargs))
    for w in words:
        assert w in str(err.value)


def test_regime_start_is_the_one_regime_vocabulary():
    assert REGIMES == ("frozen", "partial", "full")
    assert [regime_start(r, "vgg16", 15, 31) for r in REGIMES] == [31, 24, 0]
    for regime in REGIMES:  # a typo in unfreeze_from fails whatever the regime
        with pytest.raises(ConfigError, match="block5_conv1"):
            regime_start(regime, "vgg16", "blok5", 31)
    with pytest.raises(ConfigError, match="frozen, partial, full"):
        FreezeSchedule(regime="some")


def test_a_frozen_fit_does_not_warn_about_its_frozen_layers_in_eval_mode(one_thread):
    """The frozen prefix is in eval mode on purpose; Lightning's warning about it is noise."""
    model = TransferClassifier(backbone="test_vgg16", weights="none", num_classes=3, image_size=32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(1, callbacks=[FreezeSchedule(regime="partial")]).fit(model, TinyData())
    assert not model.backbone[0].training  # block1 ran frozen, in eval mode
    assert not [w for w in caught if "in eval mode at the start" in str(w.message)]
