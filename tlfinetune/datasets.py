"""The torch Datasets the datamodule hands to its loaders: files, in-memory arrays, predictions.

They only turn indices into ``(uint8 image, label)`` items; finding the files and labels is
:mod:`tlfinetune.sources`' job and choosing transforms and loaders is the datamodule's.
"""

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch.utils.data import Dataset
from torchvision.transforms.v2 import functional as TF

from tlfinetune.errors import DataError
from tlfinetune.images import DEFAULT_MAX_IMAGE_PIXELS, SKIP_HINT, PathList, load_rgb

__all__ = ["ArrayDataset", "ImageFileDataset", "IndexedDataset", "append_lines"]

# The records keep the logger name they had before data.py was split, so logging settings for
# tlfinetune.data still apply to them.
log = logging.getLogger("tlfinetune.data")


def append_lines(path: Path, lines: Sequence[str]) -> None:
    """Appends ``lines`` to the text file ``path``; a failure is logged, never raised."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in lines))
    except OSError as exc:  # reporting must not stop training
        log.warning("Could not write the list of bad images to %s: %s", path, exc)


class ImageFileDataset(Dataset):
    """Images read from files: items are ``(uint8 tensor (3, S, S), label)``.

    A decode failure raises :class:`~tlfinetune.errors.DataError` naming the file (inside a
    DataLoader worker, PyTorch re-raises it in the main process as a ``DataError`` whose message
    carries the worker's traceback, file name included). With ``skip_bad_images`` the failure is
    logged once per process, the file is appended to ``bad_images_log``, and the next readable
    sample (``index + 1``, ``index + 2``, ... wrapping around) is returned instead so that batches
    keep their size; with ``substitute_blank`` (used for prediction, where each index must stay
    the file it names) a black image is returned instead.

    Args:
        files: Image files.
        labels: Label of each file (``-1`` when unlabelled).
        transform: Applied to the decoded uint8 CHW tensor.
        image_size: Output side length; used to decode large JPEGs at reduced size.
        max_image_pixels: Decompression-bomb limit (``None``: no limit).
        skip_bad_images: Substitute for images that fail to decode instead of raising.
        bad_images_log: File to which paths of images that failed to decode are appended.
        substitute_blank: With ``skip_bad_images``, return a black image instead of another one.
    """

    def __init__(
        self,
        files: Sequence[Path],
        labels: Sequence[int],
        transform: Callable[[torch.Tensor], torch.Tensor],
        *,
        image_size: int,
        max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
        skip_bad_images: bool = False,
        bad_images_log: Path | None = None,
        substitute_blank: bool = False,
    ) -> None:
        if len(files) != len(labels):
            raise ValueError("files and labels differ in length")
        self.files = files if isinstance(files, PathList) else PathList(files)
        self.labels = [int(x) for x in labels]
        self.transform = transform
        self.image_size = image_size
        self.max_image_pixels = max_image_pixels
        self.skip_bad_images = skip_bad_images
        self.bad_images_log = bad_images_log
        self.substitute_blank = substitute_blank
        self._reported: set[Path] = set()

    def __len__(self) -> int:
        return len(self.files)

    def _load(self, i: int) -> torch.Tensor:
        img = load_rgb(self.files[i], self.image_size, max_image_pixels=self.max_image_pixels)
        return TF.pil_to_tensor(img)

    def _report(self, path: Path, exc: DataError) -> None:
        if path in self._reported:
            return
        self._reported.add(path)
        log.warning("Skipping an image that cannot be decoded (skip_bad_images): %s", exc)
        if self.bad_images_log is not None:
            append_lines(self.bad_images_log, [str(path)])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        n = len(self.files)
        if not -n <= index < n:  # iteration stops here, before the wrap-around below
            raise IndexError(f"index {index} out of range for {n} images")
        index %= n
        for step in range(n):
            j = (index + step) % n
            try:
                pixels = self._load(j)
            except DataError as exc:
                if not self.skip_bad_images:
                    raise DataError(f"{exc} {SKIP_HINT}") from exc
                self._report(self.files[j], exc)
                if self.substitute_blank:
                    blank = torch.zeros(3, self.image_size, self.image_size, dtype=torch.uint8)
                    return blank, self.labels[index]
                continue
            return self.transform(pixels), self.labels[j]
        raise DataError(
            f"None of the {n} images of this dataset (the first is {self.files[0]}) can be "
            "decoded. Check the files, e.g. open a few in an image viewer."
        )


class ArrayDataset(Dataset):
    """In-memory images: items are ``(uint8 tensor (3, S, S), label)``.

    Args:
        images: uint8 tensor of shape ``(N, 3, H, W)``.
        labels: Label of each image.
        transform: Applied to each uint8 CHW image.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: Sequence[int],
        transform: Callable[[torch.Tensor], torch.Tensor],
    ) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError("images must be a uint8 tensor of shape (N, 3, H, W)")
        if len(images) != len(labels):
            raise ValueError("images and labels differ in length")
        self.images = images
        self.labels = [int(x) for x in labels]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.images[index]), self.labels[index]


class IndexedDataset(Dataset):
    """Wraps a labelled dataset for prediction: items are ``(image, index)``."""

    def __init__(self, base: Dataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.base[index][0], index
