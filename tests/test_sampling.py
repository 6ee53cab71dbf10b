"""Sampling: the split and the training order depend only on seeds, never on global state."""

import pytest

from tlfinetune.errors import DataError
from tlfinetune.sampling import EpochShuffleSampler, stratified_split


def test_stratified_split_function():
    labels = [0] * 10 + [1] * 3 + [2] * 1
    train, val = stratified_split(labels, 0.3, seed=5)
    assert sorted(train + val) == list(range(14)) and not set(train) & set(val)
    val_labels = [labels[i] for i in val]
    assert val_labels.count(0) == 3 and val_labels.count(1) == 1 and val_labels.count(2) == 0
    assert stratified_split(labels, 0.3, seed=5) == (train, val)
    # A class's split depends on its own members only, not on the other classes.
    _, val_b = stratified_split([0] * 10 + [1] * 7, 0.3, seed=5)
    assert [i for i in val_b if i < 10] == [i for i in val if i < 10]
    with pytest.raises(DataError, match="val_split"):
        stratified_split(labels, 1.0)


def test_sampler_order_depends_only_on_seed_and_epoch():
    fresh = EpochShuffleSampler(50, seed=7)
    fresh.set_epoch(3)
    used = EpochShuffleSampler(50, seed=7)
    for epoch in range(3):
        used.set_epoch(epoch)
        list(used)
    used.set_epoch(3)
    assert list(fresh) == list(used) == fresh.permutation(3)
    assert sorted(fresh) == list(range(50)) and len(fresh) == 50
    assert list(fresh) != fresh.permutation(4)
    assert fresh.permutation(3) != EpochShuffleSampler(50, seed=8).permutation(3)
