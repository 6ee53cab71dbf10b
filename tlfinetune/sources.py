"""Finding images: class folders and CSV files become labelled train/val/test splits.

A :class:`Split` is the list of files and labels of one split before it becomes a Dataset; an
:class:`Index` is the class names and the splits of one source. :func:`index_folder` and
:func:`index_csv` read and validate a source, with error messages that name the culprit, and
split validation images off the training images when the source has none
(:func:`split_off_val`). In-memory arrays are indexed the same way by :mod:`tlfinetune.arrays`.
The datamodule decides which source to read; nothing here decodes pixels.
"""

import csv
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from tlfinetune.errors import DataError
from tlfinetune.images import IMAGE_EXTENSIONS, PathList, is_hidden, is_image_file, list_images
from tlfinetune.sampling import stratified_split

__all__ = ["LIST_IN_MESSAGE", "Index", "Split", "index_csv", "index_folder", "split_off_val"]

# The records keep the logger name they had before data.py was split, so logging settings for
# tlfinetune.data still apply to them.
log = logging.getLogger("tlfinetune.data")

LIST_IN_MESSAGE = 5  # name at most this many culprits in one message
_VAL_FOLDER_NAMES = ("val", "valid", "validation")


@dataclass
class Split:
    """One split of a source, before it becomes a Dataset: files (or images) and their labels."""

    origin: str  # human description for messages ("folder /x/train", "CSV /x/a.csv")
    labels: list[int]
    files: PathList | None = None  # file sources (any sequence of paths given is packed)
    rows: list[str] | None = None  # "CSV a.csv row 3 (line 4)" per file, for CSV sources
    images: torch.Tensor | None = None  # array sources: uint8 NCHW
    scanned: bool = False

    def __post_init__(self) -> None:
        if self.files is not None and not isinstance(self.files, PathList):
            self.files = PathList(self.files)

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, positions: Sequence[int], origin: str | None = None) -> "Split":
        """The items at ``positions``, in that order (``origin`` renames the result)."""
        pos = list(positions)
        return replace(
            self,
            origin=origin or self.origin,
            labels=[self.labels[i] for i in pos],
            files=None if self.files is None else self.files.take(pos),
            rows=None if self.rows is None else [self.rows[i] for i in pos],
            images=None if self.images is None else self.images[pos],
        )


@dataclass
class Index:
    """What a source holds: class names in label order and its splits."""

    class_names: list[str]
    splits: dict[str, Split]  # "train", "val" and maybe "test"
    description: str


def _visible_dirs(folder: Path) -> list[Path]:
    try:
        entries = sorted(folder.iterdir(), key=lambda p: p.name)
    except OSError as exc:
        fix = (
            f"Make it readable (chmod u+rx {folder}, or run as a user who may read it)"
            if isinstance(exc, PermissionError)
            else "Check that the disk is mounted and the path is right"
        )
        raise DataError(
            f"Cannot list the data folder {folder} ({exc.strerror or exc}). {fix}, or copy the "
            "images to a folder you can read and point data.root there."
        ) from exc
    return [p for p in entries if p.is_dir() and not is_hidden(p.name)]


def _loose_images(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.is_file() and is_image_file(p.name)]


def _scan_class_folders(folder: Path, role: str) -> dict[str, PathList]:
    """Maps each class folder name under ``folder`` to its images (recursively, sorted)."""
    class_dirs = _visible_dirs(folder)
    if not class_dirs:
        loose = _loose_images(folder)
        hint = (
            f" It holds {len(loose)} images directly (e.g. {loose[0].name}); move them into one "
            "sub-folder per class."
            if loose
            else ""
        )
        raise DataError(
            f"The {role} folder {folder} has no class folders.{hint} Expected ImageFolder layout: "
            f"{folder}/<class name>/<image files>, one sub-folder per class (hidden folders "
            "such as .ipynb_checkpoints do not count)."
        )
    classes = {d.name: list_images(d) for d in class_dirs}
    empty = [name for name, files in classes.items() if not files]
    if len(empty) == len(classes):
        raise DataError(
            f"The {role} folder {folder} has class folders ({', '.join(list(classes)[:5])}"
            f"{', ...' if len(classes) > 5 else ''}) but no images in any of them. Image files "
            f"need one of the extensions {', '.join(sorted(IMAGE_EXTENSIONS)[:12])}, ...; "
            "other files are ignored."
        )
    if empty:
        shown = ", ".join(str(folder / name) for name in empty[:LIST_IN_MESSAGE])
        more = f" and {len(empty) - LIST_IN_MESSAGE} more" if len(empty) > LIST_IN_MESSAGE else ""
        raise DataError(
            f"Class folder {shown}{more} has no images (image extensions are "
            f"{', '.join(sorted(IMAGE_EXTENSIONS)[:8])}, ...). Add images to it, or remove the "
            "folder if it is not a class."
        )
    loose = _loose_images(folder)
    if loose:
        log.warning(
            "Ignoring %d images directly in %s (e.g. %s): images must be inside a class folder.",
            len(loose),
            folder,
            loose[0].name,
        )
    return classes


def _natural_class_order(names: Sequence[str]) -> list[str]:
    """Sorted class names; numerically when every name is an integer ("2" before "10")."""
    if names and all(re.fullmatch(r"-?\d+", n) for n in names):
        return sorted(names, key=int)
    return sorted(names)


def _read_csv(csv_path: Path, role: str) -> tuple[list[Path], list[str], list[str]]:
    if not csv_path.is_file():
        raise DataError(
            f"The {role} CSV file {csv_path} does not exist (data.{role}_csv); check the path."
        )
    files: list[Path] = []
    labels: list[str] = []
    rows: list[str] = []
    base = csv_path.parent
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            names = [h.strip().lower() for h in header] if header else []
            if "path" not in names or "label" not in names:
                raise DataError(
                    f"The CSV file {csv_path} must start with a header row naming the "
                    f"columns path and label (found {header!r}); add the line "
                    "'path,label' at the top."
                )
            ip, il = names.index("path"), names.index("label")
            for row_no, row in enumerate(reader, start=1):
                where = f"CSV file {csv_path} row {row_no} (line {reader.line_num})"
                if not row or all(not c.strip() for c in row):
                    continue
                if len(row) <= max(ip, il):
                    raise DataError(f"{where} has {len(row)} columns; expected path,label.")
                path_s, label = row[ip].strip(), row[il].strip()
                if not path_s or not label:
                    raise DataError(
                        f"{where} has an empty {'path' if not path_s else 'label'}; every "
                        "row needs both."
                    )
                p = Path(path_s).expanduser()
                files.append(p if p.is_absolute() else base / p)
                labels.append(label)
                rows.append(where)
    except UnicodeDecodeError as exc:
        raise DataError(f"The CSV file {csv_path} is not UTF-8 text ({exc}).") from exc
    except csv.Error as exc:
        raise DataError(f"The CSV file {csv_path} is malformed ({exc}).") from exc
    if not files:
        raise DataError(f"The {role} CSV file {csv_path} lists no images.")
    return files, labels, rows


def split_off_val(train: Split, what: str, val_split: float, seed: int) -> dict[str, Split]:
    """Holds out ``val_split`` of each class of ``train`` for validation (see stratified_split).

    Args:
        train: The split to divide.
        what: How messages name it ("training folder /x/train").
        val_split: Fraction of each class that goes to validation.
        seed: Seed of the split.

    Returns:
        ``{"train": ..., "val": ...}``.
    """
    tr, va = stratified_split(train.labels, val_split, seed)
    if not va:
        raise DataError(
            f"The {what} is too small to hold out validation images with val_split = "
            f"{val_split} (each class needs at least 2 images); add images or give a "
            "separate validation set."
        )
    return {
        "train": train.subset(tr, origin=f"{train.origin} (training part, val_split {val_split})"),
        "val": train.subset(va, origin=f"{train.origin} (validation part, val_split {val_split})"),
    }


def index_folder(root: Path, val_split: float, seed: int, *, demo: bool = False) -> Index:
    """Indexes a folder in ImageFolder layout (see :class:`~tlfinetune.data.ImageDataModule`).

    ``root/<class>/...`` is split by ``val_split`` (and kept whole as ``all``, for testing);
    ``root/train`` with ``root/val`` (or ``valid``, ``validation``) and ``root/test`` are used
    as they are, train split by ``val_split`` when there is no validation folder.
    """
    if not root.exists():
        raise DataError(
            f"The data folder {root} does not exist. Set data.root to a folder of images in "
            "ImageFolder layout (root/<class>/<images>, or root/train/<class>/... with "
            "root/val/<class>/...), or use root: demo for the built-in demo dataset."
        )
    if not root.is_dir():
        raise DataError(
            f"data.root {root} is a file, not a folder. Point it at the folder that holds "
            "one sub-folder per class (or train/ and val/ folders); for a CSV file use "
            "data.train_csv."
        )
    dirs = {d.name: d for d in _visible_dirs(root)}
    if "train" in dirs:
        val_names = [n for n in _VAL_FOLDER_NAMES if n in dirs]
        if len(val_names) > 1:
            raise DataError(
                f"The data folder {root} has several validation folders "
                f"({', '.join(val_names)}); keep one of them."
            )
        folders = {"train": dirs["train"]}
        if val_names:
            folders["val"] = dirs[val_names[0]]
        if "test" in dirs:
            folders["test"] = dirs["test"]
        others = sorted(set(dirs) - {"train", "test", *val_names})
        if others:
            log.warning(
                "Ignoring folders %s in %s: next to a train/ folder only train/, val/ and "
                "test/ are read.",
                ", ".join(others),
                root,
            )
        roles = {"train": "training", "val": "validation", "test": "test"}
        per_split = {k: _scan_class_folders(f, roles[k]) for k, f in folders.items()}
        class_names = sorted(per_split["train"])
        for split, classes in per_split.items():
            unknown = sorted(set(classes) - set(class_names))
            if unknown:
                shown = ", ".join(str(folders[split] / u) for u in unknown[:LIST_IN_MESSAGE])
                raise DataError(
                    f"The {roles[split]} class folder(s) {shown} have no counterpart in "
                    f"{folders['train']}; the training folder defines the classes "
                    f"({', '.join(class_names[:10])}). Rename or remove them, or add "
                    "training images for them."
                )
            missing = sorted(set(class_names) - set(classes))
            if missing:
                log.warning(
                    "The %s folder %s has no images of class(es) %s.",
                    roles[split],
                    folders[split],
                    ", ".join(missing),
                )
        splits = {}
        for split, classes in per_split.items():
            files = PathList(f for name in class_names for f in classes.get(name, []))
            labels = [i for i, name in enumerate(class_names) for _ in classes.get(name, [])]
            splits[split] = Split(f"folder {folders[split]}", labels, files)
        if "val" not in splits:
            splits.update(
                split_off_val(
                    splits["train"], f"training folder {folders['train']}", val_split, seed
                )
            )
    else:
        classes = _scan_class_folders(root, "data")
        class_names = sorted(classes)
        files = PathList(f for name in class_names for f in classes[name])
        labels = [i for i, name in enumerate(class_names) for _ in classes[name]]
        whole = Split(f"folder {root}", labels, files)
        splits = split_off_val(whole, f"folder {root}", val_split, seed)
        # `test --data.root FOLDER` on a plain class folder evaluates all of it.
        splits["all"] = whole
    if len(class_names) < 2:
        raise DataError(
            f"The data folder {root} has a single class ({class_names[0]}); classification "
            "needs at least two class folders."
        )
    return Index(class_names, splits, "demo dataset " + str(root) if demo else f"folder {root}")


def index_csv(
    train_csv: Path, val_csv: Path | None, test_csv: Path | None, val_split: float, seed: int
) -> Index:
    """Indexes CSV files of ``path,label`` rows; the training CSV's labels are the classes.

    Without ``val_csv``, train is split by ``val_split``.
    """
    files, names, rows = _read_csv(train_csv, "train")
    class_names = _natural_class_order(sorted(set(names)))
    if len(class_names) < 2:
        raise DataError(
            f"The CSV file {train_csv} has a single label ({class_names[0]}); "
            "classification needs at least two classes."
        )
    lookup = {c: i for i, c in enumerate(class_names)}
    splits = {"train": Split(f"CSV file {train_csv}", [lookup[n] for n in names], files, rows)}
    for role, value in (("val", val_csv), ("test", test_csv)):
        if value is None:
            continue
        path = Path(value).expanduser()
        files, names, rows = _read_csv(path, role)
        unknown = [(r, n) for r, n in zip(rows, names, strict=True) if n not in lookup]
        if unknown:
            row, label = unknown[0]
            more = f" ({len(unknown) - 1} more rows too)" if len(unknown) > 1 else ""
            raise DataError(
                f"{row} has the label {label!r}, which the training CSV {train_csv} does "
                f"not have{more}; known labels: {', '.join(class_names[:10])}"
                f"{', ...' if len(class_names) > 10 else ''}. Fix the label or add training "
                "images of that class."
            )
        splits[role] = Split(f"CSV file {path}", [lookup[n] for n in names], files, rows)
    if "val" not in splits:
        splits.update(split_off_val(splits["train"], f"training CSV {train_csv}", val_split, seed))
    return Index(class_names, splits, f"CSV file {train_csv}")
