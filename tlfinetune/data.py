"""The data layer: the :class:`ImageDataModule` that turns an image source into Lightning loaders.

Batches are ``(images, labels)`` with ``images`` a ``torch.uint8`` tensor of shape
``(B, 3, image_size, image_size)`` (RGB, *not* normalised: the model converts to float and
normalises with its weights' mean/std, so that checkpoints and exported models carry their own
normalisation) and ``labels`` an ``int64`` tensor. How images are resized and cropped (and the
default ``image_size``) is the model's weights' preset,
:attr:`~tlfinetune.module.TransferClassifier.preprocessing`, read in
:meth:`ImageDataModule.setup` from the model being trained. Predict batches are
``(images, indices)``, where ``indices`` are positions in :attr:`ImageDataModule.predict_files`.

Sources (exactly one of them):

* ``root``: a folder in ImageFolder layout, ``root/<class>/**/<image>`` (split into train/val by
  ``val_split``) or ``root/train/<class>/...`` with ``root/val/<class>/...`` (``valid/`` and
  ``validation/`` are accepted too; without one, train is split by ``val_split``) and optionally
  ``root/test/<class>/...``. ``root: demo`` selects the embedded demo dataset
  (:mod:`tlfinetune.demo`); write ``./demo`` for a folder that happens to be called ``demo``.
* ``train_csv`` (plus optional ``val_csv`` / ``test_csv``): CSV files with a ``path,label`` header
  row; paths are relative to the CSV file's folder (or absolute), labels are class names.
* :meth:`ImageDataModule.from_arrays`: in-memory NHWC arrays or tensors, Keras style.

Bad input (missing folders, empty classes, unreadable or truncated images, decompression bombs,
unknown labels, missing files named by a CSV) raises :class:`~tlfinetune.errors.DataError` with a
message that names the culprit; see :class:`ImageDataModule` for ``skip_bad_images``.

The datamodule wires pieces that each live in their own module: :mod:`tlfinetune.sources`
and :mod:`tlfinetune.arrays` find the images and split them, :mod:`tlfinetune.scan` checks them
before training, :mod:`tlfinetune.datasets` reads them, :mod:`tlfinetune.transforms` resizes
and augments them, :mod:`tlfinetune.sampling` orders them, and :mod:`tlfinetune.machine` says
how many loader workers this machine affords.
"""

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset, Sampler

from tlfinetune.arrays import index_arrays
from tlfinetune.balance import count_labels, imbalance_warning, per_class_counts_table
from tlfinetune.cache import FeatureCache
from tlfinetune.datasets import ArrayDataset, ImageFileDataset, IndexedDataset
from tlfinetune.demo import ensure_demo_dataset
from tlfinetune.errors import DataError
from tlfinetune.images import DEFAULT_MAX_IMAGE_PIXELS, IMAGE_EXTENSIONS, PathList, list_images
from tlfinetune.machine import compute_threads, cpus, default_num_workers
from tlfinetune.mixing import BatchMix, MixMode
from tlfinetune.sampling import BalancedSampler, EpochShuffleSampler, ResumableDataLoader
from tlfinetune.scan import HeaderScan
from tlfinetune.sources import Index, Split, index_csv, index_folder
from tlfinetune.transforms import (
    Preprocessing,
    eval_transform,
    train_transform,
    weights_preprocessing,
)

__all__ = ["ImageDataModule"]

log = logging.getLogger(__name__)


class _NoClassNamesError(DataError, AttributeError):
    """No source of class names; an AttributeError too, so ``getattr(dm, name, None)`` is None."""


class ImageDataModule(pl.LightningDataModule):
    """Images from a folder, CSV files, in-memory arrays or the demo set, as Lightning loaders.

    Exactly one source: ``root`` (a folder, or ``demo``), ``train_csv`` (with optional
    ``val_csv`` / ``test_csv``), or :meth:`from_arrays`. Only ``predict_dir`` may stand alone, for
    prediction with class names restored from a checkpoint.

    Images that cannot be used are found before training by a cheap header scan in :meth:`setup`
    (no full decode; a JPEG or PNG without its end marker is decoded to confirm truncation).
    Without ``skip_bad_images`` the scan raises one :class:`~tlfinetune.errors.DataError` naming
    them; with it, they are left out, a warning gives their number and the list file, and their
    paths are written to that file (``bad_images_log``; by default ``bad_images.txt`` in the
    trainer's log folder, or in the working folder without a trainer). Damage that only shows
    when the pixels are decoded is handled while loading (see :class:`ImageFileDataset`).

    Args:
        root: Folder of images in ImageFolder layout: ``root/<class>/...`` (split into train and
            validation by ``val_split``) or ``root/train/<class>/...`` plus
            ``root/val/<class>/...`` and optionally ``root/test/<class>/...``. Class folders are
            searched recursively; class order is the sorted folder names. ``demo`` selects the
            embedded demo dataset (six shape classes, generated and cached on first use).
        train_csv: CSV file with a ``path,label`` header row listing the training images;
            paths relative to the CSV's folder. Alternative to ``root``.
        val_csv: CSV file of validation images; without it train is split by ``val_split``.
        test_csv: CSV file of test images.
        predict_dir: Folder of images to predict (searched recursively, no class folders
            needed, sorted order). Without it, prediction runs on the test split if there is
            one, else on the validation split.
        val_split: Fraction of each class held out for validation when the source has no
            validation split (stratified, fixed by ``seed``).
        seed: Seed of the train/validation split and of the training order.
        image_size: Side length in pixels of the square images the model receives; ``null``
            (default): the model's (a checkpoint's), else its weights' crop size (224 for
            VGG16, 300 for EfficientNet-B3, ...). Evaluation images are resized to the
            weights' resize/crop ratio (VGG16: ``round(image_size * 256 / 224)``) with their
            interpolation, then centre-cropped.
        batch_size: Images per batch.
        num_workers: DataLoader worker processes; ``null`` picks the cores training leaves
            free (:func:`~tlfinetune.machine.default_num_workers`): ``cpus - 1`` on a GPU (at
            most 16), and on the CPU the cores torch's compute threads do not use (0 when they
            use all of them).
        augment: Random resized crops and horizontal flips for training; ``false`` makes
            training images identical to evaluation images.
        trivial_augment: Also apply TrivialAugmentWide to training images (needs ``augment``).
        skip_bad_images: Leave out unreadable, truncated or oversized images (and CSV rows
            naming missing files) with a warning instead of stopping with an error.
        bad_images_log: File that receives the paths of skipped images; default
            ``bad_images.txt`` in the trainer's log folder (working folder without a trainer).
        max_image_pixels: Largest accepted ``width * height`` of an image, a guard against
            decompression bombs (default Pillow's limit); ``null`` disables it.
        mix: Blend training batches (:mod:`tlfinetune.mixing`): ``mixup``, ``cutmix``, or
            ``mixup_cutmix`` (one of the two per batch); labels become soft. Turns the feature
            cache off (the images change every epoch).
        mixup_alpha: Beta parameter of Mixup's blend weight.
        cutmix_alpha: Beta parameter of CutMix's box area.
        sampler: Order of the training images: ``random`` (each image once per epoch, shuffled
            by ``(seed, epoch)``) or ``balanced`` (as many draws as images, with replacement,
            every class equally likely: :class:`~tlfinetune.sampling.BalancedSampler`; for
            imbalanced classes).
    """

    def __init__(
        self,
        root: str | Path | None = None,
        train_csv: str | Path | None = None,
        val_csv: str | Path | None = None,
        test_csv: str | Path | None = None,
        predict_dir: str | Path | None = None,
        val_split: float = 0.2,
        seed: int = 0,
        image_size: int | None = None,
        batch_size: int = 32,
        num_workers: int | None = None,
        augment: bool = True,
        trivial_augment: bool = False,
        skip_bad_images: bool = False,
        bad_images_log: str | Path | None = None,
        max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
        mix: MixMode = "none",
        mixup_alpha: float = 0.8,
        cutmix_alpha: float = 1.0,
        sampler: Literal["random", "balanced"] = "random",
    ) -> None:
        arguments = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        super().__init__()
        # Paths as strings: checkpoints must load with torch.load(weights_only=True).
        self.save_hyperparameters(
            {k: str(v) if isinstance(v, Path) else v for k, v in arguments.items()}
        )
        if root is not None and train_csv is not None:
            raise DataError(
                f"Both data.root ({root}) and data.train_csv ({train_csv}) are set; choose one "
                "source of training images. A config file that sets root (the configs/ files "
                "set root: demo) is overridden on the command line with --data.root null."
            )
        if (val_csv is not None or test_csv is not None) and train_csv is None:
            raise DataError(
                "data.val_csv / data.test_csv are set without data.train_csv; CSV files only "
                "work together with a training CSV (for a folder, use root/val and root/test)."
            )
        if not 0.0 < float(val_split) < 1.0:
            raise DataError(
                f"data.val_split must be a fraction between 0 and 1 (exclusive), got {val_split}."
            )
        for name, value, low in (("image_size", image_size, 1), ("batch_size", batch_size, 1)):
            if value is not None and int(value) < low:
                raise DataError(f"data.{name} must be at least {low}, got {value}.")
        if num_workers is not None and num_workers < 0:
            raise DataError(f"data.num_workers must be >= 0 or null, got {num_workers}.")
        if max_image_pixels is not None and max_image_pixels < 1:
            raise DataError(
                f"data.max_image_pixels must be a positive pixel count or null, got "
                f"{max_image_pixels}."
            )
        for name, alpha in (("mixup_alpha", mixup_alpha), ("cutmix_alpha", cutmix_alpha)):
            if not alpha > 0:
                raise DataError(f"data.{name} must be a positive number, got {alpha}.")
        if sampler not in ("random", "balanced"):
            raise DataError(f"data.sampler must be random or balanced, got {sampler!r}.")
        if trivial_augment and not augment:
            log.warning("trivial_augment is ignored because augment is false.")
        self.root = root
        self.train_csv = train_csv
        self.val_csv = val_csv
        self.test_csv = test_csv
        self.predict_dir = predict_dir
        self.val_split = float(val_split)
        self.seed = int(seed)
        self._requested_size = None if image_size is None else int(image_size)
        self.image_size: int | None = self._requested_size  # known after setup when None
        self.preprocessing: Preprocessing | None = None  # the model's preset, set in setup
        self.batch_size = int(batch_size)
        self.num_workers = num_workers
        self._workers_logged = False
        self.augment = augment
        self.trivial_augment = trivial_augment
        self.skip_bad_images = skip_bad_images
        self.bad_images_log = bad_images_log
        self.max_image_pixels = max_image_pixels
        self.mix = mix
        self.mixup_alpha = float(mixup_alpha)
        self.cutmix_alpha = float(cutmix_alpha)
        self._batch_mix: BatchMix | None = None
        self.sampler = sampler

        self.train_dataset: Dataset | None = None
        self.val_dataset: Dataset | None = None
        self.test_dataset: Dataset | None = None
        self.predict_dataset: Dataset | None = None
        self.train_sampler: EpochShuffleSampler | None = None
        self._scan = HeaderScan(
            max_image_pixels, skip_bad_images, self._bad_images_file, self._is_global_zero
        )
        self._index: Index | None = None
        self._arrays: dict[str, Any] | None = None
        self._restored_class_names: list[str] | None = None
        self._predict_split: Split | None = None
        self._predict_files: PathList | None = None

    # ---------------------------------------------------------------- constructors

    @classmethod
    def demo(cls, **kwargs: Any) -> "ImageDataModule":
        """The embedded demo dataset: the same as ``ImageDataModule(root="demo", **kwargs)``."""
        return cls(root="demo", **kwargs)

    @classmethod
    def from_arrays(
        cls,
        train_images: Any,
        train_labels: Any,
        val_images: Any = None,
        val_labels: Any = None,
        test_images: Any = None,
        test_labels: Any = None,
        class_names: Sequence[str] | None = None,
        **kwargs: Any,
    ) -> "ImageDataModule":
        """In-memory images, like Keras' ``model.fit(x, y, validation_data=(x_val, y_val))``.

        Images are numpy arrays or torch tensors in NHWC layout (``(N, H, W)`` for grayscale;
        1, 3 or 4 channels, alpha composited onto white): uint8, or floats in ``[0, 1]`` or
        ``[0, 255]`` (decided by each array's maximum: at most 1 means ``[0, 1]``). They are
        stored as uint8 (floats are rounded to the nearest of 256 levels). Labels are integer
        class indices ``(N,)`` or one-hot rows ``(N, classes)``.

        Args:
            train_images: Training images.
            train_labels: Training labels.
            val_images: Validation images; without them train is split by ``val_split``.
            val_labels: Validation labels.
            test_images: Test images.
            test_labels: Test labels.
            class_names: Name of each class; default ``"0"``, ``"1"``, ...
            **kwargs: Other :class:`ImageDataModule` arguments (``image_size``, ``batch_size``,
                ``val_split``, ``seed``, ...), but no other source.

        Returns:
            The datamodule.
        """
        for key in ("root", "train_csv", "val_csv", "test_csv"):
            if kwargs.get(key) is not None:
                raise DataError(f"from_arrays() takes no {key}: the arrays are the source.")
        dm = cls(**kwargs)
        dm._arrays = {
            "train": (train_images, train_labels),
            "val": (val_images, val_labels),
            "test": (test_images, test_labels),
            "class_names": None if class_names is None else [str(c) for c in class_names],
        }
        return dm

    # ---------------------------------------------------------------- what the model reads

    @property
    def class_names(self) -> list[str]:
        """Class names in label order (sorted folder names for folders)."""
        if not self._has_source():
            if self._restored_class_names is not None:
                return list(self._restored_class_names)
            if self.predict_dir is not None:
                raise _NoClassNamesError(
                    "This datamodule has only data.predict_dir, so it knows no class names until "
                    "a checkpoint restores them; set data.root or data.train_csv to read them "
                    "from the training data."
                )
        return list(self._ensure_index().class_names)

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.class_names)

    @property
    def class_to_idx(self) -> dict[str, int]:
        """Label of each class name."""
        return {name: i for i, name in enumerate(self.class_names)}

    @property
    def class_counts(self) -> list[int]:
        """Training images per class, in label order (after bad images were left out)."""
        if not self._has_source():  # AttributeError too: getattr(dm, "class_counts", None)
            raise _NoClassNamesError(
                "This datamodule has no training data (data.root, data.train_csv or arrays), so "
                "it cannot count the training images per class."
            )
        index = self._ensure_index()
        return count_labels(index.splits["train"].labels, len(index.class_names))

    @property
    def has_test(self) -> bool:
        """Whether the source has a test split."""
        return self._has_source() and "test" in self._ensure_index().splits

    @property
    def bad_images(self) -> list[Path]:
        """Images left out so far because of ``skip_bad_images``."""
        return self._scan.bad_images

    @property
    def predict_files(self) -> PathList:
        """The files that predict batch indices refer to (synthetic ``array/NNNNNN`` for arrays)."""
        if self._predict_files is None:
            self._build_predict()
        assert self._predict_files is not None
        return self._predict_files

    # ---------------------------------------------------------------- indexing

    def _has_source(self) -> bool:
        return self._arrays is not None or self.root is not None or self.train_csv is not None

    def _ensure_index(self) -> Index:
        if self._index is None:
            if self._arrays is not None:
                self._index = index_arrays(
                    self._arrays, self._arrays["class_names"], self.val_split, self.seed
                )
                self._arrays = {"class_names": self._index.class_names}  # the index holds them
            elif self.train_csv is not None:
                self._index = index_csv(
                    Path(self.train_csv).expanduser(),
                    None if self.val_csv is None else Path(self.val_csv),
                    None if self.test_csv is None else Path(self.test_csv),
                    self.val_split,
                    self.seed,
                )
            elif self.root is None:
                raise DataError(
                    "No data to read: pass --data.root with a folder of images (one "
                    "sub-folder per class), or --data.train_csv with a CSV file of path,label "
                    "rows, or --data.root demo for the built-in demo dataset (root: and "
                    "train_csv: under data: in a YAML config)."
                )
            elif isinstance(self.root, str) and self.root == "demo":
                demo = ensure_demo_dataset()
                self._index = index_folder(demo, self.val_split, self.seed, demo=True)
            else:
                root = Path(self.root).expanduser()
                self._index = index_folder(root, self.val_split, self.seed)
            n = {k: len(s) for k, s in self._index.splits.items() if k != "all"}
            log.info(
                "Data: %s; %d classes; %s images.",
                self._index.description,
                len(self._index.class_names),
                ", ".join(f"{k} {v}" for k, v in n.items()),
            )
            self._log_class_balance(self._index)
        return self._index

    def _log_class_balance(self, index: Index, when: str = "") -> None:
        """Images per class and split; a warning when the training classes are far apart."""
        c = len(index.class_names)
        counts = {
            role: count_labels(split.labels, c)
            for role, split in index.splits.items()
            if role in ("train", "val", "test")
        }
        log.info("Images per class%s:\n%s", when, per_class_counts_table(index.class_names, counts))
        warning = imbalance_warning(index.class_names, counts["train"])
        # Balanced sampling is the remedy chosen; a recount after skipping warns no second time.
        if warning and self.sampler != "balanced" and not when:
            log.warning(warning)

    # ---------------------------------------------------------------- where bad images are listed

    def _bad_images_file(self) -> Path:
        if self.bad_images_log is not None:
            return Path(self.bad_images_log).expanduser()
        trainer = self.trainer
        if trainer is not None:
            folder = getattr(trainer, "log_dir", None) or trainer.default_root_dir
            return Path(folder) / "bad_images.txt"
        return Path.cwd() / "bad_images.txt"

    def _is_global_zero(self) -> bool:
        trainer = self.trainer
        return trainer is None or bool(getattr(trainer, "is_global_zero", True))

    # ---------------------------------------------------------------- datasets

    def _dataset(self, split: Split, transform: Callable, predict: bool = False) -> Dataset:
        if split.images is not None:
            return ArrayDataset(split.images, split.labels, transform)
        assert split.files is not None
        return ImageFileDataset(
            split.files,
            split.labels,
            transform,
            image_size=self.image_size,
            max_image_pixels=self.max_image_pixels,
            skip_bad_images=self.skip_bad_images,
            bad_images_log=self._bad_images_file() if self.skip_bad_images else None,
            substitute_blank=predict,
        )

    def _prepared_splits(self, *roles: str) -> list[Split]:
        """The splits ``roles``, header-scanned together (one error for all their bad files)."""
        index = self._ensure_index()
        for role in roles:
            if role not in index.splits:
                raise DataError(self._no_test_message() if role == "test" else f"No {role} split.")
        before = [len(index.splits[role]) for role in roles]
        splits = self._scan([index.splits[role] for role in roles])
        for role, split in zip(roles, splits, strict=True):
            index.splits[role] = split
        left_out = sum(before) - sum(len(s) for s in splits)
        if left_out:  # the table logged when the data was indexed counted them
            images = "image" if left_out == 1 else "images"
            self._log_class_balance(index, f" after leaving out {left_out} unusable {images}")
        if "train" in roles:
            present = set(index.splits["train"].labels)
            lost = [n for i, n in enumerate(index.class_names) if i not in present]
            if lost:
                raise DataError(
                    f"After leaving out bad images, the training images of "
                    f"{index.splits['train'].origin} have no class {', '.join(lost)}; every "
                    "class needs training images."
                )
        return splits

    def _no_test_message(self) -> str:
        if self._arrays is not None:
            fix = "pass test_images and test_labels to ImageDataModule.from_arrays()"
        elif self.train_csv is not None:
            fix = "set data.test_csv to a CSV file of path,label rows"
        elif self.root is not None:
            fix = f"add a test/ folder with one sub-folder per class to {self.root}"
            if not (Path(self.root) / "train").is_dir() and self.root != "demo":
                fix += " (which then needs train/ and val/ folders too)"
        else:
            fix = "set data.root or data.train_csv"
        return f"Testing needs a test split, but the data has none: {fix}."

    def _build_predict(self) -> None:
        if self.predict_dir is not None:
            folder = Path(self.predict_dir).expanduser()
            if not folder.is_dir():
                raise DataError(
                    f"data.predict_dir {folder} is not a folder; point it at a folder of images "
                    "(searched recursively)."
                )
            files = list_images(folder)
            if not files:
                raise DataError(
                    f"data.predict_dir {folder} holds no images (recognised extensions: "
                    f"{', '.join(sorted(IMAGE_EXTENSIONS)[:8])}, ...)."
                )
            (split,) = self._scan([Split(f"folder {folder}", [-1] * len(files), files)])
            self._predict_split = split
            self._predict_files = split.files or PathList()
            return
        if not self._has_source():
            raise DataError(
                "Nothing to predict: set data.predict_dir to a folder of images (or a data "
                "source with a validation or test split)."
            )
        index = self._ensure_index()
        role = "test" if "test" in index.splits else "val"
        (split,) = self._prepared_splits(role)
        self._predict_split = split
        if split.files is not None:
            self._predict_files = split.files
        else:
            self._predict_files = PathList(f"array/{i:06d}" for i in range(len(split)))

    def prepare_data(self) -> None:
        """Generates the demo dataset when ``root`` is ``demo`` (once per machine)."""
        if isinstance(self.root, str) and self.root == "demo":
            ensure_demo_dataset()

    def setup(self, stage: str | None = None) -> None:
        """Builds the datasets of a stage, after a header scan of their files.

        Args:
            stage: ``fit``, ``validate``, ``test``, ``predict``, or ``None`` for all.
        """
        preset = self._resolve_preprocessing()
        evaluate = eval_transform(preset.crop_size, preset)
        if stage in (None, "fit") and self.train_dataset is None:
            train, _ = self._prepared_splits("train", "val")
            self.train_dataset = self._dataset(
                train,
                train_transform(preset.crop_size, self.augment, self.trivial_augment, preset),
            )
        if stage in (None, "fit", "validate") and self.val_dataset is None:
            (val,) = self._prepared_splits("val")
            self.val_dataset = self._dataset(val, evaluate)
        if (stage == "test" or (stage is None and self.has_test)) and self.test_dataset is None:
            splits = self._ensure_index().splits
            role = "all" if "test" not in splits and "all" in splits else "test"
            if role == "all":
                log.warning(
                    "No test/ folder in %s: testing on all %d of its images. If the model was "
                    "trained on this folder, it has seen most of them (its val_split held out "
                    "the rest for validation), and the scores overstate how well it does on new "
                    "images. For a fair test, point data.root at a folder of images kept out of "
                    "training (<folder>/<class>/<images>), or lay the data out as train/, val/ "
                    "and test/ folders and train on that.",
                    self.root,
                    len(splits["all"]),
                )
            (test,) = self._prepared_splits(role)
            self.test_dataset = self._dataset(test, evaluate)
        if stage in (None, "predict") and self.predict_dataset is None:
            if self._predict_split is None:
                self._build_predict()
            assert self._predict_split is not None
            self.predict_dataset = IndexedDataset(
                self._dataset(self._predict_split, evaluate, predict=True)
            )

    def _resolve_preprocessing(self) -> Preprocessing:
        """The preset of the model being served, at ``image_size`` (or the model's size).

        The model owns the preset (its weights' ``transforms()``, or a checkpoint's); without a
        trainer or a model that has one, VGG16's, the preset of tlfinetune's default backbone.
        Datasets built for another preset (this datamodule reused with another backbone) are
        rebuilt.
        """
        module = getattr(self.trainer, "lightning_module", None)
        preset = getattr(module, "preprocessing", None)
        if not isinstance(preset, Preprocessing):
            preset = weights_preprocessing(None)
        preset = preset.at(self._requested_size or preset.crop_size)
        if preset != self.preprocessing:
            if self.preprocessing is not None:
                self.train_dataset = self.val_dataset = self.test_dataset = None
                self.predict_dataset = None
            self.preprocessing, self.image_size = preset, preset.crop_size
            # The logged hyperparameters must agree with the model's image_size.
            self.hparams["image_size"] = preset.crop_size
            if hasattr(self, "_hparams_initial"):
                self._hparams_initial["image_size"] = preset.crop_size
        return preset

    # ---------------------------------------------------------------- loaders

    def _resolved_num_workers(self) -> int:
        if self.num_workers is not None:
            return int(self.num_workers)
        per_node = 1
        if self.trainer is not None:
            per_node = max(1, int(getattr(self.trainer, "num_devices", 1) or 1))
        threads = compute_threads(self._device_type())
        workers = default_num_workers(per_node, threads)
        if self.trainer is not None and not self._workers_logged:
            self._workers_logged = True
            log.info(
                "DataLoader workers: %d per process (%d cores, training itself keeps %d busy; "
                "data.num_workers sets them).",
                workers,
                cpus(),
                per_node * threads,
            )
        return workers

    def _device_type(self) -> str | None:
        """The trainer's device type (``cpu``, ``cuda``, ...), ``None`` without a trainer."""
        trainer = self.trainer
        if trainer is None:
            return None
        try:
            return trainer.strategy.root_device.type
        except (AttributeError, RuntimeError):
            name = type(getattr(trainer, "accelerator", None)).__name__
            return "cuda" if name == "CUDAAccelerator" else None

    def _pin_memory(self) -> bool:
        if self.trainer is not None:
            return self._device_type() == "cuda"
        return torch.cuda.is_available()

    def _loader(
        self, dataset: Dataset, sampler: Sampler | None = None, loader: type = DataLoader, **kw: Any
    ) -> DataLoader:
        workers = self._resolved_num_workers()
        return loader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            shuffle=False,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=self._pin_memory(),
            drop_last=False,
            **kw,
        )

    def _current_epoch(self) -> int:
        """The epoch Lightning is about to run (also right after resuming from a checkpoint)."""
        trainer = self.trainer
        if trainer is None:
            return 0
        try:
            return int(trainer.fit_loop.epoch_progress.current.processed)
        except AttributeError:
            return int(getattr(trainer, "current_epoch", 0) or 0)

    def _require(self, name: str, stage: str) -> Dataset:
        if getattr(self, name) is None:
            self.setup(stage)
        dataset = getattr(self, name)
        assert dataset is not None
        return dataset

    def train_dataloader(self) -> DataLoader:
        """Training batches in an order fixed by ``(seed, epoch)``: :class:`EpochShuffleSampler`.

        With ``sampler: balanced``, :class:`~tlfinetune.sampling.BalancedSampler`'s draws.

        Without augmentation, a fit's :class:`~tlfinetune.cache.FeatureCache` may serve them
        as cached backbone features instead, in the same order.
        """
        return FeatureCache.dataloader(self.trainer, "train", self._train_images)

    def _train_images(self) -> DataLoader:
        dataset = self._require("train_dataset", "fit")
        if self.sampler == "balanced":
            labels = self._ensure_index().splits["train"].labels
            sampler: EpochShuffleSampler = BalancedSampler(labels, self.seed)
        else:
            sampler = EpochShuffleSampler(len(dataset), self.seed)  # type: ignore[arg-type]
        sampler.set_epoch(self._current_epoch())
        self.train_sampler = sampler
        return self._loader(dataset, sampler, ResumableDataLoader, progress=self._progress)

    def _progress(self) -> tuple[int, int]:
        """(epoch, batches of it that trained): where a mid-epoch checkpoint resumes."""
        batches = self.trainer.fit_loop.epoch_loop.batch_progress.current.processed
        return self._current_epoch(), int(batches)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Training batches mixed by ``mix`` (on the device), seeded by (seed, epoch, batch)."""
        trainer = self.trainer
        if self.mix == "none" or trainer is None or not trainer.training:
            return batch
        if self._batch_mix is None:
            self._batch_mix = BatchMix(
                self.mix, self.num_classes, self.mixup_alpha, self.cutmix_alpha, self.seed
            )
        # The index of this batch in its epoch: Lightning counts it ready right after this hook.
        batch_idx = trainer.fit_loop.epoch_loop.batch_progress.current.ready
        images, labels = self._batch_mix(batch[0], batch[1], trainer.current_epoch, batch_idx)
        return [images, labels, *batch[2:]]

    def val_dataloader(self) -> DataLoader:
        """Validation batches, in dataset order (from the feature cache as training's are)."""
        return FeatureCache.dataloader(self.trainer, "val", self._val_images)

    def _val_images(self) -> DataLoader:
        dataset = self._require("val_dataset", "validate")
        return self._loader(dataset, self._each_once_sampler(dataset))

    def test_dataloader(self) -> DataLoader:
        """Test batches, in dataset order; a :class:`DataError` when there is no test split."""
        if self.test_dataset is None and self._has_source() and not self.has_test:
            raise DataError(self._no_test_message())
        dataset = self._require("test_dataset", "test")
        return self._loader(dataset, self._each_once_sampler(dataset))

    def _each_once_sampler(self, dataset: Dataset) -> Sampler | None:
        """Under DDP in ``validate``/``test``: a sampler that gives every image to one process.

        Lightning's ``DistributedSampler`` repeats images so that every process gets as many,
        and the logged metrics then count those twice. Outside ``fit`` no DDP wrapper needs the
        processes to run the same number of batches, so here each image is evaluated once.
        (During ``fit`` the padded sampler stays: the wrapped model's forward may sync.)
        """
        trainer = self.trainer
        kwargs = getattr(trainer, "distributed_sampler_kwargs", None) if trainer else None
        if not kwargs or kwargs.get("num_replicas", 1) < 2 or trainer is None:
            return None
        if trainer.state.fn not in ("validate", "test"):
            return None
        if len(dataset) < kwargs["num_replicas"]:  # type: ignore[arg-type]
            return None  # a process without a batch would miss the metrics' sync; pad instead
        return UnrepeatedDistributedSampler(dataset, shuffle=False, **kwargs)

    def predict_dataloader(self) -> DataLoader:
        """Batches of ``(images, indices)``; indices are positions in :attr:`predict_files`."""
        return self._loader(self._require("predict_dataset", "predict"))

    # ---------------------------------------------------------------- checkpoints

    def state_dict(self) -> dict[str, Any]:
        """The class names, so that resuming or predicting checks (or restores) them."""
        if self._has_source():
            return {"class_names": self.class_names}
        if self._restored_class_names is not None:
            return {"class_names": list(self._restored_class_names)}
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restores the class names of a checkpoint, or checks them against this data.

        Args:
            state_dict: What :meth:`state_dict` returned when the checkpoint was saved.
        """
        names = state_dict.get("class_names")
        if names is None:
            return
        names = [str(n) for n in names]
        if not self._has_source():
            self._restored_class_names = names
            return
        if names != self.class_names:
            raise DataError(
                f"The checkpoint was trained on the classes {', '.join(names[:10])} but the "
                f"data has {', '.join(self.class_names[:10])}; labels would not match. Use the "
                "same data (class folders) as the checkpoint, or start a new training run."
            )
