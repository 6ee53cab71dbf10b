"""The header scan: which images of a split cannot be used, found before training starts.

Reading every image's header (no full decode; a JPEG or PNG without its end marker is decoded to
confirm truncation) is cheap next to an epoch, and turns a crash in the middle of training into
one error before it that names every bad file. With ``skip_bad_images`` the bad files are left
out instead, with a warning and a list file.

On a large folder even headers take a while (100,000 files: tens of seconds, more from a cold
disk), so the files found good are written to a scan record beside the data
(``.tlfinetune-scan.tsv``; in the cache folder when the data's folder cannot be written). A later
run scans only the files that are new or changed since (size or modification time differ).
"""

import hashlib
import logging
import os
import secrets
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

from tlfinetune.datasets import append_lines
from tlfinetune.errors import DataError
from tlfinetune.images import SKIP_HINT, probe_image
from tlfinetune.machine import cache_root
from tlfinetune.sources import LIST_IN_MESSAGE, Split

__all__ = ["HeaderScan", "ScanRecord"]

# The records keep the logger name they had when this was part of data.py, so logging settings
# for tlfinetune.data still apply to them.
log = logging.getLogger("tlfinetune.data")

_SCAN_THREADS_FROM = 256  # header-scan this many files or more on a thread pool
_RECORD_FROM = 1000  # keep a scan record for scans of this many files or more
RECORD_NAME = ".tlfinetune-scan.tsv"
_RECORD_VERSION = "1"


class ScanRecord:
    """The files an earlier header scan found good, by size and modification time.

    One record per folder (the deepest folder holding every scanned file); paths in it are
    relative to that folder. A file counts as checked while its size and modification time are
    those recorded; anything else is scanned again. Only good files are recorded: a bad file is
    scanned on every run, so its error stays current. The pixel limit is part of the record: a
    record made under another limit is not used.

    Args:
        folder: The folder the files lie under.
        max_image_pixels: The pixel limit the verdicts were made under.
    """

    def __init__(self, folder: Path, max_image_pixels: int | None) -> None:
        self.folder = folder
        self.header = (
            f"# tlfinetune scan record v{_RECORD_VERSION} max_image_pixels={max_image_pixels}"
        )
        self.path = self._where()
        self.good: dict[str, tuple[int, int]] = self._read()

    def _where(self) -> Path:
        beside = self.folder / RECORD_NAME
        if os.access(self.folder, os.W_OK) and (not beside.exists() or os.access(beside, os.W_OK)):
            return beside
        digest = hashlib.sha1(str(self.folder.resolve()).encode()).hexdigest()[:16]
        return cache_root() / "scans" / f"{digest}.tsv"  # read-only data: keep it aside

    def _read(self) -> dict[str, tuple[int, int]]:
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError):
            return {}
        if not lines or lines[0] != self.header:
            return {}  # another format or pixel limit: its verdicts do not apply
        good = {}
        for line in lines[1:]:
            size, mtime, name = line.split("\t", 2)
            good[name] = (int(size), int(mtime))
        return good

    @staticmethod
    def stamp(path: Path) -> tuple[int, int] | None:
        """(size, modification time in ns) of ``path``, None when it cannot be read."""
        try:
            st = path.stat()
        except OSError:
            return None
        return st.st_size, st.st_mtime_ns

    def key(self, path: Path) -> str:
        """The record's name for ``path``."""
        return os.path.relpath(path, self.folder)

    def unchanged(self, path: Path, stamp: tuple[int, int] | None) -> bool:
        """Whether ``path`` was found good and has not changed since."""
        return stamp is not None and self.good.get(self.key(path)) == stamp

    def save(self, checked: Iterable[tuple[Path, tuple[int, int] | None]]) -> None:
        """Record these good files (with the stamps taken before they were checked)."""
        for path, stamp in checked:
            if stamp is not None:
                self.good[self.key(path)] = stamp
        lines = [self.header, *(f"{s}\t{m}\t{name}" for name, (s, m) in self.good.items())]
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.{secrets.token_hex(4)}")
            # Mode 0o666 less the umask, as any new file gets (mkstemp would make it 0o600).
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    f.write("\n".join(lines) + "\n")
                os.replace(tmp, self.path)  # a crash while writing leaves the old record whole
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
        except OSError as exc:
            log.info(f"Scan record not written ({self.path}: {exc}); the next run scans again.")


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

    def _probe_recorded(self, files: Sequence[Path]) -> list[DataError | None]:
        """:meth:`_probe`, skipping the files a scan record says are good and unchanged."""
        record = self._record(files)
        if record is None:
            return self._probe(files)
        # Stamps taken before the check: a file that changes during it is checked again.
        stamps = [ScanRecord.stamp(p) for p in files]
        todo = [i for i, p in enumerate(files) if not record.unchanged(p, stamps[i])]
        results: list[DataError | None] = [None] * len(files)
        for i, exc in zip(todo, self._probe([files[i] for i in todo]), strict=True):
            results[i] = exc
        if len(todo) < len(files):
            log.info(
                f"Header scan: {len(files) - len(todo):,} of {len(files):,} files unchanged since "
                f"the scan recorded in {record.path}; checked the other {len(todo):,}."
            )
        if self.write_list() and todo:
            record.save((files[i], stamps[i]) for i in todo if results[i] is None)
        return results

    def _record(self, files: Sequence[Path]) -> ScanRecord | None:
        if len(files) < _RECORD_FROM:  # a small folder scans in no time: leave no file in it
            return None
        try:
            folder = Path(os.path.commonpath([os.path.abspath(p) for p in files]))
        except ValueError:  # different drives
            return None
        return ScanRecord(folder if folder.is_dir() else folder.parent, self.max_image_pixels)

    def __call__(self, splits: Sequence[Split]) -> list[Split]:
        """Header-checks the files of ``splits``; drops bad ones (skip mode) or raises once.

        Splits already scanned and in-memory splits are returned as they are.
        """
        todo = [s for s in splits if s.files is not None and not s.scanned]
        results = iter(self._probe_recorded([f for s in todo for f in s.files or []]))
        found: dict[int, list[tuple[int, DataError]]] = {}
        for split in todo:
            errors = [next(results) for _ in split.files or []]
            found[id(split)] = [(i, exc) for i, exc in enumerate(errors) if exc is not None]

        def describe(split: Split, i: int, exc: DataError) -> str:
            return f"{split.rows[i]}: {exc}" if split.rows is not None else str(exc)

        bad_all = [(split, i, exc) for split in todo for i, exc in found[id(split)]]
        if bad_all and not self.skip:
            if len(bad_all) == 1:
                raise DataError(f"{describe(*bad_all[0])} {SKIP_HINT}")
            total = sum(len(s) for s in todo)
            where = "; ".join(f"{len(found[id(s)])} in {s.origin}" for s in todo if found[id(s)])
            others = ", ".join(str((s.files or [])[i]) for s, i, _ in bad_all[1:LIST_IN_MESSAGE])
            more = len(bad_all) - LIST_IN_MESSAGE
            raise DataError(
                f"{len(bad_all)} of the {total} images cannot be used ({where}). The first: "
                f"{describe(*bad_all[0])} The others: {others}"
                f"{f' and {more} more' if more > 0 else ''}. {SKIP_HINT}"
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
            "Skipped %d of the %d images of %s, as skip_bad_images asks; their paths are listed "
            "in %s. The first: %s",
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
