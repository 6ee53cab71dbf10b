"""PredictionWriter: one CSV row per image with the predicted class and the top-k classes.

With ``explain`` it also writes, per image, the image with the Grad-CAM heat map of its
predicted class over it (:mod:`tlfinetune.saliency`).

Rows are streamed: each process formats the rows of a batch as soon as the batch is predicted
and appends them to its own part file beside the output; at the end rank 0 merges the parts in
image order into the CSV. Nothing per image stays in memory, so a million images cost what a
thousand do.
"""

from __future__ import annotations

import csv
import heapq
import io
import logging
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from PIL import Image

from tlfinetune.errors import ConfigError, TLFinetuneError
from tlfinetune.runs import next_free_name
from tlfinetune.saliency import cam_layer, grad_cam, overlay
from tlfinetune.tta import TTA, check_tta, switch_tta

log = logging.getLogger(__name__)

DEFAULT_NAME = "predictions.csv"


class OutputError(TLFinetuneError):
    """The predictions cannot be written where asked: the file exists, is protected or a folder."""


class PredictionWriter(BasePredictionWriter):
    """Write ``predictions.csv``: ``path,label,probability`` then ``top1,top1_probability``...

    One row per image, sorted by the image's position in the data's predict files; under DDP
    every image appears once, however the sampler spread (or repeated) it over processes.

    Nothing is written over: a given ``output`` that exists is refused before any image is
    predicted unless ``overwrite`` is set, and even then never when it is the checkpoint being
    read or one of the images; without ``output``, an existing ``predictions.csv`` is kept and
    the new file is numbered (``predictions.1.csv``, ``predictions.2.csv``...).

    Args:
        output: the CSV file; ``predictions.csv`` under ``trainer.default_root_dir`` by default.
        top_k: how many of the most probable classes to list per image (1 or more; with fewer
            classes than that, every class is listed).
        explain: folder for one PNG per image: the image with the Grad-CAM heat map of its
            predicted class blended over it, named after the image (``cats/img1.jpg`` ->
            ``DIR/cats/img1.png``, subfolders kept). Costs about two forward passes per batch.
        tta: test-time augmentation: ``none``, or ``flip`` (the mean probabilities of each image
            and its horizontal mirror; the CSV then ends with a ``tta`` column saying so).
        overwrite: replace ``output`` when it exists, and heat maps of an earlier run in
            ``explain`` (refused otherwise).

    Raises:
        ConfigError: ``top_k`` is less than 1, or ``tta`` is not a known mode.
        OutputError: (when predicting starts) ``output`` exists without ``overwrite``, is the
            checkpoint or an input image, is a folder, or its folder cannot be written; or
            ``explain`` holds files the heat maps would replace (earlier heat maps without
            ``overwrite``; the images themselves always), or cannot be written.
    """

    def __init__(
        self,
        output: str | None = None,
        top_k: int = 5,
        explain: str | None = None,
        tta: TTA = "none",
        overwrite: bool = False,
    ) -> None:
        super().__init__(write_interval="batch")
        # bool is an int to Python, but True as "list one class" is a mistake, not a choice
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ConfigError(
                f"--prediction.top_k {top_k!r}: give how many of the most probable classes each "
                f"row of the CSV lists, 1 or more (default 5)."
            )
        self.output = output
        self.top_k = top_k
        self.overwrite = overwrite
        self._resolved: Path | None = None  # the CSV of this run, checked and numbered
        self.explain = explain
        self._overlay_names: dict[int, Path] = {}
        self.tta = check_tta(tta)
        self._tta_before: str | None = None
        self._part: TextIO | None = None
        self._part_path: Path | None = None
        self._last_index = -1
        self._sorted = True  # this process's indices came in increasing order
        self._names: list[str] = []
        self._files: list[Any] = []

    def _path(self, trainer: pl.Trainer) -> Path:
        """The CSV this run writes, checked (and numbered) once, before the first image."""
        if self._resolved is None:
            self._resolved = self._check_output(trainer)
        return self._resolved

    def _check_output(self, trainer: pl.Trainer) -> Path:
        """Where the CSV may go: refused (OutputError) where it would replace what the user had.

        Every process runs the same checks on the same files, so all of them fail together
        (none is left waiting in a collective) or agree on the path.
        """
        if self.output:
            path = Path(self.output)
            if path.exists() and not path.is_dir():
                self._refuse_protected(trainer, path)
                if not self.overwrite:
                    raise OutputError(
                        f"--prediction.output {path} already exists; refusing to overwrite it. "
                        f"Choose another file name or pass --prediction.overwrite true to "
                        f"replace it."
                    )
        else:
            folder = Path(trainer.default_root_dir)
            path = folder / next_free_name(folder, DEFAULT_NAME)
        if path.is_dir():
            raise OutputError(
                f"--prediction.output {path} is a folder; give the path of the CSV file to "
                f"write, e.g. {path / DEFAULT_NAME}."
            )
        writable_folder(path.parent, f"the predictions ({path})", "--prediction.output")
        return path

    def _check_explain(self, trainer: pl.Trainer) -> None:
        """Heat maps replace no file: an earlier run's only with ``overwrite``, an image never."""
        if not self.explain:
            return
        root = Path(self.explain)
        if root.exists() and not root.is_dir():
            raise OutputError(
                f"--prediction.explain {root} is a file; give the folder the heat maps go to."
            )
        files = getattr(trainer.datamodule, "predict_files", None) or []
        taken = [root / name for name in overlay_names(files).values() if (root / name).exists()]
        if taken:
            # Stat every image only when some heat map would replace a file (a rerun, or the
            # images' own folder given): an overlay is named like its image.
            ids = {_file_id(t) for t in taken} - {None}
            for f in files:
                if _file_id(Path(f)) in ids:
                    raise OutputError(
                        f"--prediction.explain {root} would write heat maps over the images "
                        f"being predicted ({f} first); refusing, even with "
                        f"--prediction.overwrite. Choose a folder of its own for the heat maps."
                    )
            if not self.overwrite:
                raise OutputError(
                    f"--prediction.explain {root} already holds {len(taken)} of the heat maps "
                    f"this run would write ({taken[0]} first); refusing to overwrite them. "
                    f"Choose another folder or pass --prediction.overwrite true to replace them."
                )
        writable_folder(root, "the heat maps", "--prediction.explain")

    @staticmethod
    def _refuse_protected(trainer: pl.Trainer, path: Path) -> None:
        """Never replace the checkpoint being read or an input image, whatever ``overwrite``."""
        ckpt = trainer.ckpt_path
        if ckpt and Path(ckpt).is_file() and path.samefile(ckpt):
            raise OutputError(
                f"--prediction.output {path} is the checkpoint being read (--ckpt_path {ckpt}); "
                f"refusing to write the predictions over it, even with --prediction.overwrite. "
                f"Choose another file name."
            )
        # Only files of the same name can be the same file (hard links aside): a million images
        # cost no million stat calls.
        files = getattr(trainer.datamodule, "predict_files", None) or []
        for f in files:
            if Path(f).name == path.name and Path(f).is_file() and path.samefile(f):
                raise OutputError(
                    f"--prediction.output {path} is one of the images being predicted; refusing "
                    f"to write the predictions over it, even with --prediction.overwrite. "
                    f"Choose another file name."
                )

    def _part_of(self, path: Path, rank: int) -> Path:
        return path.with_name(f".{path.name}.part{rank}")

    def on_predict_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Open this process's part file."""
        path = self._path(trainer)
        self._close_part()
        self._part_path = self._part_of(path, trainer.global_rank)
        self._part = open(self._part_path, "w", newline="")  # noqa: SIM115 - closed at epoch end
        self._last_index, self._sorted = -1, True
        self._names = [str(n) for n in pl_module.hparams.get("class_names") or []] or [
            str(i) for i in range(pl_module.hparams.num_classes)
        ]
        if self.top_k > len(self._names) and trainer.is_global_zero:
            log.info(
                f"Listing all {len(self._names)} classes per image: --prediction.top_k "
                f"{self.top_k} is more than the model has."
            )
        self._files = getattr(trainer.datamodule, "predict_files", None) or []
        if self.explain:
            cam_layer(pl_module)  # a backbone without a feature map fails before any batch
            self._overlay_names = overlay_names(self._files)

    def write_on_batch_end(  # noqa: D102
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        prediction: torch.Tensor,
        batch_indices: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self._part is None:  # predicting without an epoch start (never from a Trainer)
            self.on_predict_epoch_start(trainer, pl_module)
        assert self._part is not None
        index = batch[1] if isinstance(batch, (tuple, list)) else None
        ids = index.tolist() if torch.is_tensor(index) else list(batch_indices or [])
        self._part.write(self.format_rows(ids, prediction))
        if self.explain and isinstance(batch, (tuple, list)):
            self.write_overlays(pl_module, batch[0], prediction.argmax(dim=1), ids)
        if ids:
            self._sorted = self._sorted and ids == sorted(ids) and ids[0] > self._last_index
            self._last_index = max(self._last_index, *ids)

    def format_rows(self, ids: list[int], probs: torch.Tensor) -> str:
        """CSV lines ``index,path,label,probability,top1,...`` for one batch (index first)."""
        k = min(self.top_k, len(self._names))
        top = torch.topk(probs.detach().float().cpu(), k, dim=1)
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        files, names = self._files, self._names
        for index, values, classes in zip(
            ids, top.values.tolist(), top.indices.tolist(), strict=True
        ):
            name = str(files[index]) if index < len(files) else str(index)
            row: list[Any] = [index, name, names[classes[0]], f"{values[0]:.6f}"]
            for value, cls in zip(values, classes, strict=True):
                row += [names[cls], f"{value:.6f}"]
            if self.tta != "none":
                row.append(self.tta)
            writer.writerow(row)
        return buffer.getvalue()

    def write_overlays(
        self,
        pl_module: pl.LightningModule,
        images: torch.Tensor,
        pred: torch.Tensor,
        ids: list[int],
    ) -> None:
        """Write the Grad-CAM overlay of each image's predicted class into ``explain``."""
        assert self.explain is not None
        heat = grad_cam(pl_module, images, pred)
        root = Path(self.explain)
        for image, h, index in zip(images.cpu(), heat, ids, strict=True):
            path = root / self._overlay_names.get(index, Path(f"{index:06d}.png"))
            path.parent.mkdir(parents=True, exist_ok=True)
            pixels = overlay(image.to(torch.uint8), h).permute(1, 2, 0).numpy()
            # Under DDP a padding repeat is the same image on two processes: write, then rename.
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            Image.fromarray(pixels).save(tmp, format="PNG")
            os.replace(tmp, path)

    def on_predict_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Close the part files; rank 0 merges them into the CSV once every process is done."""
        if self._part is None:
            self.on_predict_epoch_start(trainer, pl_module)
        sorted_here = self._sorted
        self._close_part()
        # Every rank reaches these two collectives: the part files are complete after the first.
        all_sorted = trainer.strategy.reduce_boolean_decision(sorted_here, all=True)
        path = self._path(trainer)
        if trainer.is_global_zero:
            parts = [self._part_of(path, r) for r in range(trainer.world_size)]
            count = merge_parts(parts, path, self._header(), presorted=all_sorted)
            tta = f" (test-time augmentation: {self.tta})" if self.tta != "none" else ""
            if not self.output and path.name != DEFAULT_NAME:
                tta += f"; the earlier predictions in {path.parent} are kept"
            print(f"Wrote {count} predictions to {path}{tta}")
        trainer.strategy.barrier()  # the parts are gone before any process returns

    def on_exception(self, trainer: pl.Trainer, *args: Any) -> None:  # noqa: D102
        self._close_part()
        if self._tta_before is not None and trainer.lightning_module is not None:
            self.on_predict_end(trainer, trainer.lightning_module)
        if self._part_path is not None:
            self._part_path.unlink(missing_ok=True)

    def _header(self) -> list[str]:
        header = ["path", "label", "probability"]
        for i in range(1, min(self.top_k, len(self._names)) + 1):
            header += [f"top{i}", f"top{i}_probability"]
        if self.tta != "none":
            header.append("tta")
        return header

    # Test-time augmentation is the model's forward pass (tlfinetune.tta): on for this run only.
    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Check the output (before any image is predicted); switch test-time augmentation on."""
        self._resolved = None  # each run checks and numbers its own file
        self._path(trainer)
        self._check_explain(trainer)
        self._tta_before = switch_tta(pl_module, self.tta)

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:  # noqa: D102
        if self._tta_before is not None:
            switch_tta(pl_module, self._tta_before)
            self._tta_before = None

    def _close_part(self) -> None:
        if self._part is not None:
            self._part.close()
            self._part = None


def writable_folder(folder: Path, what: str, flag: str) -> None:
    """Create ``folder`` if needed; OutputError naming it and ``flag`` when it cannot be written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(
            f"Cannot create the folder {folder} for {what} ({err.strerror}); choose another {flag}."
        ) from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(
            f"The folder {folder} is not writable, so {what} cannot go there; choose another "
            f"{flag}."
        )


def _file_id(path: Path) -> tuple[int, int] | None:
    """(device, inode): the same file under any name or link; None when it cannot be read."""
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_dev, stat.st_ino


def _rows(path: Path, presorted: bool) -> Iterator[tuple[int, list[str]]]:
    """``(index, rest of the row)`` of a part file, in index order.

    Read as CSV, not line by line: a file name may hold a newline, which the CSV quotes.
    """
    with open(path, newline="") as f:
        rows = ((int(row[0]), row[1:]) for row in csv.reader(f))
        if presorted:
            yield from rows
        else:  # a custom sampler that shuffles: this process's rows are sorted in memory
            yield from sorted(rows, key=lambda item: item[0])


def merge_parts(parts: list[Path], path: Path, header: list[str], presorted: bool) -> int:
    """Merge part files into ``path`` sorted by image index, each index once; remove the parts.

    Returns:
        The number of rows written.
    """
    tmp = path.with_name(f".{path.name}.tmp")
    count, last = 0, None
    try:
        with open(tmp, "w", newline="") as out:
            writer = csv.writer(out)
            writer.writerow(header)
            streams = [_rows(p, presorted) for p in parts if p.is_file()]
            for index, rest in heapq.merge(*streams, key=lambda item: item[0]):
                if index == last:  # a sampler's padding repeat: the same image, predicted again
                    continue
                writer.writerow(rest)
                count, last = count + 1, index
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
        for p in parts:
            p.unlink(missing_ok=True)
    return count


def overlay_names(files: list[Any]) -> dict[int, Path]:
    """``{index: relative PNG path}`` for the overlays of ``files``, unique, after the images.

    Paths are relative to the folder all files share, the suffix becomes ``.png``; two images
    that would then collide (``a.jpg`` and ``a.png``) keep their suffix (``a.jpg.png``).
    """
    paths = [Path(f) for f in files]
    if not paths:
        return {}
    common = Path(os.path.commonpath([str(p.parent) for p in paths]))
    relative = [p.relative_to(common) for p in paths]
    names = [r.with_suffix(".png") for r in relative]
    taken = Counter(names)
    return {
        i: (r.with_name(r.name + ".png") if taken[n] > 1 else n)
        for i, (r, n) in enumerate(zip(relative, names, strict=True))
    }
