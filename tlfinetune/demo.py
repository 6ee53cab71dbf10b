"""The embedded demo dataset: procedurally drawn shapes, generated on the fly, no download.

Six classes of shapes (``circle``, ``cross``, ``ring``, ``square``, ``stripes``, ``triangle``)
are drawn with random colours, positions, sizes and rotations on a noisy background cluttered
with lines and small distractor shapes of other classes. Every image is drawn from its own random
stream seeded by ``(seed, version, split, class, index)``, so the dataset is the same, byte for
byte, on every run with the same settings and library versions (PNG encoding by zlib).

The images are written as PNG files in ImageFolder layout (``train/``, ``val/``, ``test/``, one
sub-folder per class) under a cache folder, so that training on the demo goes through the same
code path as training on a user's folder. Generation takes well under two seconds and is
race-free: the files are written into a hidden temporary folder that is renamed into place in
one atomic step, so several processes (DDP ranks) may call :func:`ensure_demo_dataset` at once.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from tlfinetune.errors import DataError
from tlfinetune.machine import cache_root

__all__ = [
    "DEMO_CLASSES",
    "DEMO_VERSION",
    "demo_folder_name",
    "ensure_demo_dataset",
    "generate_demo_dataset",
    "render_demo_image",
]

DEMO_VERSION = 1
"""Bumped whenever the drawing code changes, so that stale caches are not reused."""

DEMO_CLASSES: tuple[str, ...] = ("circle", "cross", "ring", "square", "stripes", "triangle")
"""Class names of the demo dataset, in label order (sorted, as ImageFolder orders folders)."""

_SPLITS = ("train", "val", "test")
_MANIFEST = "demo.json"
_SUPERSAMPLE = 2


@dataclass(frozen=True)
class _Defaults:
    """The default demo configuration, said once: the public signatures below read it."""

    train_per_class: int = 60
    val_per_class: int = 20
    test_per_class: int = 20
    image_size: int = 64
    seed: int = 0


_DEFAULT = _Defaults()


def demo_folder_name(
    train_per_class: int = _DEFAULT.train_per_class,
    val_per_class: int = _DEFAULT.val_per_class,
    test_per_class: int = _DEFAULT.test_per_class,
    image_size: int = _DEFAULT.image_size,
    seed: int = _DEFAULT.seed,
) -> str:
    """Name of the cache sub-folder for one demo configuration (``demo-v1`` for the defaults)."""
    name = f"demo-v{DEMO_VERSION}"
    spec = _Defaults(train_per_class, val_per_class, test_per_class, image_size, seed)
    if spec != _DEFAULT:
        name += f"-{train_per_class}-{val_per_class}-{test_per_class}-{image_size}px-seed{seed}"
    return name


def _contrasting_colour(rng: np.random.Generator, against: np.ndarray) -> tuple[int, int, int]:
    """A random colour whose distance from ``against`` is large enough to be seen."""
    colour = rng.integers(0, 256, 3)
    for _ in range(20):
        if np.abs(colour - against).sum() >= 200:
            break
        colour = rng.integers(0, 256, 3)
    return int(colour[0]), int(colour[1]), int(colour[2])


def _rotated(points: np.ndarray, angle: float, cx: float, cy: float) -> list[tuple[float, float]]:
    c, s = np.cos(angle), np.sin(angle)
    x = points[:, 0] * c - points[:, 1] * s + cx
    y = points[:, 0] * s + points[:, 1] * c + cy
    return [(float(a), float(b)) for a, b in zip(x, y, strict=True)]


def _draw_shape(
    draw: ImageDraw.ImageDraw,
    kind: str,
    cx: float,
    cy: float,
    r: float,
    angle: float,
    colour: tuple[int, int, int],
    rng: np.random.Generator,
) -> None:
    """Draws one shape of class ``kind`` centred on ``(cx, cy)`` with radius about ``r``."""
    if kind == "circle":
        ry = r * rng.uniform(0.85, 1.0)
        draw.ellipse((cx - r, cy - ry, cx + r, cy + ry), fill=colour)
    elif kind == "ring":
        ry = r * rng.uniform(0.85, 1.0)
        width = max(2, round(r * rng.uniform(0.2, 0.35)))
        draw.ellipse((cx - r, cy - ry, cx + r, cy + ry), outline=colour, width=width)
    elif kind == "square":
        h = r * 0.8
        w = h * rng.uniform(0.85, 1.0)
        pts = np.array([(-w, -h), (w, -h), (w, h), (-w, h)])
        draw.polygon(_rotated(pts, angle, cx, cy), fill=colour)
    elif kind == "triangle":
        radii = r * rng.uniform(0.9, 1.1, 3)
        thetas = np.array([0.0, 2 * np.pi / 3, 4 * np.pi / 3]) + rng.uniform(-0.15, 0.15, 3)
        pts = np.stack([radii * np.cos(thetas), radii * np.sin(thetas)], axis=1)
        draw.polygon(_rotated(pts, angle, cx, cy), fill=colour)
    elif kind == "cross":
        w = r * rng.uniform(0.22, 0.32)
        bar = np.array([(-r, -w), (r, -w), (r, w), (-r, w)])
        draw.polygon(_rotated(bar, angle, cx, cy), fill=colour)
        draw.polygon(_rotated(bar, angle + np.pi / 2, cx, cy), fill=colour)
    elif kind == "stripes":
        n = int(rng.integers(3, 5))
        period = 2 * r / (n - 0.5)
        w = period * rng.uniform(0.22, 0.3)
        for k in range(n):
            offset = -r + period * (k + 0.25)
            bar = np.array([(-r, offset - w), (r, offset - w), (r, offset + w), (-r, offset + w)])
            draw.polygon(_rotated(bar, angle, cx, cy), fill=colour)
    else:  # pragma: no cover - internal misuse
        raise ValueError(f"unknown demo class {kind!r}")


def render_demo_image(class_name: str, rng: np.random.Generator, size: int = 64) -> np.ndarray:
    """Draws one demo image of class ``class_name`` as an ``(size, size, 3)`` uint8 array.

    Args:
        class_name: One of :data:`DEMO_CLASSES`.
        rng: The random stream that decides colours, geometry, clutter and noise.
        size: Side length in pixels of the square image.

    Returns:
        The RGB image.
    """
    if class_name not in DEMO_CLASSES:
        raise ValueError(f"unknown demo class {class_name!r}; expected one of {DEMO_CLASSES}")
    big = size * _SUPERSAMPLE

    # Background: a linear gradient between two random colours in a random direction.
    c0 = rng.integers(0, 256, 3).astype(np.float32)
    c1 = np.clip(c0 + rng.normal(0, 60, 3), 0, 255).astype(np.float32)
    theta = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:big, 0:big].astype(np.float32) / (big - 1)
    t = np.clip(0.5 + (xx - 0.5) * np.cos(theta) + (yy - 0.5) * np.sin(theta), 0, 1)[..., None]
    background = c0 * (1 - t) + c1 * t
    img = Image.fromarray(background.astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    mean_bg = (c0 + c1) / 2

    # Clutter behind the object: lines and small shapes of any class.
    for _ in range(int(rng.integers(1, 5))):
        x0, y0, x1, y1 = rng.uniform(0, big, 4)
        width = int(rng.integers(1, 3)) * _SUPERSAMPLE
        draw.line((x0, y0, x1, y1), fill=_contrasting_colour(rng, mean_bg), width=width)

    # The object of the class.
    r = rng.uniform(0.22, 0.40) * big
    margin = r * 0.8
    cx, cy = rng.uniform(margin, big - margin, 2)
    angle = rng.uniform(0, 2 * np.pi)
    colour = _contrasting_colour(rng, mean_bg)

    # Distractors: small shapes of random classes (at most 30 % of the object's radius).
    n_distract = int(rng.integers(0, 3))
    for _ in range(n_distract):
        kind = DEMO_CLASSES[int(rng.integers(len(DEMO_CLASSES)))]
        dr = r * rng.uniform(0.15, 0.3)
        dx, dy = rng.uniform(dr, big - dr, 2)
        _draw_shape(
            draw,
            kind,
            dx,
            dy,
            dr,
            rng.uniform(0, 2 * np.pi),
            _contrasting_colour(rng, mean_bg),
            rng,
        )
    _draw_shape(draw, class_name, cx, cy, r, angle, colour, rng)

    small = img.reduce(_SUPERSAMPLE) if _SUPERSAMPLE > 1 else img
    pixels = np.asarray(small, dtype=np.float32)
    pixels = pixels * rng.uniform(0.8, 1.1) + rng.normal(0, rng.uniform(3, 14), pixels.shape)
    return np.clip(pixels + 0.5, 0, 255).astype(np.uint8)


def generate_demo_dataset(
    out_dir: Path | str,
    *,
    train_per_class: int = _DEFAULT.train_per_class,
    val_per_class: int = _DEFAULT.val_per_class,
    test_per_class: int = _DEFAULT.test_per_class,
    image_size: int = _DEFAULT.image_size,
    seed: int = _DEFAULT.seed,
) -> Path:
    """Writes the demo dataset as PNG files into ``out_dir/{train,val,test}/<class>/NNNN.png``.

    ``out_dir`` must not hold an older dataset; use :func:`ensure_demo_dataset` for a cached,
    race-free copy.

    Args:
        out_dir: Folder to write into (created if missing).
        train_per_class: Training images per class.
        val_per_class: Validation images per class.
        test_per_class: Test images per class.
        image_size: Side length in pixels of the square images.
        seed: Seed of the random streams; the same seed gives the same bytes.

    Returns:
        ``out_dir`` as a :class:`~pathlib.Path`.
    """
    out = Path(out_dir)
    counts = {"train": train_per_class, "val": val_per_class, "test": test_per_class}
    for split_idx, split in enumerate(_SPLITS):
        for class_idx, name in enumerate(DEMO_CLASSES):
            folder = out / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(counts[split]):
                rng = np.random.default_rng([seed, DEMO_VERSION, split_idx, class_idx, i])
                pixels = render_demo_image(name, rng, image_size)
                Image.fromarray(pixels, "RGB").save(folder / f"{i:04d}.png", compress_level=1)
    manifest = {
        "version": DEMO_VERSION,
        "classes": list(DEMO_CLASSES),
        "counts": counts,
        "image_size": image_size,
        "seed": seed,
    }
    (out / _MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return out


def ensure_demo_dataset(
    cache_dir: Path | str | None = None,
    *,
    train_per_class: int = _DEFAULT.train_per_class,
    val_per_class: int = _DEFAULT.val_per_class,
    test_per_class: int = _DEFAULT.test_per_class,
    image_size: int = _DEFAULT.image_size,
    seed: int = _DEFAULT.seed,
) -> Path:
    """Returns the folder of the demo dataset, generating it first if it is not cached yet.

    The dataset is written into a hidden temporary folder next to its final place and renamed
    into place atomically, so concurrent callers (DDP ranks, parallel test workers) never see a
    half-written dataset: the loser of the race deletes its own copy and uses the winner's.

    Args:
        cache_dir: Folder under which to cache; default :func:`tlfinetune.machine.cache_root`.
        train_per_class: Training images per class.
        val_per_class: Validation images per class.
        test_per_class: Test images per class.
        image_size: Side length in pixels of the square images.
        seed: Seed of the random streams.

    Returns:
        The dataset folder, which holds ``train/``, ``val/`` and ``test/`` class folders.

    Raises:
        DataError: The cache folder cannot be written, or holds a broken copy.
    """
    for name, value in (
        ("train_per_class", train_per_class),
        ("val_per_class", val_per_class),
        ("test_per_class", test_per_class),
    ):
        if value < 1:
            raise DataError(f"The demo dataset needs {name} >= 1, got {value}.")
    if image_size < 16:
        raise DataError(f"The demo dataset needs image_size >= 16 pixels, got {image_size}.")
    root = Path(cache_dir).expanduser() if cache_dir is not None else cache_root()
    final = root / demo_folder_name(
        train_per_class, val_per_class, test_per_class, image_size, seed
    )
    if final.is_dir():
        if not (final / _MANIFEST).is_file():
            raise DataError(
                f"The demo dataset cache folder {final} exists but is incomplete (it has no "
                f"{_MANIFEST}). Delete that folder and run again; it is regenerated in seconds."
            )
        return final
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-tmp-", dir=root))
    except OSError as exc:
        raise DataError(
            f"Cannot create the demo dataset cache folder under {root} ({exc}). Set the "
            "TLFINETUNE_CACHE environment variable to a writable folder."
        ) from exc
    try:
        generate_demo_dataset(
            tmp,
            train_per_class=train_per_class,
            val_per_class=val_per_class,
            test_per_class=test_per_class,
            image_size=image_size,
            seed=seed,
        )
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache may be shared
        try:
            os.rename(tmp, final)
        except OSError:
            # Another process renamed its copy first (ENOTEMPTY/EEXIST): use theirs.
            if not (final / _MANIFEST).is_file():
                raise
    except OSError as exc:
        raise DataError(
            f"Cannot write the demo dataset into {root} ({exc}). Set the TLFINETUNE_CACHE "
            "environment variable to a writable folder with a few MB free."
        ) from exc
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final
