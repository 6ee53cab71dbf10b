"""The header scan: which images of a split cannot be used, found before training starts.

Reading every image's header (no full decode; a JPEG or PNG without its end marker is decoded to
confirm truncation) is cheap next to an epoch, and turns a crash in the middle of training into
one error before it that names every bad file. With ``skip_bad_images`` the bad files are left
out instead, with a warning and a list file.
"""

import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

from tlfinetune.datasets import append_lines
from tlfinetune.errors import DataError
from tlfinetune.images import probe_image
from tlfinetune.sources import LIST_IN_MESSAGE, Split

__all__ = ["HeaderScan"]

# The records keep the logger name they had when this was part of data.py, so logging settings
# for tlfinetune.data still apply to them.
log = logging.getLogger("tlfinetune.data")

_SCAN_THREADS_FROM = 256  # header-scan this many files or more on a thread pool


class HeaderScan:
    """Header-checks the files of splits: raises one error naming the bad ones, or skips them.

    Args:
        max_image_pixels: Largest accepted ``width * height`` (``None``: no limit).
        skip: Leave bad images out (with a warning) instead of raising.
        list_file: The file that lists skipped images (asked only when some are skipped).
        write_list: Whether this process writes that file (only one process of a run does).
    """

    def __init__(
        self,
        max_image_pixels: int | None,
        skip: bool,
        list_file: Callable[[], Path],
        write_list: Callable[[], bool],
    ) -> None:
        self.max_image_pixels = max_image_pixels
        self.skip = skip
        self.list_file = list_file
        self.write_list = write_list
        self.bad_images: list[Path] = []
        """Images left out so far."""
        self._list_started = False

    def _probe(self, files: Sequence[Path]) -> list[DataError | None]:
        """One result per file: ``None`` when usable, else the error naming it."""

        def check(path: Path) -> DataError | None:
            try:
                probe_image(path, self.max_image_pixels)
            except DataError as exc:
                return exc
            return None

        if len(files) >= _SCAN_THREADS_FROM:  # header reads wait on I/O: threads help
            with ThreadPoolExecutor(max_workers=min(16, 4 * (os.cpu_count() or 1))) as pool:
                return list(pool.map(check, files))
        return [check(p) for p in files]

    def __call__(self, splits: Sequence[Split]) -> list[Split]:
        """Header-checks the files of ``splits``; drops bad ones (skip mode) or raises once.

        Splits already scanned and in-memory splits are returned as they are.
        """
        todo = [s for s in splits if s.files is not None and not s.scanned]
        found: dict[int, list[tuple[int, DataError]]] = {}
        for split in todo:
            results = self._probe(split.files or [])
            found[id(split)] = [(i, exc) for i, exc in enumerate(results) if exc is not None]

        def describe(split: Split, i: int, exc: DataError) -> str:
            return f"{split.rows[i]}: {exc}" if split.rows is not None else str(exc)

        bad_all = [(split, i, exc) for split in todo for i, exc in found[id(split)]]
        if bad_all and not self.skip:
            if len(bad_all) == 1:
                raise DataError(describe(*bad_all[0]))
            total = sum(len(s) for s in todo)
            where = "; ".join(f"{len(found[id(s)])} in {s.origin}" for s in todo if found[id(s)])
            others = ", ".join(str((s.files or [])[i]) for s, i, _ in bad_all[1:LIST_IN_MESSAGE])
            more = len(bad_all) - LIST_IN_MESSAGE
            raise DataError(
                f"{len(bad_all)} of the {total} images cannot be used ({where}). The first: "
                f"{describe(*bad_all[0])} The others: {others}"
                f"{f' and {more} more' if more > 0 else ''}. Set skip_bad_images: true to train "
                "without them."
            )
        out = []
        todo_ids = {id(s) for s in todo}
        for split in splits:
            if id(split) not in todo_ids:
                out.append(split)
                continue
            bad = found[id(split)]
            if not bad:
                out.append(replace(split, scanned=True))
                continue
            out.append(self._skip(split, bad, describe(split, *bad[0])))
        return out

    def _skip(self, split: Split, bad: list[tuple[int, DataError]], first: str) -> Split:
        """Leaves the ``bad`` positions out of ``split``, lists and reports them."""
        files = split.files or []
        bad_paths = [files[i] for i, _ in bad]
        self.bad_images.extend(p for p in bad_paths if p not in self.bad_images)
        list_file = self.list_file()
        if self.write_list():
            if not self._list_started:  # a fresh list per run, not appended to an old one
                list_file.unlink(missing_ok=True)
                self._list_started = True
            append_lines(list_file, [str(p) for p in bad_paths])
        log.warning(
            "Skipped %d of the %d images of %s (skip_bad_images); their paths are listed in %s. "
            "The first: %s",
            len(bad),
            len(files),
            split.origin,
            list_file,
            first,
        )
        bad_set = {i for i, _ in bad}
        kept = replace(
            split.subset([i for i in range(len(files)) if i not in bad_set]), scanned=True
        )
        if not kept.labels:
            raise DataError(
                f"All {len(files)} images of {split.origin} are unreadable (listed in {list_file})."
            )
        return kept
