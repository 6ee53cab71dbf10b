"""Image discovery, a cheap header check, and decoding of any image file to 8-bit RGB.

Decisions, in one place:

* **Which files are images.** A file whose extension is in :data:`IMAGE_EXTENSIONS` (what Pillow
  reads, plus formats people keep next to their photos that Pillow may not read without a
  plugin: HEIC/HEIF, JPEG XL, camera RAW, SVG). Other files (``.txt``, ``.csv``, ``.DS_Store``)
  are ignored silently. Hidden files and folders (name starting with ``.``, such as
  ``.ipynb_checkpoints`` or macOS ``._photo.jpg`` resource forks) are skipped. Files with an
  image extension that Pillow cannot read are *reported* (they are bad images), never dropped
  silently.
* **Folders.** Folders are searched recursively and links to folders are followed, except a
  link that leads back into a folder it is read from (a loop: followed, it would count the same
  images again and again, under the wrong class), which is an error naming the link, as is a
  folder that cannot be read (its images would silently be missing). These are errors even with
  ``skip_bad_images``, which is about image files: a folder problem is fixed once, in the folder.
* **Alpha.** Transparent pixels are composited onto **white** (modes ``RGBA``, ``LA``, ``PA``,
  ``P`` with a transparency entry), the way a browser or an image viewer shows them; dropping
  the alpha channel would instead reveal whatever colour happens to be stored under transparent
  pixels (often black, sometimes garbage).
* **16-bit and float.** ``I;16*`` images (16-bit grayscale PNG/TIFF) are scaled with
  ``round(v * 255 / 65535)``, so 16-bit mid-grey stays mid-grey (Pillow's own conversion clips
  them to white). Mode ``I`` (32-bit integers) is treated as 16-bit when any value exceeds 255 and
  as 8-bit otherwise. Mode ``F`` (floats) is taken as ``[0, 1]`` when its maximum is at most 1,
  as ``[0, 255]`` when at most 255, as 16-bit when at most 65535, and scaled by its maximum
  beyond that. 16-bit RGB(A) files are reduced to 8 bits by Pillow itself when opened.
* **Orientation.** The EXIF orientation tag is applied (``ImageOps.exif_transpose``).
* **Reduced decoding.** With ``target_size``, JPEGs much larger than needed are decoded at a
  reduced DCT scale (``Image.draft``) that keeps the shorter side at least ``2 * target_size``
  pixels, which keeps the quality of the later anti-aliased resize and crops.
* **Decompression bombs.** An image with more pixels than ``max_image_pixels`` (default Pillow's
  :data:`PIL.Image.MAX_IMAGE_PIXELS`) is refused with a :class:`~tlfinetune.errors.DataError`
  naming the file and the setting; ``None`` disables the check. Pillow's global settings
  (``Image.MAX_IMAGE_PIXELS``, ``ImageFile.LOAD_TRUNCATED_IMAGES``) are left alone, except that a
  limit *above* Pillow's is applied by raising Pillow's limit for the duration of the header
  read, under a lock.
* **Truncated files** are errors (``ImageFile.LOAD_TRUNCATED_IMAGES`` stays ``False``).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from tlfinetune.errors import DataError

__all__ = [
    "DEFAULT_MAX_IMAGE_PIXELS",
    "IMAGE_EXTENSIONS",
    "ImageInfo",
    "SKIP_HINT",
    "PathList",
    "is_hidden",
    "is_image_file",
    "list_images",
    "load_rgb",
    "probe_image",
    "to_rgb",
]

DEFAULT_MAX_IMAGE_PIXELS: int | None = Image.MAX_IMAGE_PIXELS
"""Pillow's decompression-bomb limit at import time (89,478,485 pixels unless changed)."""

_PILLOW_EXTENSIONS = frozenset(
    {
        ".apng",
        ".avif",
        ".bmp",
        ".dib",
        ".gif",
        ".ico",
        ".j2k",
        ".jfif",
        ".jp2",
        ".jpe",
        ".jpeg",
        ".jpg",
        ".jpx",
        ".pbm",
        ".pcx",
        ".pgm",
        ".png",
        ".pnm",
        ".ppm",
        ".qoi",
        ".sgi",
        ".tga",
        ".tif",
        ".tiff",
        ".webp",
    }
)
_OTHER_IMAGE_EXTENSIONS = frozenset(
    {
        ".arw",
        ".cr2",
        ".cr3",
        ".dng",
        ".heic",
        ".heif",
        ".jxl",
        ".nef",
        ".orf",
        ".raf",
        ".rw2",
        ".svg",
    }
)
IMAGE_EXTENSIONS: frozenset[str] = _PILLOW_EXTENSIONS | _OTHER_IMAGE_EXTENSIONS
"""Lower-case extensions (with the dot) of files treated as images."""

_PLUGIN_HINTS = {
    ".heic": "HEIC/HEIF needs the pillow-heif package (pip install pillow-heif)",
    ".heif": "HEIC/HEIF needs the pillow-heif package (pip install pillow-heif)",
    ".avif": "AVIF needs a Pillow built with libavif (Pillow >= 11.2 wheels have it)",
    ".jxl": "JPEG XL needs a Pillow plugin such as pillow-jxl-plugin",
    ".svg": "SVG is a vector format; rasterise it to PNG first",
}
_RAW_HINT = "camera RAW files must be developed to JPEG/PNG/TIFF first"

_PIXEL_LIMIT_LOCK = threading.Lock()

# errno values of OSErrors raised by opening a file rather than by decoding it.
_OPEN_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.ELOOP, errno.EIO, errno.EISDIR})

SKIP_HINT = (
    "To leave unusable images out instead, turn on skip_bad_images (--data.skip_bad_images "
    "true on the command line, skip_bad_images: true under data: in a YAML config)."
)
"""What to tell a user whose images stopped a run, when ``skip_bad_images`` is off."""


@dataclass(frozen=True)
class ImageInfo:
    """What a header read tells about an image file."""

    path: Path
    width: int
    height: int
    mode: str
    format: str | None


def is_hidden(name: str) -> bool:
    """Whether a file or folder name is hidden (starts with a dot)."""
    return name.startswith(".")


def is_image_file(path: Path | str) -> bool:
    """Whether ``path`` names an image by its extension (hidden files never are)."""
    p = Path(path)
    return not is_hidden(p.name) and p.suffix.lower() in IMAGE_EXTENSIONS


class PathList(Sequence[Path]):
    """File paths packed into one byte buffer; items come out as :class:`~pathlib.Path`.

    A dataset of a million images keeps a million paths for its whole life, in every DataLoader
    worker. As ``Path`` objects they cost about 800 bytes each (the object, its parts, interned
    names) and every access touches a reference count, which copies the forked workers' pages;
    packed, a path costs its UTF-8 bytes plus an 8-byte offset and holds no Python objects.

    Example:
        >>> files = PathList(["a/cat.jpg", "b/dog.png"])
        >>> files[1], len(files)
        (PosixPath('b/dog.png'), 2)
    """

    __slots__ = ("_buffer", "_ends")

    def __init__(self, paths: Iterable[str | os.PathLike[str]] = ()) -> None:
        encoded = [os.fsencode(p) for p in paths]
        self._buffer = np.frombuffer(b"".join(encoded), dtype=np.uint8)
        self._ends = np.cumsum([len(b) for b in encoded], dtype=np.int64)

    def __len__(self) -> int:
        return len(self._ends)

    def _str(self, i: int) -> str:
        start = int(self._ends[i - 1]) if i > 0 else 0
        return os.fsdecode(self._buffer[start : int(self._ends[i])].tobytes())

    def __getitem__(self, i):  # noqa: D105
        if isinstance(i, slice):
            return self.take(range(len(self))[i])
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"PathList index {i} out of range for {n} paths")
        return Path(self._str(i % n))

    def take(self, positions: Iterable[int]) -> PathList:
        """The paths at ``positions``, in that order."""
        return PathList(self._str(int(i)) for i in positions)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence) or isinstance(other, str | bytes):
            return NotImplemented
        return len(self) == len(other) and all(
            a == Path(b) for a, b in zip(self, other, strict=True)
        )

    __hash__ = None  # type: ignore[assignment]  # mutable-looking sequences are unhashable

    def __repr__(self) -> str:
        shown = ", ".join(repr(self._str(i)) for i in range(min(len(self), 3)))
        return f"PathList([{shown}{', ...' if len(self) > 3 else ''}], {len(self)} paths)"

    @property
    def nbytes(self) -> int:
        """Bytes the packed paths hold (the buffer and the offsets)."""
        return self._buffer.nbytes + self._ends.nbytes


def list_images(folder: Path | str) -> PathList:
    """All image files under ``folder``, recursively, in sorted order.

    Hidden files and folders are skipped; symbolic links to folders are followed. The order is
    that of the paths relative to ``folder`` (so it does not depend on the file system).

    Raises:
        DataError: A folder cannot be read (its images would silently be missing), or a
            symbolic link leads back into a folder that contains it (a loop: followed, it
            would count the same images again and again, under the wrong class).
    """
    root = os.fspath(folder)
    found: list[tuple[str, str]] = []  # (relative POSIX path: the sort key, path)
    # (st_dev, st_ino) of the real folders above the one being read: the root's real ancestors
    # too, so that a link to the data folder itself (``ln -s .. a/loop``) is caught at once.
    above = set()
    for parent in Path(os.path.realpath(root)).parents:
        with contextlib.suppress(OSError):  # an ancestor we cannot stat: no link reaches it
            above.add(_identity(parent))
    _walk(root, "", above, found)
    found.sort()
    return PathList(path for _, path in found)


def _identity(path: str | os.PathLike[str]) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _walk(
    path: str, prefix: str, above: set[tuple[int, int]], found: list[tuple[str, str]]
) -> None:
    """Adds the images under the folder ``path`` to ``found``; ``above``: folders on the way."""
    try:
        here = _identity(path)
        with os.scandir(path) as it:
            entries = list(it)
    except OSError as exc:
        raise _unreadable_folder(path, exc) from exc
    above.add(here)
    try:
        for entry in entries:
            if is_hidden(entry.name):
                continue
            if _is_dir(entry):
                if entry.is_symlink() and _link_target(entry) in above:
                    raise _loop_error(entry.path)
                _walk(entry.path, prefix + entry.name + "/", above, found)
            elif is_image_file(entry.name):
                found.append((prefix + entry.name, entry.path))
    finally:
        above.discard(here)


def _link_target(entry: os.DirEntry) -> tuple[int, int]:
    try:
        return _identity(entry.path)
    except OSError as exc:  # removed or changed while being read
        raise _unreadable_folder(entry.path, exc) from exc


def _is_dir(entry: os.DirEntry) -> bool:
    """Whether ``entry`` is a folder or a link to one (a broken or looping link is not)."""
    try:
        return entry.is_dir()
    except OSError:
        return False


def _loop_error(link: str) -> DataError:
    real = os.path.join(os.path.realpath(os.path.dirname(link)), os.path.basename(link))
    where = "" if real == os.path.abspath(link) else f" (the link itself is {real})"
    return DataError(
        f"The symbolic link {link}{where} points to {os.readlink(link)!r}, which leads back into "
        "a folder the link is read from: following it would go round in a loop, reading the "
        f"same images again and again (under the wrong class). Remove the link (rm {real}) or "
        "point it at a folder outside the data folder."
    )


def _unreadable_folder(path: str, exc: OSError) -> DataError:
    reason = exc.strerror or str(exc)
    fix = (
        f"make it readable (chmod -R u+rX {path}) "
        if isinstance(exc, PermissionError)
        else "check the disk or the link "
    )
    return DataError(
        f"Cannot read the folder {path} ({reason}), so its images cannot be found. "
        f"To use them, {fix}and run again; to leave them out, move the folder out of the data "
        "folder."
    )


def _pixel_limit_error(path: Path, pixels: int, limit: int | None) -> DataError:
    return DataError(
        f"Image {path} has {pixels:,} pixels, more than max_image_pixels = "
        f"{limit if limit is None else format(limit, ',')} (a guard against decompression bombs: "
        "small files that expand to huge images). If the image is genuine, raise "
        "max_image_pixels (data.max_image_pixels; null disables the check) or downscale the "
        "file; otherwise remove it."
    )


@contextlib.contextmanager
def _pillow_limit(limit: int | None) -> Iterator[None]:
    """Lets Pillow accept images up to ``limit`` pixels while the block runs.

    Pillow refuses images above ``2 * Image.MAX_IMAGE_PIXELS`` itself; a larger user limit (or
    ``None``) therefore needs Pillow's limit raised for the header read. Smaller limits are
    enforced by the callers, without touching Pillow's setting.
    """
    current = Image.MAX_IMAGE_PIXELS
    if current is None or (limit is not None and limit <= current):
        yield
        return
    with _PIXEL_LIMIT_LOCK:
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None if limit is None else max(limit, saved or 0)
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved


@functools.cache
def _register_heif() -> bool:
    """Registers pillow-heif's opener when that package is installed."""
    try:
        from pillow_heif import register_heif_opener  # type: ignore[import-not-found]
    except ImportError:
        return False
    register_heif_opener()
    return True


def _unreadable_hint(path: Path) -> str:
    ext = path.suffix.lower()
    if ext in _PLUGIN_HINTS:
        return _PLUGIN_HINTS[ext]
    if ext in _OTHER_IMAGE_EXTENSIONS:
        return _RAW_HINT
    return "the file is corrupt or not really a " + (ext[1:].upper() or "image") + " file"


def _open(path: Path, max_image_pixels: int | None) -> Image.Image:
    """Opens ``path`` lazily (header only) and applies the pixel limit."""
    if path.suffix.lower() in (".heic", ".heif"):
        _register_heif()
    try:
        with _pillow_limit(max_image_pixels):
            img = Image.open(path)
    except Image.DecompressionBombError as exc:
        raise DataError(
            f"Image {path} is too large for max_image_pixels = {max_image_pixels} ({exc}). If the "
            "image is genuine, raise max_image_pixels (data.max_image_pixels; null disables the "
            "check) or downscale the file; otherwise remove it."
        ) from exc
    except FileNotFoundError as exc:
        raise DataError(f"Image file {path} does not exist (any more); check the path.") from exc
    except UnidentifiedImageError as exc:
        raise DataError(
            f"Cannot read image {path}: Pillow does not recognise its format "
            f"({_unreadable_hint(path)}). Convert or remove the file."
        ) from exc
    except OSError as exc:
        if exc.filename is not None or exc.errno in _OPEN_ERRNOS:  # opening it failed
            raise _cannot_open(path, exc) from exc
        raise _corrupt(path, exc) from exc
    except (SyntaxError, ValueError, EOFError) as exc:
        raise _corrupt(path, exc) from exc
    w, h = img.size
    if max_image_pixels is not None and w * h > max_image_pixels:
        img.close()
        raise _pixel_limit_error(path, w * h, max_image_pixels)
    return img


def _cannot_open(path: Path, exc: OSError) -> DataError:
    """The file itself cannot be opened (a permission, a link loop, an I/O error)."""
    if isinstance(exc, PermissionError):
        fix = f"make it readable (chmod u+r {path}) or remove it"
    elif exc.errno == errno.ELOOP:
        fix = (
            "it is a symbolic link that leads back to itself (directly or through other links); "
            "remove the link or point it at an image file"
        )
    elif isinstance(exc, IsADirectoryError):
        fix = "it is a folder with an image's name; rename it"
    else:
        fix = "check the disk, or replace or remove the file"
    return DataError(f"Image file {path} cannot be opened ({exc.strerror or exc}): {fix}.")


def _corrupt(path: Path, exc: Exception) -> DataError:
    return DataError(
        f"Cannot read image {path} ({type(exc).__name__}: {exc}); the file is corrupt or "
        "truncated. Replace or remove it."
    )


def _has_end_marker(path: Path, fmt: str | None) -> bool:
    """Cheap test that a JPEG or PNG file was written to the end (no decoding)."""
    if fmt not in ("JPEG", "MPO", "PNG"):
        return True
    tail_len = 4096 if fmt != "PNG" else 12
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - tail_len))
        tail = f.read()
    return b"\xff\xd9" in tail if fmt != "PNG" else b"IEND" in tail


def probe_image(
    path: Path | str, max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS
) -> ImageInfo:
    """Checks an image cheaply, without decoding its pixels, and returns its header facts.

    Reads the header (format, size, mode) and applies the pixel limit; for JPEG and PNG it also
    checks that the file ends with its end marker, and only when the marker is missing decodes
    the file fully to tell a truncated file from one with trailing bytes. Corruption inside the
    compressed data of an otherwise complete file is only found when the image is decoded
    (:func:`load_rgb`).

    Args:
        path: The image file.
        max_image_pixels: Largest accepted ``width * height``; ``None`` for no limit.

    Returns:
        The header facts.

    Raises:
        DataError: The file is missing, empty, unreadable, truncated or too large; the message
            names the file.
    """
    p = Path(path)
    try:
        if p.stat().st_size == 0:
            raise DataError(f"Image file {p} is empty (0 bytes). Replace or remove it.")
    except FileNotFoundError as exc:
        raise DataError(f"Image file {p} does not exist; check the path.") from exc
    except OSError as exc:  # a link loop, an I/O error: the file cannot be opened
        raise _cannot_open(p, exc) from exc
    img = _open(p, max_image_pixels)
    try:
        info = ImageInfo(p, img.size[0], img.size[1], img.mode, img.format)
        if not _has_end_marker(p, img.format):
            _decode(img, p)
    finally:
        img.close()
    return info


def _decode(img: Image.Image, path: Path) -> None:
    """Decodes the pixels, turning any decoder failure into a DataError naming ``path``."""
    try:
        img.load()
    except Image.DecompressionBombError as exc:
        raise DataError(
            f"Image {path} is too large ({exc}); raise max_image_pixels "
            "(data.max_image_pixels) or remove the file."
        ) from exc
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as exc:
        raise DataError(
            f"Cannot decode image {path} ({type(exc).__name__}: {exc}); the file is corrupt or "
            "truncated. Replace or remove it."
        ) from exc


def _composite_on_white(img: Image.Image) -> Image.Image:
    rgba = img.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def _float_to_uint8(a: np.ndarray) -> np.ndarray:
    a = np.nan_to_num(a.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    top = float(a.max()) if a.size else 0.0
    if top <= 1.0:
        scale = 255.0
    elif top <= 255.0:
        scale = 1.0
    elif top <= 65535.0:
        scale = 255.0 / 65535.0
    else:
        scale = 255.0 / top
    return np.clip(np.rint(a * scale), 0, 255).astype(np.uint8)


def to_rgb(img: Image.Image) -> Image.Image:
    """Converts a Pillow image of any mode to 8-bit ``RGB`` (see the module notes).

    Args:
        img: The image, decoded or not.

    Returns:
        An ``RGB`` image (``img`` itself when it already is one).
    """
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("RGBA", "LA", "La", "RGBa", "PA") or (mode == "P" and "transparency" in img.info):
        return _composite_on_white(img)
    if mode.startswith("I;16") or mode == "I":
        a = np.asarray(img).astype(np.int64)
        if mode.startswith("I;16") or (a.size and a.max() > 255):
            a = np.rint(np.clip(a, 0, 65535) * (255.0 / 65535.0))
        grey = np.clip(a, 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if mode == "F":
        return Image.fromarray(_float_to_uint8(np.asarray(img)), "L").convert("RGB")
    return img.convert("RGB")


def load_rgb(
    path: Path | str,
    target_size: int | None = None,
    *,
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
) -> Image.Image:
    """Decodes an image file to an 8-bit RGB Pillow image, upright per its EXIF orientation.

    Args:
        path: The image file.
        target_size: The side length the caller will resize to. JPEGs whose shorter side is
            more than twice that are decoded at a reduced scale that keeps at least
            ``2 * target_size`` pixels; ``None`` decodes at full size.
        max_image_pixels: Largest accepted ``width * height``; ``None`` for no limit.

    Returns:
        The decoded ``RGB`` image.

    Raises:
        DataError: The file is missing, unreadable, corrupt, truncated or too large; the message
            names the file.
    """
    p = Path(path)
    img = _open(p, max_image_pixels)
    try:
        if target_size is not None and img.format in ("JPEG", "MPO"):
            keep = 2 * int(target_size)
            img.draft("RGB", (keep, keep))
        _decode(img, p)
        # A malformed EXIF block must not make a good image unusable: keep it as stored.
        with contextlib.suppress(SyntaxError, ValueError, KeyError, TypeError, IndexError, OSError):
            ImageOps.exif_transpose(img, in_place=True)
        try:
            rgb = to_rgb(img)
        except (ValueError, OSError) as exc:
            raise DataError(
                f"Cannot convert image {p} (mode {img.mode}) to RGB ({exc}). Convert the file to "
                "an RGB or grayscale PNG/JPEG, or remove it."
            ) from exc
        if rgb is img:
            img = None  # the caller owns it now
        return rgb
    finally:
        if img is not None:
            img.close()
