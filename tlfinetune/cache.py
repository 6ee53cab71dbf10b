"""FeatureCache: compute the frozen part of the backbone once, train the rest from the cache.

When the first ``k`` backbone modules are frozen and the training images are deterministic
(``augment: false``), every epoch computes exactly the same ``backbone[:k]`` output for each
image. The cache computes it once per freeze phase, in one pass over the data, and then serves
batches of those features in the same ``(seed, epoch)`` order the images would have come in:
later epochs skip decoding and the frozen layers entirely. ``k`` is the whole backbone in the
``frozen`` regime ("fast feature extraction") and blocks 1-4 for the seed's fine-tuning.

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

    def set_epoch(self, epoch: int) -> None:  # noqa: D102
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[list[int]]:
        order = list(self.sampler)
        for i in range(0, len(order), self.batch_size):
            yield order[i : i + self.batch_size]

    def __len__(self) -> int:
        return -(-len(self.sampler) // self.batch_size)


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
        self._loaders, self._store, self._keys, self.active = {}, {}, {}, False

    # --- serving -----------------------------------------------------------------------------

    def _schedule(self) -> Any:
        from tlfinetune.freeze import FreezeSchedule

        return next(c for c in self._trainer.callbacks if isinstance(c, FreezeSchedule))

    def _phase_starts(self) -> list[int]:
        return [start for _, start in self._schedule().resolve(
            self._module.hparams.backbone, len(self._module.backbone)
        )]  # fmt: skip

    def _frozen_prefix(self, epoch: int) -> int:
        return self._schedule().trainable_from(epoch)

    def _loader(self, split: str) -> Any:
        trainer, dm = self._trainer, self._trainer.datamodule
        start = self._frozen_prefix(trainer.current_epoch)
        original = self._loaders[split]()
        dataset = dm.train_dataset if split == "train" else dm.val_dataset
        if not self._worth.get(start, False):
            self.active = False if split == "train" else self.active
            return original
        features, labels = self._features(split, dataset, start, original)
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

    def _features(
        self, split: str, dataset: Any, start: int, original: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # The prefix is frozen for the whole phase, so its key is computed once per phase.
        if (split, start) not in self._keys:
            self._keys[(split, start)] = self._key(split, dataset, start)
        key = self._keys[(split, start)]
        cached = self._store.get(split)
        if cached and cached[0] == key:
            return cached[1], cached[2]
        features, labels = self._compute(dataset, start, original, key)
        self._store[split] = (key, features, labels)
        return features, labels

    @torch.no_grad()
    def _compute(
        self, dataset: Any, start: int, original: Any, key: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One pass over the data in order, through backbone[:start] exactly as training runs it."""
        module, trainer = self._module, self._trainer
        prefix = module.backbone[:start]
        was_training = prefix.training
        prefix.eval()  # frozen layers run in eval mode in training too (Keras semantics)
        loader = DataLoader(
            dataset,
            batch_size=original.batch_size,
            num_workers=original.num_workers,
            collate_fn=original.collate_fn,
        )
        features: torch.Tensor | None = None
        labels = torch.empty(len(dataset), dtype=torch.long)
        i = 0
        for x, y in loader:
            x = x.to(module.device)
            with trainer.precision_plugin.forward_context():
                f = prefix(module.normalize(x)).cpu()
            if features is None:
                features, where = self._allocate(len(dataset), f, key)
            features[i : i + len(f)] = f
            labels[i : i + len(f)] = torch.as_tensor(y)
            i += len(f)
        prefix.train(was_training)
        module.train(module.training)  # frozen BatchNorm back to eval
        self.builds += 1
        size_mb = features.numel() * features.element_size() / 2**20
        log.info(
            f"Feature cache: {i} images through backbone[:{start}] once, {size_mb:.1f} MB "
            f"in {where}; later epochs skip them."
        )
        return features, labels

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
