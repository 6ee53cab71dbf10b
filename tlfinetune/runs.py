"""Run folders and checkpoint files: where a run writes, how it is found again, written safely."""

from __future__ import annotations

import csv
import os
import re
import secrets
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any
from weakref import proxy

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException


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
        tmp = target.with_name(f".{target.name}.{secrets.token_hex(6)}.tmp")
        # Mode 0o666 less the umask, as any new file gets (mkstemp would make it 0o600).
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def link_checkpoint(self, source: Any, path: Any) -> bool:
        """``path`` as a hard link to the checkpoint ``source``, renamed into place as a save is.

        Safe because every save here replaces its file instead of writing into it. False (and
        nothing changed) where the file system refuses hard links.
        """
        target = Path(path)
        tmp = target.with_name(f".{target.name}.{secrets.token_hex(6)}.tmp")
        try:
            os.link(source, tmp)
            os.replace(tmp, target)
        except OSError:
            tmp.unlink(missing_ok=True)
            return False
        return True

    def load_checkpoint(
        self, path: Any, map_location: Any = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        """Checkpoints are plain data: never unpickle code from one (weights_only forced)."""
        return torch.load(path, map_location=map_location or "cpu", weights_only=True)


class RunCheckpoint(ModelCheckpoint):
    """ModelCheckpoint whose ``last.ckpt`` is the state at the end of every epoch.

    Lightning 2.6 writes ``last.ckpt`` only in the epochs where the monitored metric made the
    top k, so after an epoch without improvement ``last.ckpt`` is older than the run and a
    resume silently repeats epochs. Here it is written at every epoch end, and mid-epoch saves
    (``every_n_train_steps``, ``train_time_interval``) skip an epoch's last batch, which the
    epoch-end save covers. In an epoch that improves the monitored metric, ``last.ckpt`` is a
    hard link to the best checkpoint saved at the same step (same contents, one write; with
    :class:`AtomicCheckpointIO`, whose renames never write into a linked file).

    The best checkpoint is judged where the monitored metric is computed, at each epoch's end
    (after its validation), whatever else is set: step and time saves write ``last.ckpt`` only,
    from the first epoch on. Lightning 2.6 instead stops the epoch-end top-k when
    ``every_n_train_steps`` or ``train_time_interval`` is set, ranks mid-epoch weights by the
    previous validation's score (its "best" file would hold weights that score was never
    measured on), and skips the step and time saves before the first validation.
    """

    # (path, global step, last_model_path) of the last checkpoint written, for a same-step twin
    _twin: tuple[str, int, str] | None = None
    _mid_epoch = False  # inside a step or time save: last.ckpt only

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:  # noqa: D102
        super().setup(trainer, pl_module, stage)
        self._keyed_every_n_epochs = self._every_n_epochs
        if self._every_n_train_steps > 0 or self._train_time_interval is not None:
            self._every_n_epochs = max(self._every_n_epochs, 1)  # Lightning set it to 0

    @property
    def state_key(self) -> str:  # noqa: D102
        # The key of the settings as Lightning keyed them (every_n_epochs 0 under step or time
        # saves): a checkpoint saved before setup() raised it still finds its state here.
        return self._generate_state_key(
            monitor=self.monitor,
            mode=self.mode,
            every_n_train_steps=self._every_n_train_steps,
            every_n_epochs=getattr(self, "_keyed_every_n_epochs", self._every_n_epochs),
            train_time_interval=self._train_time_interval,
        )

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # noqa: D102
        # A run folder that was moved (or copied) and resumed in its new place: Lightning
        # forgets its best and last files, writes last-v1.ckpt beside last.ckpt, and the next
        # `--ckpt_path last` resumes from the older of the two. Its files are here: follow them.
        saved = state_dict.get("dirpath")
        if saved and self.dirpath and os.path.normpath(saved) != os.path.normpath(self.dirpath):
            moved = _rebased(state_dict, saved, self.dirpath)
            if moved["last_model_path"] and os.path.exists(moved["last_model_path"]):
                state_dict = moved
        super().load_state_dict(state_dict)

    def on_train_batch_end(  # noqa: D102
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # Lightning 2.6 resumes a checkpoint taken on an epoch's last batch (before that epoch's
        # validation and end) into the next epoch with its batches counted as done: a whole
        # epoch is skipped. The epoch-end save of last.ckpt follows moments later, so a step or
        # time save due on the last batch is left to it (a crash in between resumes from the
        # save before, repeating at most one interval).
        progress = trainer.fit_loop.epoch_loop.batch_progress
        if progress.is_last_batch or batch_idx + 1 >= trainer.num_training_batches:
            return
        self._mid_epoch = True
        self._defer_save_until_validation = False
        try:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        finally:
            self._mid_epoch = False
        if self._defer_save_until_validation:
            # Lightning puts a due save off until the monitored metric exists, which skips
            # every step and time save of the first epoch, often the longest. Only last.ckpt
            # is due here: write it now, so that a crash in that epoch resumes from it.
            self._defer_save_until_validation = False
            if not self._should_skip_saving_checkpoint(trainer):
                self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:  # noqa: D102
        super().on_exception(trainer, pl_module, exception)
        # SIGTERM (a scheduler pre-empting the job, `kill`) stops fit after a training step:
        # keep the steps of the epoch in progress in last.ckpt, as a step save would. After an
        # epoch's last step Lightning stops in its validation instead (not training): a save
        # there would make a resume skip the next epoch (see on_train_batch_end), so the
        # epoch-end save before it stays the one to resume. One process only: under DDP the
        # ranks may stop a step apart, and a save waits for all of them (a barrier), so the
        # job would hang instead of stopping.
        if (
            isinstance(exception, SIGTERMException)
            and self.save_last
            and trainer.world_size == 1
            and trainer.training
            and not trainer.sanity_checking
            and not self._should_skip_saving_checkpoint(trainer)
        ):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:  # noqa: D102
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._save_last_if_missed(trainer)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:  # noqa: D102
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._save_last_if_missed(trainer)

    def _save_topk_checkpoint(self, trainer: Any, monitor_candidates: dict[str, Any]) -> None:
        if self._mid_epoch and self.monitor is not None:
            return  # the monitored score is the last validation's, not these weights'
        # Lightning names last.ckpt only when it saves it, after the top-k file, so the first
        # top-k file would record no last_model_path and never be last.ckpt's twin. Every top-k
        # save is followed by a save of last.ckpt (Lightning's, or _save_last_if_missed): name it
        # now, as _save_last_checkpoint will (same version counter), and the first improving
        # epoch writes one file instead of two.
        if self.save_last is True and not self.last_model_path:
            filepath = self.format_checkpoint_name(monitor_candidates, self.CHECKPOINT_NAME_LAST)
            version = self.STARTING_VERSION
            while self._enable_version_counter and self.file_exists(filepath, trainer):
                filepath = self.format_checkpoint_name(
                    monitor_candidates, self.CHECKPOINT_NAME_LAST, ver=version
                )
                version += 1
            self.last_model_path = filepath
        super()._save_topk_checkpoint(trainer, monitor_candidates)

    def _save_checkpoint(self, trainer: Any, filepath: str) -> None:
        # In an epoch that improves the monitored metric, the best checkpoint and last.ckpt are
        # written at the same step with the same contents (136 MB for VGG16): the second becomes
        # a hard link to the first, renamed into place as atomically as a write. Only with
        # AtomicCheckpointIO: an IO that wrote into an existing file would write into both names.
        twin = self._twin
        if (
            twin is not None
            and filepath == self.last_model_path
            and twin[1:] == (trainer.global_step, filepath)  # ...which the twin's state names
            and isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)
            and self._link(trainer, twin[0], filepath)
        ):
            self._last_global_step_saved = trainer.global_step
            self._last_checkpoint_saved = filepath
            if trainer.is_global_zero:
                for logger in trainer.loggers:
                    logger.after_save_checkpoint(proxy(self))
            return
        super()._save_checkpoint(trainer, filepath)
        # What the file holds of this callback's state differs from a later save at the same
        # step only in last_model_path, which Lightning sets just before saving last.ckpt.
        self._twin = (filepath, trainer.global_step, self.last_model_path)

    @staticmethod
    def _link(trainer: Any, source: str, target: str) -> bool:
        """``target`` as a hard link to ``source`` (rank 0); False where links are refused."""
        io = trainer.strategy.checkpoint_io
        ok = io.link_checkpoint(source, target) if trainer.is_global_zero else True
        # Every rank takes the same branch: the save it falls back to is collective.
        return bool(trainer.strategy.broadcast(ok))

    def _save_last_if_missed(self, trainer: Any) -> None:
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
            self._last_global_step_saved = trainer.global_step


class _AppendingWriter(ExperimentWriter):
    """Keeps an existing ``metrics.csv`` (Lightning's writer deletes it), for resumed runs."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as f:
                self.metrics_keys = list(csv.DictReader(f).fieldnames or [])


class RunLogger(CSVLogger):
    """CSVLogger that continues ``metrics.csv`` when a run is resumed into its own folder."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:  # noqa: D102
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


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


def numbered(name: str, number: int) -> str:
    """``name`` for 0, else ``stem.N.suffix``: ``metrics.json`` -> ``metrics.1.json``."""
    if number == 0:
        return name
    stem, suffix = os.path.splitext(name)
    return f"{stem}.{number}{suffix}"


def free_number(folders: Iterable[str | Path], names: Sequence[str]) -> int:
    """The smallest number under which none of ``names`` exists in any of ``folders``.

    Files written together (a report, a comparison) take one number, so ``metrics.2.json``
    goes with ``confusion_matrix.2.png`` even when only some of an earlier set are left.
    """
    folders = [Path(f) for f in folders]
    number = 0
    while any((f / numbered(n, number)).exists() for f in folders for n in names):
        number += 1
    return number


def next_free_name(folder: Path, name: str) -> str:
    """``name``, or ``stem.1.suffix``, ``stem.2.suffix``... whichever does not exist yet."""
    return numbered(name, free_number([folder], [name]))


def _rebased(value: Any, old: str, new: str) -> Any:
    """``value`` with every path inside folder ``old`` moved into ``new`` (dict keys too)."""
    if isinstance(value, dict):
        return {_rebased(k, old, new): _rebased(v, old, new) for k, v in value.items()}
    if isinstance(value, str) and (value == old or value.startswith(old.rstrip(os.sep) + os.sep)):
        return new.rstrip(os.sep) + value[len(old.rstrip(os.sep)) :]
    return value
