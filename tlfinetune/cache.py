"""FeatureCache: compute the frozen part of the backbone once, train the rest from the cache.

When the first ``k`` backbone modules are frozen and the training images are deterministic
(``augment: false``), every epoch computes exactly the same ``backbone[:k]`` output for each
image. The first epoch of each freeze phase trains and validates through the images as usual;
a forward hook on ``backbone[k - 1]`` keeps each batch's output, placed by the dataset positions
the batch sampler drew, so filling the cache costs no extra pass. Later epochs of the phase get
batches of those features in the same ``(seed, epoch)`` order the images would have come in and
skip decoding and the frozen layers entirely. ``k`` is the whole backbone in the ``frozen``
regime ("fast feature extraction") and blocks 1-4 for the seed's fine-tuning.

It switches itself off whenever it could change results or not pay off: augmentation on, a
DataModule that does not say its training images are deterministic, ``limit_train_batches``,
several processes (each DDP rank would need its own shard), or features larger than the images.
Features live in memory up to ``memory_mb``, beyond that in a memory-mapped file in the run
folder. The cache is keyed by the frozen weights, image size, transforms, data and precision:
any change rebuilds it.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

log = logging.getLogger(__name__)


class CachedBatch(NamedTuple):
    """A batch of backbone features: ``backbone[start:]`` and the head still have to run."""

    features: torch.Tensor  # (B, C, H, W): output of backbone[:start]
    labels: torch.Tensor  # (B,)
    start: int


class _Features(Dataset):
    """Indexed by a whole batch of positions at once: one gather instead of B small copies."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor, start: int) -> None:
        self.features, self.labels, self.start = features, labels, start

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, positions: list[int]) -> CachedBatch:
        idx = torch.as_tensor(positions)
        return CachedBatch(self.features[idx], self.labels[idx], self.start)


class _Batches(Sampler[list[int]]):
    """Batches of the given sampler's order; forwards ``set_epoch`` so the order is the same."""

    def __init__(self, sampler: Any, batch_size: int) -> None:
        self.sampler, self.batch_size = sampler, batch_size
        self.order: list[int] = []  # the positions of the current pass, in batch order

    def set_epoch(self, epoch: int) -> None:  # noqa: D102
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[list[int]]:
        self.order = list(self.sampler)  # kept: a cache being filled reads which images came
        for i in range(0, len(self.order), self.batch_size):
            yield self.order[i : i + self.batch_size]

    def __len__(self) -> int:
        return -(-len(self.sampler) // self.batch_size)


class _Capture:
    """A cache being filled during one pass: ``batches`` says which images each batch holds."""

    def __init__(self, key: str, start: int, n: int, batches: _Batches) -> None:
        self.key, self.start, self.n, self.batches = key, start, n, batches
        self.features: torch.Tensor | None = None
        self.where = ""
        self.labels = torch.empty(n, dtype=torch.long)
        self.filled = torch.zeros(n, dtype=torch.bool)

    def positions(self, batch_idx: int) -> torch.Tensor:
        size = self.batches.batch_size
        return torch.as_tensor(self.batches.order[batch_idx * size :][:size], dtype=torch.long)


class FeatureCache(pl.Callback):
    """Serve the frozen backbone prefix's output from a cache while it cannot change.

    Args:
        enabled: switch the cache off entirely.
        memory_mb: features up to this size stay in memory; larger ones go to a memory-mapped
            file under the run folder.
    """

    def __init__(self, enabled: bool = True, memory_mb: int = 2048) -> None:
        self.enabled = enabled
        self.memory_mb = memory_mb
        self.active = False  # whether the current epoch's training batches come from the cache
        self.builds = 0  # how many caches were computed (tests and benchmarks read it)
        self._store: dict[str, tuple[str, torch.Tensor, torch.Tensor]] = {}
        self._trainer: pl.Trainer | None = None
        self._module: Any = None
        self._loaders: dict[str, Any] = {}
        self._keys: dict[tuple[str, int], str] = {}
        self._capture: dict[str, _Capture] = {}
        self._originals: dict[str, Any] = {}  # the datamodule's own loaders, asked for once
        self._hook: Any = None
        self._worth: dict[int, bool] = {}

    # --- when it is safe ---------------------------------------------------------------------

    def _why_not(self, trainer: pl.Trainer) -> str | None:
        dm = trainer.datamodule
        if not self.enabled:
            return "switched off"
        if dm is None or not hasattr(dm, "train_dataset"):
            return "no datamodule with a train_dataset"
        if getattr(dm, "augment", True) or getattr(dm, "trivial_augment", False):
            return "training images are augmented (set data.augment: false to cache)"
        if trainer.world_size > 1:
            return "several processes"
        if trainer.limit_train_batches != 1.0 or trainer.limit_val_batches not in (0, 1.0):
            return "limit_train_batches / limit_val_batches are set"
        if trainer.reload_dataloaders_every_n_epochs:
            return "reload_dataloaders_every_n_epochs is set"
        return None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Take over the datamodule's train/val loaders for this fit, if caching is safe."""
        if stage != "fit":
            return
        why = self._why_not(trainer)
        if why:
            log.info(f"Feature cache off: {why}.")
            return
        self._trainer, self._module = trainer, pl_module
        # Which freeze phases would be served (the model is still on the CPU here).
        self._worth = {start: self._pays_off(start) for start in self._phase_starts()}
        if not any(self._worth.values()):
            log.info("Feature cache off: no freeze phase has a frozen prefix worth caching.")
            return
        dm = trainer.datamodule
        self._loaders = {"train": dm.train_dataloader, "val": dm.val_dataloader}
        # Lightning asks for loaders again every epoch; each call decides: cache or images.
        dm.train_dataloader = lambda: self._loader("train")
        dm.val_dataloader = lambda: self._loader("val")
        trainer.reload_dataloaders_every_n_epochs = 1

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Give the datamodule its own loaders back and free the features."""
        if self._loaders:
            trainer.datamodule.train_dataloader = self._loaders["train"]
            trainer.datamodule.val_dataloader = self._loaders["val"]
            trainer.reload_dataloaders_every_n_epochs = 0
        self._disarm()
        self._loaders, self._store, self._keys, self._capture = {}, {}, {}, {}
        self._originals = {}
        self.active = False

    # --- serving -----------------------------------------------------------------------------

    def _schedule(self) -> Any:
        from tlfinetune.freeze import FreezeSchedule

        return FreezeSchedule.find(self._trainer)

    def _phase_starts(self) -> list[int]:
        return [start for _, start in self._schedule().resolve(
            self._module.hparams.backbone, len(self._module.backbone)
        )]  # fmt: skip

    def _frozen_prefix(self, epoch: int) -> int:
        return self._schedule().trainable_from(epoch)

    def _loader(self, split: str) -> Any:
        trainer, dm = self._trainer, self._trainer.datamodule
        start = self._frozen_prefix(trainer.current_epoch)
        # Lightning without the cache asks for each loader once: keep that one loader (and its
        # persistent workers) for the epochs the cache does not serve, instead of a new one each.
        if split not in self._originals:
            self._originals[split] = self._loaders[split]()
        original = self._originals[split]
        # A capture belongs to the loader made with it: Lightning may ask again (on resume, the
        # first call comes before the checkpoint's epoch is restored) and iterate only the last.
        self._capture.pop(split, None)
        if split == "train":
            self.active = False
        if not self._worth.get(start, False):
            return original
        dataset = dm.train_dataset if split == "train" else dm.val_dataset
        if (split, start) not in self._keys:  # the prefix is frozen for the whole phase
            self._keys[(split, start)] = self._key(split, dataset, start)
        key = self._keys[(split, start)]
        cached = self._store.get(split)
        if cached is None or cached[0] != key:
            if not self._served_later(start):
                return original  # the phase ends with this epoch: nothing would read the cache
            # This pass trains (or validates) through the images as usual and fills the cache
            # on the way: the first epoch of a phase costs what an uncached epoch costs.
            batches = _Batches(original.sampler, original.batch_size)
            self._capture[split] = _Capture(key, start, len(dataset), batches)
            return DataLoader(
                dataset,
                batch_sampler=batches,
                num_workers=original.num_workers,
                collate_fn=original.collate_fn,
                pin_memory=original.pin_memory,
            )
        _, features, labels = cached
        if split == "train":
            self.active = True
            sampler = original.sampler  # the (seed, epoch) order the images would come in
        else:
            sampler = range(len(labels))
        return DataLoader(
            _Features(features, labels, start),
            sampler=_Batches(sampler, original.batch_size),
            batch_size=None,
        )

    def _served_later(self, start: int) -> bool:
        """Whether an epoch after this one runs with the same frozen prefix."""
        trainer = self._trainer
        following = trainer.current_epoch + 1
        last = trainer.max_epochs if trainer.max_epochs is not None else -1
        return (last < 0 or following < last) and self._frozen_prefix(following) == start

    def _pays_off(self, start: int) -> bool:
        if start == 0:
            return False
        size = self._module.hparams.image_size or self._trainer.datamodule.image_size
        with torch.no_grad():
            device = next(self._module.backbone.parameters()).device
            out = self._module.backbone[:start](torch.zeros(1, 3, size, size, device=device))
        return out.numel() < 3 * size * size  # else reading images is cheaper than the cache

    # --- building ----------------------------------------------------------------------------

    def _key(self, split: str, dataset: Any, start: int) -> str:
        h = hashlib.sha1()
        module, dm = self._module, self._trainer.datamodule
        for part in (
            split,
            start,
            module.hparams.backbone,
            module.hparams.image_size,
            module.hparams.channels_last,
            self._trainer.precision,
            repr(getattr(dataset, "transform", None)),
            len(dataset),
            getattr(dm, "seed", None),
        ):
            h.update(repr(part).encode())
        for p in module.backbone[:start].state_dict().values():
            h.update(memoryview(p.detach().cpu().contiguous().view(torch.uint8).numpy()))
        for name in ("files", "images", "labels"):  # what the dataset is made of
            value = getattr(dataset, name, None)
            if isinstance(value, torch.Tensor):
                h.update(value.contiguous().view(torch.uint8).numpy().tobytes())
            elif value is not None:
                h.update(repr(value).encode())
        return h.hexdigest()[:16]

    # --- capturing ---------------------------------------------------------------------------

    def on_train_batch_start(  # noqa: D102
        self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int
    ) -> None:
        self._arm("train", batch, batch_idx)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, *args: Any) -> None:  # noqa: D102
        self._disarm()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: Any) -> None:  # noqa: D102
        self._finish("train")

    def on_validation_batch_start(  # noqa: D102
        self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int, *args: Any
    ) -> None:
        if not trainer.sanity_checking:  # a few batches only: they must not start a capture
            self._arm("val", batch, batch_idx)

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: Any, *args: Any) -> None:  # noqa: D102
        self._disarm()

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: Any) -> None:  # noqa: D102
        if not trainer.sanity_checking:
            self._finish("val")

    def _arm(self, split: str, batch: Any, batch_idx: int) -> None:
        capture = self._capture.get(split)
        if capture is None or isinstance(batch, CachedBatch):
            return
        positions, labels = capture.positions(batch_idx), torch.as_tensor(batch[1]).cpu()
        if len(positions) != len(labels):  # not the loader this capture recorded: never guess
            self._capture.pop(split)
            return
        capture.labels[positions] = labels
        last_frozen = self._module.backbone[capture.start - 1]
        self._hook = last_frozen.register_forward_hook(
            lambda _m, _in, out: self._keep(capture, positions, out)
        )

    def _disarm(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def _keep(self, capture: _Capture, positions: torch.Tensor, out: torch.Tensor) -> None:
        # The frozen prefix runs exactly as the cache would run it: same images, eval-mode
        # layers, same autocast. Its output for these dataset positions is the cache entry.
        out = out.detach().cpu()
        if capture.features is None:
            capture.features, capture.where = self._allocate(capture.n, out, capture.key)
        capture.features[positions] = out
        capture.filled[positions] = True

    def _finish(self, split: str) -> None:
        self._disarm()
        capture = self._capture.pop(split, None)
        if capture is None or capture.features is None or not bool(capture.filled.all()):
            return  # an epoch that did not see every image (stopped early) caches nothing
        self._store[split] = (capture.key, capture.features, capture.labels)
        self.builds += 1
        size_mb = capture.features.numel() * capture.features.element_size() / 2**20
        log.info(
            f"Feature cache: {capture.n} {split} images through backbone[:{capture.start}] "
            f"while training, {size_mb:.1f} MB in {capture.where}; later epochs skip them."
        )

    def _allocate(self, n: int, sample: torch.Tensor, key: str) -> tuple[torch.Tensor, str]:
        shape = (n, *sample.shape[1:])
        numel = int(torch.Size(shape).numel())
        nbytes = numel * sample.element_size()
        if nbytes <= self.memory_mb * 2**20:
            return torch.empty(shape, dtype=sample.dtype), "memory"
        folder = Path(self._trainer.log_dir or self._trainer.default_root_dir) / "feature_cache"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{key}.bin"
        with open(path, "wb") as f:  # from_file maps an existing file of the full size
            f.truncate(nbytes)
        storage = torch.from_file(str(path), shared=True, size=numel, dtype=sample.dtype)
        return storage.view(shape), str(path)
