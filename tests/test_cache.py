"""FeatureCache: same results as training through the images, invalidated when it must be."""

import lightning.pytorch as pl
import pytest
import torch
from tiny import tiny_tensors, trainer

from tlfinetune import FreezeSchedule, ImageDataModule, TransferClassifier
from tlfinetune.cache import FeatureCache


def data(augment=False, n=40, seed=0, num_workers=0):
    x, y = tiny_tensors(n=n, size=32, num_classes=3, seed=seed)
    images = x.permute(0, 2, 3, 1).contiguous()  # NHWC, as a Keras user has them
    return ImageDataModule.from_arrays(
        images[: n // 2 + 8],
        y[: n // 2 + 8],
        images[n // 2 + 8 :],
        y[n // 2 + 8 :],
        image_size=32,
        batch_size=8,
        augment=augment,
        num_workers=num_workers,
        seed=3,
    )


def fit(cache: bool, schedule: FreezeSchedule, epochs=3, dm=None, **trainer_kwargs):
    torch.manual_seed(0)
    model = TransferClassifier(backbone="test_vgg16", weights="none", feature_cache=cache)
    store = FeatureCache()  # serves only a model with feature_cache on: the one switch
    t = trainer(epochs, callbacks=[schedule, store], **trainer_kwargs)
    t.fit(model, dm or data())
    return model, store


def assert_same_weights(a, b):
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5, msg=name)


def test_frozen_regime_cached_equals_uncached():
    cached, store = fit(True, FreezeSchedule(regime="frozen"))
    plain, off = fit(False, FreezeSchedule(regime="frozen"))
    assert store.builds == 2 and off.builds == 0  # train + val, computed once for 3 epochs
    assert_same_weights(cached, plain)


class ActivePerEpoch(pl.Callback):
    def __init__(self, store):
        self.store, self.seen = store, []

    def on_train_epoch_end(self, trainer, pl_module):
        self.seen.append(self.store.active)


def test_first_epoch_trains_through_images_and_fills_the_cache_on_the_way():
    # Worker prefetching and Lightning's sanity-check batches must not confuse which dataset
    # positions a batch holds, nor leave a partial cache behind.
    torch.manual_seed(0)
    model = TransferClassifier(backbone="test_vgg16", weights="none")
    store = FeatureCache()
    epochs = ActivePerEpoch(store)
    t = trainer(3, callbacks=[FreezeSchedule(), store, epochs], num_sanity_val_steps=2)
    t.fit(model, data(num_workers=2))
    plain, _ = fit(False, FreezeSchedule(), epochs=3)
    assert epochs.seen == [False, True, True] and store.builds == 2
    assert_same_weights(model, plain)


class PrefixRuns(pl.Callback):
    """Per validation (the sanity check's too): batches through backbone[0], and val metrics."""

    def __init__(self):
        self.seen, self.count, self.handle = [], 0, None

    def on_validation_start(self, trainer, pl_module):
        self.count = 0
        if self.handle is None:
            self.handle = pl_module.backbone[0].register_forward_hook(self._count)

    def _count(self, *args):
        self.count += 1

    def on_validation_end(self, trainer, pl_module):
        metrics = {k: v.clone() for k, v in trainer.callback_metrics.items() if "val/" in k}
        self.seen.append((self.count, metrics))


@pytest.mark.parametrize("sanity", [1, 2])
def test_the_first_validation_reuses_what_the_sanity_check_computed(sanity):
    # 12 validation images in batches of 8: the sanity check runs the first `sanity` of them.
    runs = {}
    for cache in (True, False):
        torch.manual_seed(0)
        model = TransferClassifier(backbone="test_vgg16", weights="none", feature_cache=cache)
        seen = PrefixRuns()
        callbacks = [FreezeSchedule(), FeatureCache(), seen]
        t = trainer(3, callbacks=callbacks, num_sanity_val_steps=sanity)
        t.fit(model, data())
        runs[cache] = seen.seen
    # The sanity check, then each epoch's validation: the frozen backbone runs once per image.
    assert [count for count, _ in runs[True]] == [sanity, 2 - sanity, 0, 0]
    assert [count for count, _ in runs[False]] == [sanity, 2, 2, 2]
    for (_, cached), (_, plain) in zip(runs[True][1:], runs[False][1:], strict=True):
        assert cached.keys() == plain.keys() and len(cached) >= 2
        assert all(torch.equal(cached[k], plain[k]) for k in cached), (cached, plain)


def test_partial_regime_caches_the_frozen_prefix():
    def schedule():
        return FreezeSchedule(regime="partial", unfreeze_from="block5", backbone_lr_ratio=1.0)

    cached, store = fit(True, schedule(), epochs=2)
    plain, _ = fit(False, schedule(), epochs=2)
    assert store.builds == 2
    assert_same_weights(cached, plain)


def test_milestone_rebuilds_for_the_new_phase_and_matches():
    def schedule():
        return FreezeSchedule(regime="frozen", milestones={2: "block5"}, backbone_lr_ratio=0.5)

    cached, store = fit(True, schedule(), epochs=4)
    plain, _ = fit(False, schedule(), epochs=4)
    assert store.builds == 4  # (train, val) for the frozen phase, again after the unfreeze
    assert_same_weights(cached, plain)


def test_cache_stays_off_when_it_could_change_results():
    _, store = fit(True, FreezeSchedule(regime="frozen"), epochs=1, dm=data(augment=True))
    assert store.builds == 0 and not store.active
    _, store = fit(True, FreezeSchedule(regime="full"), epochs=1)
    assert store.builds == 0


def test_cache_key_changes_with_weights_and_data():
    dm = data()
    model = TransferClassifier(backbone="test_vgg16", weights="none")
    store = FeatureCache()
    t = trainer(1, callbacks=[FreezeSchedule(), store])
    t.fit(model, dm)
    store._trainer, store._module = t, model  # keys are computed from these
    key = store._key("train", dm.train_dataset, 31)
    assert store._key("train", dm.train_dataset, 24) != key
    other = data(seed=1)
    other.setup("fit")
    assert store._key("train", other.train_dataset, 31) != key
    with torch.no_grad():
        model.backbone[0].weight.add_(1e-3)
    assert store._key("train", dm.train_dataset, 31) != key


class Where(pl.Callback):
    """Where the cached features live at the end of each epoch (memory or a mapped file)."""

    def __init__(self, store):
        self.store, self.seen = store, []

    def on_train_epoch_end(self, trainer, pl_module):
        self.seen.append([self.store.features(s).is_shared() for s in ("train", "val")])


@pytest.mark.parametrize("budget_mb", [0])
def test_memory_budget_moves_features_to_a_file(tmp_path, budget_mb):
    torch.manual_seed(0)
    model = TransferClassifier(backbone="test_vgg16", weights="none")
    store = FeatureCache(memory_mb=budget_mb)
    where = Where(store)
    t = trainer(2, callbacks=[FreezeSchedule(), store, where], default_root_dir=tmp_path)
    t.fit(model, data())
    assert store.builds == 2
    assert where.seen[-1] == [True, True]  # train and val features memory-mapped
    assert list(tmp_path.iterdir()) == []  # and no file left behind when the fit ends


def test_epochs_the_cache_does_not_serve_reuse_the_datamodules_loader():
    # Lightning without the cache builds the train loader once; a new one per epoch would
    # restart its workers every epoch (seconds each with many workers on a GPU machine).
    dm, calls, iterated = data(), [], []
    own = dm._train_images  # the datamodule building its image loader
    dm._train_images = lambda: calls.append(1) or own()
    torch.manual_seed(0)
    model = TransferClassifier(backbone="test_vgg16", weights="none")
    store = FeatureCache()
    schedule = FreezeSchedule(regime="frozen", milestones={1: "block1"}, backbone_lr_ratio=0.5)
    seen = pl.Callback()
    seen.on_train_epoch_start = lambda t, m: iterated.append(t.train_dataloader)
    trainer(3, callbacks=[schedule, store, seen]).fit(model, dm)
    plain, _ = fit(False, FreezeSchedule("frozen", milestones={1: "block1"}, backbone_lr_ratio=0.5))
    assert len(calls) == 1 and len(iterated) == 3 and len({id(x) for x in iterated}) == 1
    assert store.builds == 0  # the frozen phase lasts one epoch: nothing would read a cache
    assert_same_weights(model, plain)
