"""In-memory images, Keras style: NHWC arrays or tensors and their labels become labelled splits.

:func:`index_arrays` is to arrays what :func:`~tlfinetune.sources.index_folder` is to a folder:
it validates them (shape, dtype, value range, label form), converts the images to uint8 NCHW
once, and splits validation images off when none are given.
"""

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from tlfinetune.errors import DataError
from tlfinetune.sources import Index, Split, split_off_val

__all__ = ["index_arrays"]


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


def index_arrays(
    arrays: Mapping[str, tuple[Any, Any]],
    class_names: Sequence[str] | None,
    val_split: float,
    seed: int,
) -> Index:
    """Indexes in-memory images (see :meth:`~tlfinetune.data.ImageDataModule.from_arrays`).

    Args:
        arrays: ``(images, labels)`` of ``train`` and optionally of ``val`` and ``test`` (a
            pair of ``None`` for a split that is not given).
        class_names: Name of each class; default ``"0"``, ``"1"``, ...
        val_split: Fraction of each class held out for validation when there is no ``val``.
        seed: Seed of that split.
    """
    raw: dict[str, tuple[torch.Tensor, np.ndarray, int | None]] = {}
    for role in ("train", "val", "test"):
        x, y = arrays.get(role, (None, None))
        if x is None and y is None:
            continue
        if x is None or y is None:
            missing = f"{role}_images" if x is None else f"{role}_labels"
            raise DataError(f"from_arrays() got {role} data without {missing}; give both.")
        images = _images_to_tensor(x, f"{role}_images")
        labels, width = _labels_to_ints(y, len(images), f"{role}_labels")
        raw[role] = (images, labels, width)
    names = None if class_names is None else [str(c) for c in class_names]
    widths = {w for _, _, w in raw.values() if w is not None}
    if len(widths) > 1:
        raise DataError(f"The one-hot label arrays have different widths {sorted(widths)}.")
    top = max(int(labels.max()) for _, labels, _ in raw.values()) + 1
    if names is not None:
        num_classes = len(names)
    else:
        num_classes = max([top, *widths])
        names = [str(i) for i in range(num_classes)]
    if num_classes < 2:
        raise DataError(f"from_arrays() needs at least two classes, got {num_classes}.")
    if widths and widths != {num_classes}:
        raise DataError(
            f"The labels are one-hot with {widths.pop()} columns but there are "
            f"{num_classes} class names."
        )
    for role, (_, labels, _) in raw.items():
        if labels.max() >= num_classes:
            raise DataError(
                f"{role}_labels has label {int(labels.max())}, but there are only "
                f"{num_classes} classes ({', '.join(names[:10])}); labels run from 0 to "
                f"{num_classes - 1}."
            )
    splits = {
        role: Split(f"{role} arrays", labels.tolist(), images=images)
        for role, (images, labels, _) in raw.items()
    }
    if "val" not in splits:
        splits.update(split_off_val(splits["train"], "training arrays", val_split, seed))
    return Index(list(names), splits, "arrays")
