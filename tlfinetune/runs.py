"""Run folders and checkpoint files: where a run writes, how it is found again, written safely."""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write each checkpoint to a temporary file beside it, then rename it into place.

    A crash or SIGKILL while saving leaves the previous ``last.ckpt`` intact instead of a
    truncated file that a resume would trip on. (Lightning's own save goes through a temporary
    file in the system temp folder, which is a copy, not a rename, across file systems.)
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None
    ) -> None:
        """Write to a temporary file in the same folder, fsync, rename over ``path``."""
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def load_checkpoint(
        self, path: Any, map_location: Any = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        """Checkpoints are plain data: never unpickle code from one (weights_only forced)."""
        return torch.load(path, map_location=map_location or "cpu", weights_only=True)


def find_last_checkpoint(root: Path) -> Path | None:
    """The most recently written ``version_*/checkpoints/last.ckpt`` under ``root``."""
    found = sorted(root.glob("version_*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def version_of(ckpt: Path, root: Path) -> int | None:
    """N when ``ckpt`` lies in ``root/version_N/checkpoints``, so a resume logs there again."""
    match = re.fullmatch(r"version_(\d+)", ckpt.resolve().parent.parent.name)
    if match and ckpt.resolve().parent.parent.parent == root.resolve():
        return int(match.group(1))
    return None


def next_free_name(folder: Path, name: str) -> str:
    """``name``, or ``stem.1.suffix``, ``stem.2.suffix``... whichever does not exist yet."""
    stem, suffix = os.path.splitext(name)
    candidate, i = name, 0
    while (folder / candidate).exists():
        i += 1
        candidate = f"{stem}.{i}{suffix}"
    return candidate
