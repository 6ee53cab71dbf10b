"""Indexing image sources: class folders, CSV files and in-memory arrays become labelled splits.

A split (:class:`_Split`) is the list of files (or images) and labels of train, val or test before
it becomes a Dataset; these helpers read and validate the raw sources, with error messages that
name the culprit. The datamodule decides which source to read and how to split it.
"""

import csv
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tlfinetune.errors import DataError
from tlfinetune.images import IMAGE_EXTENSIONS, is_hidden, is_image_file, list_images

# The records keep the logger name they had before data.py was split, so logging settings for
# tlfinetune.data still apply to them.
log = logging.getLogger("tlfinetune.data")

_LIST_IN_MESSAGE = 5  # name at most this many culprits in one message


@dataclass
class _Split:
    """One split of a source, before it becomes a Dataset."""

    origin: str  # human description for messages ("folder /x/train", "CSV /x/a.csv")
    labels: list[int]
    files: list[Path] | None = None  # file sources
    rows: list[str] | None = None  # "CSV a.csv row 3 (line 4)" per file, for CSV sources
    images: torch.Tensor | None = None  # array sources: uint8 NCHW
    scanned: bool = False

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, positions: Sequence[int], origin: str | None = None) -> "_Split":
        pos = list(positions)
        return replace(
            self,
            origin=origin or self.origin,
            labels=[self.labels[i] for i in pos],
            files=None if self.files is None else [self.files[i] for i in pos],
            rows=None if self.rows is None else [self.rows[i] for i in pos],
            images=None if self.images is None else self.images[pos],
        )


@dataclass
class _Index:
    class_names: list[str]
    splits: dict[str, _Split]  # "train", "val" and maybe "test"
    description: str


def _visible_dirs(folder: Path) -> list[Path]:
    try:
        entries = sorted(folder.iterdir(), key=lambda p: p.name)
    except OSError as exc:
        raise DataError(f"Cannot list the data folder {folder} ({exc}).") from exc
    return [p for p in entries if p.is_dir() and not is_hidden(p.name)]


def _loose_images(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.is_file() and is_image_file(p.name)]


def _scan_class_folders(folder: Path, role: str) -> dict[str, list[Path]]:
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
        shown = ", ".join(str(folder / name) for name in empty[:_LIST_IN_MESSAGE])
        more = f" and {len(empty) - _LIST_IN_MESSAGE} more" if len(empty) > _LIST_IN_MESSAGE else ""
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


def _as_numpy(x: Any, what: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.is_floating_point() and x.dtype not in (torch.float32, torch.float64):
            x = x.float()
        return x.numpy()
    try:
        return np.asarray(x)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{what} is not an array or tensor ({type(x).__name__}).") from exc


def _images_to_tensor(x: Any, what: str) -> torch.Tensor:
    """NHWC / NHW images (uint8, ints, floats, bools) to a uint8 NCHW tensor."""
    a = _as_numpy(x, what)
    if a.ndim == 3:
        a = a[..., None]
    if a.ndim != 4 or a.shape[-1] not in (1, 3, 4):
        hint = (
            " It looks channels-first (NCHW); permute it to NHWC, e.g. x.permute(0, 2, 3, 1)."
            if a.ndim == 4 and a.shape[1] in (1, 3, 4)
            else ""
        )
        raise DataError(
            f"{what} has shape {tuple(a.shape)}; expected (N, H, W, C) with C = 1, 3 or 4 "
            f"(Keras' NHWC layout) or (N, H, W) for grayscale.{hint}"
        )
    if a.shape[0] == 0:
        raise DataError(f"{what} is empty (0 images).")
    if a.dtype == np.bool_:
        a = a.astype(np.uint8) * 255
    elif a.dtype != np.uint8:
        if not np.issubdtype(a.dtype, np.number):
            raise DataError(f"{what} has dtype {a.dtype}; expected uint8, integer or float.")
        af = a.astype(np.float64)
        if not np.isfinite(af).all():
            raise DataError(f"{what} contains NaN or infinite values.")
        lo, hi = float(af.min()), float(af.max())
        if lo < 0 or hi > 255:
            raise DataError(
                f"{what} has values in [{lo:g}, {hi:g}]; expected [0, 1] or [0, 255] (undo any "
                "normalisation: the model normalises itself)."
            )
        scale = 255.0 if np.issubdtype(a.dtype, np.floating) and hi <= 1.0 else 1.0
        a = np.clip(np.rint(af * scale), 0, 255).astype(np.uint8)
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=-1)
    elif a.shape[-1] == 4:  # composite onto white, like images.to_rgb
        alpha = a[..., 3:4].astype(np.float32) / 255.0
        rgb = a[..., :3].astype(np.float32) * alpha + 255.0 * (1.0 - alpha)
        a = np.clip(np.rint(rgb), 0, 255).astype(np.uint8)
    return torch.from_numpy(np.ascontiguousarray(a)).permute(0, 3, 1, 2).contiguous()


def _labels_to_ints(y: Any, n: int, what: str) -> tuple[np.ndarray, int | None]:
    """Integer labels (or one-hot rows, reduced by argmax) and the one-hot width if any."""
    a = _as_numpy(y, what)
    width = None
    if a.ndim == 2 and a.shape[1] == 1:
        a = a[:, 0]
    elif a.ndim == 2:
        width = int(a.shape[1])
        if width < 2:
            raise DataError(f"{what} is one-hot with width {width}; need at least 2 classes.")
        a = np.argmax(a, axis=1)
    if a.ndim != 1:
        raise DataError(
            f"{what} has shape {tuple(a.shape)}; expected (N,) integer labels or (N, classes) "
            "one-hot rows."
        )
    if len(a) != n:
        raise DataError(f"{what} has {len(a)} labels but there are {n} images.")
    if not np.issubdtype(a.dtype, np.integer) and (
        not np.issubdtype(a.dtype, np.number) or not np.all(np.equal(np.mod(a, 1), 0))
    ):
        raise DataError(f"{what} must hold whole-number class indices, got dtype {a.dtype}.")
    a = a.astype(np.int64)
    if len(a) and a.min() < 0:
        raise DataError(f"{what} has a negative label ({int(a.min())}); labels start at 0.")
    return a, width
