"""Orders and splits of sample positions that depend only on seeds, never on global RNG state.

Separate from the datasets so that the reproducibility rules (the same seed and epoch give the
same order; a class's validation split does not move when other classes change) sit in one place.
"""

import math
from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler

from tlfinetune.errors import DataError

__all__ = ["EpochShuffleSampler", "stratified_split"]


class EpochShuffleSampler(Sampler[int]):
    """A random order of ``range(num_samples)`` that depends only on ``(seed, epoch)``.

    Unlike ``shuffle=True`` (whose order depends on how many epochs this process has already
    drawn from the global generator), resuming at epoch ``e`` reproduces exactly the order an
    uninterrupted run used at epoch ``e``. Lightning calls :meth:`set_epoch` at the start of every
    epoch, also through its distributed sampler wrapper; the order is fixed when iteration starts.

    Args:
        num_samples: Size of the dataset.
        seed: Seed of the shuffling.
    """

    def __init__(self, num_samples: int, seed: int = 0) -> None:
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Selects the order of epoch ``epoch`` for the next iteration."""
        self.epoch = int(epoch)

    def permutation(self, epoch: int | None = None) -> list[int]:
        """The order of epoch ``epoch`` (default: the current one)."""
        e = self.epoch if epoch is None else int(epoch)
        rng = np.random.default_rng([self.seed & 0xFFFFFFFF, abs(self.seed) >> 32, e])
        return rng.permutation(self.num_samples).tolist()

    def __iter__(self) -> Iterator[int]:
        return iter(self.permutation())

    def __len__(self) -> int:
        return self.num_samples


def stratified_split(
    labels: Sequence[int], val_split: float, seed: int = 0
) -> tuple[list[int], list[int]]:
    """Splits sample positions into train and validation positions, class by class.

    Each class ``c`` with ``n >= 2`` samples gives ``round(n * val_split)`` of them (at least one,
    at most ``n - 1``) to validation, chosen by a random stream seeded by ``(seed, c)``; a class
    with a single sample stays in train. So a class's split does not change when other classes
    gain or lose samples, and the same inputs always give the same split.

    Args:
        labels: The label of each sample, in sample order.
        val_split: Fraction of each class that goes to validation, in ``(0, 1)``.
        seed: Seed of the split.

    Returns:
        Sorted train positions and sorted validation positions (disjoint; together all).
    """
    if not 0.0 < val_split < 1.0:
        raise DataError(
            f"val_split must be a fraction between 0 and 1 (exclusive), got {val_split}."
        )
    labels_arr = np.asarray(labels, dtype=np.int64)
    train: list[int] = []
    val: list[int] = []
    for c in np.unique(labels_arr):
        members = np.flatnonzero(labels_arr == c)
        n = len(members)
        n_val = 0 if n < 2 else min(n - 1, max(1, math.floor(n * val_split + 0.5)))
        rng = np.random.default_rng([seed & 0xFFFFFFFF, abs(seed) >> 32, int(c)])
        chosen = rng.permutation(n)
        val.extend(members[chosen[:n_val]].tolist())
        train.extend(members[chosen[n_val:]].tolist())
    return sorted(train), sorted(val)
