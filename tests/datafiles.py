"""Tiny images, CSV files and arrays on disk or in memory for the data tests."""

import io
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def colour(class_idx: int, i: int) -> tuple[int, int, int]:
    """A colour that identifies (class, index) in a solid test image."""
    return (10 + 40 * class_idx, 3 * i, 255 - 3 * i)


def tree(root: Path, spec: dict[str, int], size: tuple[int, int] = (12, 10)) -> Path:
    """Creates ``n`` solid PNGs in each folder ``rel`` of ``spec``; colours encode class/index."""
    for class_idx, (rel, n) in enumerate(spec.items()):
        folder = root / rel
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            pixels = np.empty((size[1], size[0], 3), np.uint8)
            pixels[...] = colour(class_idx, i)
            Image.fromarray(pixels).save(folder / f"img{i:03d}.png")
    return root


def dm_kwargs(**extra):
    return {"image_size": 8, "batch_size": 4, "num_workers": 0, "augment": False, **extra}


def file_set(dataset) -> set[Path]:
    return set(dataset.files)


def first_pixel(x: torch.Tensor) -> tuple[int, int, int]:
    return tuple(int(v) for v in x[:, x.shape[1] // 2, x.shape[2] // 2])


def truncated_jpeg_bytes(size=(32, 24)) -> bytes:
    """A JPEG cut after its header, in the middle of the pixel data."""
    buf = io.BytesIO()
    pixels = np.random.default_rng(1).integers(0, 256, (size[1], size[0], 3), np.uint8)
    Image.fromarray(pixels).save(buf, "JPEG")
    data = buf.getvalue()
    return data[: len(data) * 2 // 3]


def corrupt_png(path: Path) -> Path:
    """A PNG whose header and end marker are fine but whose pixel data is broken."""
    buf = io.BytesIO()
    pixels = np.random.default_rng(0).integers(0, 256, (16, 16, 3), np.uint8)
    Image.fromarray(pixels).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    start = data.index(b"IDAT") + 20
    data[start : start + 40] = bytes(b ^ 0x55 for b in data[start : start + 40])
    path.write_bytes(bytes(data))
    return path


def write_csv(path: Path, rows: list[tuple[str, str]], header: str = "path,label") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join([header, *(f"{p},{label}" for p, label in rows)]) + "\n")
    return path


def random_nhwc(n=12, h=10, w=9, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def all_items(dataset) -> tuple[torch.Tensor, list[int]]:
    xs, ys = zip(*(dataset[i] for i in range(len(dataset))), strict=True)
    return torch.stack(xs), list(ys)


def fail_listing(monkeypatch, blocked: Path) -> None:
    """Listing ``blocked`` fails as a chmod 000 folder does for a user who is not root."""

    def refuse(real):
        def listing(path=".", *args):
            if Path(os.fspath(path)) == blocked:
                raise PermissionError(13, "Permission denied", os.fspath(path))
            return real(path, *args)

        return listing

    monkeypatch.setattr(os, "scandir", refuse(os.scandir))
    monkeypatch.setattr(os, "listdir", refuse(os.listdir))
