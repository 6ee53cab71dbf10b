"""FeatureCache: compute the frozen part of the backbone once, train the rest from the cache.

When the first ``k`` backbone modules are frozen and the training images are deterministic
(``augment: false``), every epoch computes exactly the same ``backbone[:k]`` output for each
image. The first epoch of each freeze phase trains and validates through the images as usual;
its batches also say which dataset positions they hold (:class:`ImageBatch`), and a forward hook
on ``backbone[k - 1]`` keeps each batch's output at those positions, so filling the cache costs
no extra pass. Later epochs of the phase get batches of those features in the same
``(seed, epoch)`` order the images would have come in and skip decoding and the frozen layers
entirely. ``k`` is the whole backbone in the ``frozen`` regime ("fast feature extraction") and
blocks 1-4 for the seed's fine-tuning.

Under DDP each rank fills the positions its shard holds during that first epoch; at the epoch's
end every rank sends its part to the others (an all-gather every rank reaches), so each rank
can serve whatever shard Lightning's distributed sampler gives it in any later epoch. Cached
loaders keep the datamodule's own sampler, so Lightning shards them exactly as it shards the
image loader: the same images land on the same rank, padding repeats included.

Features are stored in the dtype the frozen prefix produces, which is the training precision
(bf16/fp16 under mixed-precision autocast), so the layers after it see exactly what training
through the images gives them. They live in memory up to ``memory_mb``, beyond that in a
memory-mapped file; that file is removed from its folder as soon as it is mapped (its disk space
is freed when the process ends, however it ends), and the folder when the fit ends.

The model is the one switch (``TransferClassifier(feature_cache=...)``): it consumes the cached
batches. The datamodule opts in by asking :meth:`FeatureCache.dataloader` from its own
``train_dataloader``/``val_dataloader`` hooks (``ImageDataModule`` does): those hooks are
Lightning's public way to provide loaders, and the datamodule is what knows its images are
deterministic, so nothing replaces its methods from outside. The one Trainer setting the cache
changes, ``reload_dataloaders_every_n_epochs = 1`` (put back at the end), is Lightning's public
way to be asked for loaders every epoch. The cache stays off whenever it could change results or not
pay off: augmentation or Mixup/CutMix on, a balanced sampler (an epoch need not see every image),
``limit_train_batches``, a user's ``reload_dataloaders_every_n_epochs``, or features larger than
the images. It is keyed by the frozen weights, image size, transforms, data and precision: any
change rebuilds it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import lightning.pytorch as pl
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, default_collate

from tlfinetune.backbone import probe_shape
from tlfinetune.sampling import ResumableDataLoader

log = logging.getLogger(__name__)

# Rows per rank and round when ranks exchange features: bounds the extra memory of the exchange.
_SHARE_BYTES = 64 * 2**20


def _loader_like(original: Any, dataset: Dataset, **kwargs: Any) -> DataLoader:
    """A loader of ``dataset`` that resumes mid-epoch as the datamodule's own loader does.

    Every loader Lightning iterates in a fit must be as stateful as the one before: a
    checkpoint taken in a cached epoch then resumes that epoch where it stood, and Lightning
    finds as many loader states in a checkpoint as there are stateful loaders.
    """
    if isinstance(original, ResumableDataLoader):
        return ResumableDataLoader(dataset, progress=original.progress, **kwargs)
    return DataLoader(dataset, **kwargs)


class CachedBatch(NamedTuple):
    """A batch of backbone features: ``backbone[start:]`` and the head still have to run."""

    features: torch.Tensor  # (B, C, H, W): output of backbone[:start]
    labels: torch.Tensor  # (B,)
    start: int


class ImageBatch(NamedTuple):
    """A batch of images that also says which dataset positions it holds (the cache fills)."""

    images: torch.Tensor
    labels: torch.Tensor
    positions: torch.Tensor  # (B,) positions in the dataset


def _as_is(batch: Any) -> Any:
    return batch


class _Features(Dataset):
    """Indexed by a whole batch of positions at once: one gather instead of B small copies."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor, start: int) -> None:
        self.features, self.labels, self.start = features, labels, start

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, position: int) -> CachedBatch:
        return self.__getitems__([position])

    def __getitems__(self, positions: list[int]) -> CachedBatch:
        # DataLoader hands a batch sampler's whole list here (then collates with _as_is).
        idx = torch.as_tensor(positions)
        return CachedBatch(self.features[idx], self.labels[idx], self.start)


class _WithPositions(Dataset):
    """The dataset's samples, each with its position (``(sample, position)``)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, position: int) -> tuple[Any, int]:
        return self.dataset[position], position


class _CollateWithPositions:
    """The datamodule's own collate for the samples, plus the positions: an ImageBatch."""

    def __init__(self, collate: Callable[[list[Any]], Any] | None) -> None:
        self.collate = collate or default_collate

    def __call__(self, items: list[tuple[Any, int]]) -> ImageBatch:
        images, labels = self.collate([sample for sample, _ in items])
        return ImageBatch(images, labels, torch.tensor([p for _, p in items], dtype=torch.long))


class _Capture:
    """A cache being filled during one pass: which positions have features yet."""

    def __init__(self, split: str, key: str, start: int, n: int) -> None:
        self.split, self.key, self.start, self.n = split, key, start, n
        self.features: torch.Tensor | None = None
        self.where = ""
        self.failed = False  # no room for the features: this phase trains through the images
        self.labels = torch.empty(n, dtype=torch.long)
        self.filled = torch.zeros(n, dtype=torch.bool)


class FeatureCache(pl.Callback):
    """Serve the frozen backbone prefix's output from a cache while it cannot change.

    ``TransferClassifier`` adds one unless the Trainer has one or ``feature_cache`` is false;
    put one in the Trainer's callbacks only to change where the features go.

    Args:
        memory_mb: features up to this size (per process) stay in memory; larger ones go to a
            memory-mapped file.
        directory: folder for memory-mapped features; the Trainer's ``default_root_dir`` when
            left out. Its free space is checked first: when the features do not fit, the phase
            trains through the images (same results, slower) and a warning says so.
    """

    def __init__(self, memory_mb: int = 2048, directory: str | None = None) -> None:
        self.memory_mb = memory_mb
        self.directory = directory
        self.active = False  # whether the current epoch's training batches come from the cache
        self.builds = 0  # how many caches were computed (tests and benchmarks read it)
        self._serving = False  # between setup("fit") and teardown, when caching is safe
        self._set_reload = False
        self._store: dict[str, tuple[str, torch.Tensor, torch.Tensor]] = {}
        self._trainer: pl.Trainer | None = None
        self._module: Any = None
        self._keys: dict[tuple[str, int], str] = {}
        self._capture: dict[str, _Capture] = {}
        self._refused: set[tuple[str, int]] = set()  # (split, start) whose features did not fit
        self._originals: dict[str, Any] = {}  # the datamodule's own loaders, built once
        self._hook: Any = None
        self._worth: dict[int, bool] = {}
        self._digests: dict[int, bytes] = {}  # start -> digest of backbone[:start]'s weights
        self._folders: list[Path] = []

    @staticmethod
    def find(trainer: pl.Trainer | None) -> FeatureCache | None:
        """The Trainer's FeatureCache, or None."""
        callbacks = getattr(trainer, "callbacks", None) or []  # stand-ins may have none
        return next((c for c in callbacks if isinstance(c, FeatureCache)), None)

    @staticmethod
    def dataloader(trainer: pl.Trainer | None, split: str, images: Callable[[], Any]) -> Any:
        """The loader a datamodule's ``train_dataloader``/``val_dataloader`` hook returns.

        A datamodule whose images are deterministic (no augmentation) calls this from its hooks
        with ``images``, which builds its own loader. Without a serving cache that loader is
        returned; with one, it is built once and the cache decides per epoch what Lightning
        iterates: that loader, a copy of it that fills the cache, or cached features.

        Args:
            trainer: the datamodule's Trainer (None outside one).
            split: ``"train"`` or ``"val"``.
            images: builds the datamodule's own loader of images.
        """
        cache = FeatureCache.find(trainer)
        if cache is None or not cache._serving:
            return images()
        return cache._loader(split, images)

    def features(self, split: str) -> torch.Tensor | None:
        """The cached ``(N, C, H, W)`` features of ``split`` (``"train"``/``"val"``), if any.

        Held between the first epoch of a freeze phase and the end of the fit.
        """
        cached = self._store.get(split)
        return cached[1] if cached is not None else None

    # --- when it is safe ---------------------------------------------------------------------

    def _why_not(self, trainer: pl.Trainer, pl_module: Any) -> str | None:
        dm = trainer.datamodule
        if not getattr(pl_module, "hparams", {}).get("feature_cache", False):
            return "the model does not take cached features (feature_cache: false)"
        if dm is None:
            return "no datamodule"
        if getattr(dm, "mix", "none") != "none":
            return f"training batches are mixed (data.mix: {dm.mix})"
        if getattr(dm, "augment", True) or getattr(dm, "trivial_augment", False):
            return "training images are augmented (set data.augment: false to cache)"
        if getattr(dm, "sampler", "random") != "random":
            # Draws with replacement leave images out of an epoch: the first epoch of a phase
            # would never see every image, so no cache could be completed from it.
            return "data.sampler balanced does not show every image in an epoch"
        if trainer.limit_train_batches != 1.0 or trainer.limit_val_batches not in (0, 1.0):
            return "limit_train_batches / limit_val_batches are set"
        if trainer.reload_dataloaders_every_n_epochs:
            return "reload_dataloaders_every_n_epochs is set"
        return None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Decide whether this fit may be served from the cache."""
        if stage != "fit":
            return
        why = self._why_not(trainer, pl_module)
        if why:
            log.info(f"Feature cache off: {why}.")
            return
        self._trainer, self._module = trainer, pl_module
        # Which freeze phases would be served (the model is still on the CPU here).
        self._worth = {start: self._pays_off(start) for start in self._phase_starts()}
        if not any(self._worth.values()):
            log.info("Feature cache off: no freeze phase has a frozen prefix worth caching.")
            return
        self._serving = True

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Free the features and remove their files."""
        self._release()

    def on_exception(  # noqa: D102
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        # Lightning calls this (not teardown) on an error and on Ctrl-C.
        self._release()

    def _release(self) -> None:
        if self._set_reload and self._trainer is not None:
            self._trainer.reload_dataloaders_every_n_epochs = 0
        self._disarm()
        self._store, self._keys, self._capture, self._originals = {}, {}, {}, {}
        self._digests = {}
        self._refused = set()
        self._serving = self._set_reload = self.active = False
        for folder in self._folders:
            shutil.rmtree(folder, ignore_errors=True)
        self._folders = []

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

    def _loader(self, split: str, images: Callable[[], Any]) -> Any:
        trainer = self._trainer
        if not self._set_reload:
            # Lightning asks for loaders once per fit unless told to ask every epoch: this
            # public Trainer setting is its only way to take a new loader at a given epoch
            # (FitLoop._should_reload_train_dl reads it). Set only once a datamodule asks,
            # and put back at teardown.
            trainer.reload_dataloaders_every_n_epochs = 1
            self._set_reload = True
        start = self._frozen_prefix(trainer.current_epoch)
        # Lightning without the cache asks for each loader once: keep that one loader (and its
        # persistent workers) for the epochs the cache does not serve, instead of a new one each.
        if split not in self._originals:
            self._originals[split] = images()
        original = self._originals[split]
        # A capture belongs to the loader made with it: Lightning may ask again (on resume, the
        # first call comes before the checkpoint's epoch is restored) and iterate only the last.
        self._capture.pop(split, None)
        if split == "train":
            self.active = False
        if not self._worth.get(start, False) or (split, start) in self._refused:
            return original
        if not _plain_batches(original):
            log.info(f"Feature cache off for {split}: its loader has no plain batch_size.")
            return original
        dataset = original.dataset
        if (split, start) not in self._keys:  # the prefix is frozen for the whole phase
            self._keys[(split, start)] = self._key(split, dataset, start)
        key = self._keys[(split, start)]
        cached = self._store.get(split)
        # Both loaders keep the datamodule's sampler: Lightning wraps it for DDP exactly as it
        # wraps the image loader's, so every rank gets the positions it would get from images.
        if cached is None or cached[0] != key:
            if not self._served_later(start):
                return original  # the phase ends with this epoch: nothing would read the cache
            # This pass trains (or validates) through the images as usual and fills the cache
            # on the way: the first epoch of a phase costs what an uncached epoch costs.
            self._capture[split] = _Capture(split, key, start, len(dataset))
            workers = original.num_workers
            return _loader_like(
                original,
                _WithPositions(dataset),
                sampler=original.sampler,
                batch_size=original.batch_size,
                drop_last=original.drop_last,
                collate_fn=_CollateWithPositions(original.collate_fn),
                num_workers=workers,
                pin_memory=original.pin_memory,
                worker_init_fn=original.worker_init_fn,
                multiprocessing_context=original.multiprocessing_context if workers else None,
            )
        _, features, labels = cached
        if split == "train":
            self.active = True
        return _loader_like(
            original,
            _Features(features, labels, start),
            sampler=original.sampler,
            batch_size=original.batch_size,
            drop_last=original.drop_last,
            collate_fn=_as_is,
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
        out = probe_shape(self._module.backbone[:start], size)
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
        h.update(self._weights_digest(start))
        for name in ("files", "images", "labels"):  # what the dataset is made of
            value = getattr(dataset, name, None)
            if isinstance(value, torch.Tensor):
                h.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
            elif value is not None:
                h.update(repr(value).encode())
        return h.hexdigest()[:16]

    def _weights_digest(self, start: int) -> bytes:
        # While a fit is served the prefix stays frozen from its start to the end of its phase
        # (phases only unfreeze), so train and val share one pass over its weights (59 MB for
        # VGG16). Outside a fit nothing is remembered: the weights may have changed.
        if start in self._digests:
            return self._digests[start]
        h = hashlib.sha1()
        for p in self._module.backbone[:start].state_dict().values():  # reshape: BN's 0-d
            h.update(memoryview(p.detach().cpu().reshape(-1).view(torch.uint8).numpy()))
        if self._serving:
            self._digests[start] = h.digest()
        return h.digest()

    # --- capturing ---------------------------------------------------------------------------

    def on_train_batch_start(  # noqa: D102
        self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int
    ) -> None:
        self._arm("train", batch)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, *args: Any) -> None:  # noqa: D102
        self._disarm()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: Any) -> None:  # noqa: D102
        self._finish("train")

    def on_validation_batch_start(  # noqa: D102
        self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int, *args: Any
    ) -> None:
        # The sanity check's batches are the first ones of the first validation, from the same
        # loader (Lightning does not rebuild it in between) and through the same frozen prefix:
        # what they compute fills the capture, and that validation reuses it (:meth:`reuse`).
        self._arm("val", batch)

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: Any, *args: Any) -> None:  # noqa: D102
        self._disarm()

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: Any) -> None:  # noqa: D102
        if not trainer.sanity_checking:  # a few batches only: the capture goes on after them
            self._finish("val")

    def reuse(self, batch: Any) -> CachedBatch | None:
        """A validation batch's features, when this pass already computed all of them.

        The first validation of a phase repeats the sanity check's batches; their
        ``backbone[:start]`` output is in the capture already, bit for bit what running the
        frozen prefix again would give (same weights, eval mode, precision), so the model
        runs only the layers after it on those batches.
        """
        capture = self._capture.get("val")
        if capture is None or capture.features is None or not isinstance(batch, ImageBatch):
            return None
        # Phases only unfreeze: a prefix frozen in this epoch was frozen since the sanity check.
        if self._frozen_prefix(self._trainer.current_epoch) < capture.start:
            return None
        positions = batch.positions.cpu()
        if capture.failed or not bool(capture.filled[positions].all()):
            return None
        features = capture.features[positions].to(batch.images.device)
        return CachedBatch(features, batch.labels, capture.start)

    def _arm(self, split: str, batch: Any) -> None:
        capture = self._capture.get(split)
        if capture is None or capture.failed or not isinstance(batch, ImageBatch):
            return
        positions = batch.positions.cpu()
        capture.labels[positions] = batch.labels.cpu()
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
        # layers, same autocast (so out's dtype is the training precision). Its output for
        # these dataset positions is the cache entry.
        if capture.features is None and not self._allocate(capture, out):
            capture.failed = True
            self._refused.add((capture.split, capture.start))
            return
        capture.features[positions] = out.detach().cpu()
        capture.filled[positions] = True

    def _finish(self, split: str) -> None:
        self._disarm()
        capture = self._capture.pop(split, None)
        if capture is None:
            return
        if self._trainer.world_size > 1:
            # Every rank started this capture (same epoch, schedule and weights) and reaches
            # this epoch-end hook, so every rank takes part in the exchange.
            self._share(capture)
        if capture.failed or capture.features is None or not bool(capture.filled.all()):
            return  # an epoch that did not see every image (stopped early) caches nothing
        self._store[split] = (capture.key, capture.features, capture.labels)
        self.builds += 1
        size_mb = capture.features.numel() * capture.features.element_size() / 2**20
        log.info(
            f"Feature cache: {capture.n} {split} images through backbone[:{capture.start}] "
            f"while training, {size_mb:.1f} MB ({capture.features.dtype}) in {capture.where}; "
            "later epochs skip them."
        )

    def _share(self, capture: _Capture) -> None:
        """All ranks: send the positions this rank filled to every other rank, in rounds.

        Collectives, in the same order and number on every rank: one all-gather of
        (usable, rows filled); when every rank's capture is usable, ``ceil(max rows / chunk)``
        rounds of three all-gathers (positions, labels, feature bytes). Every rank decides from
        the gathered values only, so all take the same branch.
        """
        strategy, device = self._trainer.strategy, self._module.device

        def gather(t: torch.Tensor) -> torch.Tensor:  # (world, *t.shape); NCCL needs the device
            return strategy.all_gather(t.to(device)).cpu()

        usable = not capture.failed and capture.features is not None
        mine = capture.filled.nonzero().flatten()
        state = gather(torch.tensor([int(usable), len(mine)], dtype=torch.long))
        if not bool(state[:, 0].all()):
            if usable:
                log.warning("Feature cache off for this phase: another process had no room.")
            capture.failed = True
            # Every rank stops trying for this phase, so later epochs' loaders (and the
            # collectives of their captures) stay the same on every rank.
            self._refused.add((capture.split, capture.start))
            return
        features = capture.features
        shape, dtype = features.shape[1:], features.dtype
        row_bytes = features[0].numel() * features.element_size()
        chunk = max(1, _SHARE_BYTES // row_bytes)
        rank, most = self._trainer.global_rank, int(state[:, 1].max())
        for first in range(0, most, chunk):
            rows = min(chunk, most - first)
            part = mine[first : first + rows]
            positions = torch.full((rows,), -1, dtype=torch.long)
            positions[: len(part)] = part
            labels = torch.zeros(rows, dtype=torch.long)
            labels[: len(part)] = capture.labels[part]
            data = torch.zeros(rows, row_bytes, dtype=torch.uint8)  # bytes: any dtype travels
            data[: len(part)] = features[part].contiguous().view(len(part), -1).view(torch.uint8)
            all_positions, all_labels, all_data = gather(positions), gather(labels), gather(data)
            for other in range(len(all_positions)):
                valid = all_positions[other] >= 0
                if other == rank or not bool(valid.any()):
                    continue
                where = all_positions[other][valid]
                rows_in = all_data[other][valid].contiguous().view(dtype).view(-1, *shape)
                features[where] = rows_in
                capture.labels[where] = all_labels[other][valid]
                capture.filled[where] = True

    def _allocate(self, capture: _Capture, sample: torch.Tensor) -> bool:
        """Room for every position's features, in memory or in a file; False: no room."""
        shape = (capture.n, *sample.shape[1:])
        numel = int(torch.Size(shape).numel())
        nbytes = numel * sample.element_size()
        if nbytes <= self.memory_mb * 2**20:
            capture.features, capture.where = torch.empty(shape, dtype=sample.dtype), "memory"
            return True
        base = Path(self.directory or self._trainer.default_root_dir)
        base.mkdir(parents=True, exist_ok=True)
        # Processes on one machine each keep a full copy: all of them must fit.
        needed = nbytes * max(1, int(getattr(self._trainer, "num_devices", 1) or 1))
        free = shutil.disk_usage(base).free
        if free < needed:
            log.warning(
                f"Feature cache off for this phase: the {capture.split} features need "
                f"{_size(needed)} on disk in {base.resolve()}, which has {_size(free)} free. "
                "Training goes on through the images (same results, slower). Free some space "
                "there, point FeatureCache(directory=...) at a larger disk, or raise "
                "FeatureCache(memory_mb=...) to keep them in memory."
            )
            return False
        folder = Path(tempfile.mkdtemp(prefix="feature_cache-", dir=base))
        self._folders.append(folder)
        path = folder / f"{capture.key}-{capture.split}.bin"
        try:
            with open(path, "wb") as f:  # from_file maps an existing file of the full size
                if hasattr(os, "posix_fallocate"):  # reserve the blocks: no SIGBUS when full
                    os.posix_fallocate(f.fileno(), 0, nbytes)
                else:
                    f.truncate(nbytes)
        except OSError as exc:
            log.warning(
                f"Feature cache off for this phase: could not reserve {_size(nbytes)} "
                f"in {folder} ({exc}). Training goes on through the images."
            )
            shutil.rmtree(folder, ignore_errors=True)
            return False
        storage = torch.from_file(str(path), shared=True, size=numel, dtype=sample.dtype)
        capture.features = storage.view(shape)
        try:  # the mapping keeps the data; nothing stays behind, even if the run is killed
            path.unlink()
            folder.rmdir()
            capture.where = f"a memory-mapped file in {folder} (already unlinked)"
        except OSError:  # e.g. Windows keeps mapped files: teardown removes the folder
            capture.where = str(path)
        return True


def _plain_batches(loader: Any) -> bool:
    """A DataLoader batching its sampler's positions by ``batch_size``: one the cache can copy."""
    return (
        isinstance(loader, DataLoader)
        and loader.batch_size is not None
        and type(loader.batch_sampler) is BatchSampler
    )


def _size(nbytes: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes:.0f} {unit}" if unit == "bytes" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    raise AssertionError  # unreachable
