"""Orders and splits of sample positions that depend only on seeds, never on global RNG state.

Separate from the datasets so that the reproducibility rules (the same seed and epoch give the
same order; a class's validation split does not move when other classes change) sit in one place.
"""

import itertools
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
from torch.utils.data import DataLoader, Sampler

from tlfinetune.errors import DataError

__all__ = ["BalancedSampler", "EpochShuffleSampler", "ResumableDataLoader", "stratified_split"]


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

    def order(self, epoch: int | None = None) -> list[int]:
        """The positions epoch ``epoch`` (default: the current one) draws, in order."""
        return self.permutation(epoch)

    def __iter__(self) -> Iterator[int]:
        return iter(self.order())

    def __len__(self) -> int:
        return self.num_samples


class BalancedSampler(EpochShuffleSampler):
    """Draws with replacement so that each class comes up equally often, fixed by ``(seed, epoch)``.

    Each position is drawn with probability ``1 / (n_classes * count of its class)``, so in
    expectation every class fills the same share of an epoch, and an epoch has as many draws
    as the dataset has images (rare images repeat, common ones are partly left out), as
    ``torch.utils.data.WeightedRandomSampler`` with inverse class frequencies. Unlike that
    sampler, the draws depend only on ``(seed, epoch)``, so a run resumed at any epoch, or
    mid-epoch with :class:`ResumableDataLoader`, draws what an uninterrupted run drew.

    Args:
        labels: The label of each position.
        seed: Seed of the draws.
    """

    def __init__(self, labels: Sequence[int], seed: int = 0) -> None:
        super().__init__(len(labels), seed)
        labels_arr = np.asarray(labels, dtype=np.int64)
        _, inverse, counts = np.unique(labels_arr, return_inverse=True, return_counts=True)
        weights = 1.0 / counts[inverse]
        self.probabilities = weights / weights.sum()

    def order(self, epoch: int | None = None) -> list[int]:
        """The positions drawn in epoch ``epoch`` (default: the current one)."""
        e = self.epoch if epoch is None else int(epoch)
        # Its own stream (the trailing 1): not the shuffle's order of the same (seed, epoch).
        rng = np.random.default_rng([self.seed & 0xFFFFFFFF, abs(self.seed) >> 32, e, 1])
        return rng.choice(self.num_samples, self.num_samples, p=self.probabilities).tolist()


class ResumableDataLoader(DataLoader):
    """A DataLoader that can start an epoch part-way through, where a checkpoint left it.

    Lightning saves the ``state_dict()`` of a stateful training loader in every checkpoint and
    hands it to ``load_state_dict()`` on resume. The state is the epoch and how many of its
    batches had trained; the next pass over that same epoch leaves those batches out, drawing
    their positions from the sampler but loading none of their images. With the ``(seed,
    epoch)`` order of :class:`EpochShuffleSampler` each image of the interrupted epoch is then
    trained on exactly once across the two runs, as in an uninterrupted one. ``len`` stays the
    epoch's full batch count: Lightning counts the skipped batches as done.

    Args:
        *args: as for ``DataLoader``.
        progress: returns ``(epoch, batches of it that trained)`` for the running fit.
        **kwargs: as for ``DataLoader``.
    """

    def __init__(
        self, *args: Any, progress: Callable[[], tuple[int, int]] | None = None, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.progress = progress
        self._resume_at: tuple[int, int] | None = None  # (epoch, batches to skip in it)

    def state_dict(self) -> dict[str, int]:
        """``{"epoch", "batches"}``: where training stands."""
        if self.progress is None:
            return {}
        epoch, batches = self.progress()
        return {"epoch": int(epoch), "batches": int(batches)}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        """Remember where the checkpoint stood; the next pass over that epoch starts there."""
        if "epoch" in state_dict:
            self._resume_at = (int(state_dict["epoch"]), int(state_dict["batches"]))

    def _batches_to_skip(self) -> int:
        # Asked whenever a pass starts (DataLoader's iterators may ask twice for one pass). Only
        # passes over the checkpoint's own epoch skip: a checkpoint taken at an epoch's end must
        # not cut into the next epoch.
        if self._resume_at is None or self.progress is None:
            return 0
        epoch, batches = self._resume_at
        if epoch == self.progress()[0]:
            return batches
        self._resume_at = None  # that epoch is over
        return 0

    @property
    def _index_sampler(self) -> Any:
        # What DataLoader's iterators draw batch positions from (also with persistent workers,
        # which draw anew each epoch): skipping here loads none of the skipped images.
        return _SkipFirst(self, super()._index_sampler)


class _SkipFirst:
    """A batch sampler's batches without the first ones its loader skips in this pass."""

    def __init__(self, loader: ResumableDataLoader, batches: Iterable[Any]) -> None:
        self.loader, self.batches = loader, batches

    def __len__(self) -> int:
        return len(self.batches)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[Any]:
        return itertools.islice(iter(self.batches), self.loader._batches_to_skip(), None)


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
