"""Results people can look at: learning curves, metrics, confusion matrix, confident mistakes.

Two callbacks write them from a Trainer, and plain functions do the same from a notebook:

- :class:`LearningCurves` (during ``fit``): per-epoch train/val loss and accuracy, and the epochs
  where the :class:`~tlfinetune.freeze.FreezeSchedule` unfroze more of the backbone, drawn into
  ``learning_curves.png`` (numbers in ``learning_curves.json``) at the end of the fit.
- :class:`EvaluationReport` (during ``validate`` / ``test``, never during ``fit``): keeps the
  predictions the evaluation loop makes anyway (no second pass), then writes ``metrics.json``,
  ``confusion_matrix.png`` and ``mistakes.png`` and prints the per-class table. An earlier
  report in the same folder is kept: the new one is numbered (``metrics.1.json``,
  ``confusion_matrix.1.png``, ``mistakes.1.png``), all its files with the same number.
- :func:`evaluate` -> :class:`EvalResult` -> :func:`write_report` / :func:`compute_metrics`,
  :func:`plot_confusion_matrix`, :func:`plot_mistakes`, :func:`plot_learning_curves`.

The numbers are torchmetrics' definitions, computed from a confusion matrix and a top-5 hit
count, so an evaluation keeps a fixed amount of state however many images it sees. Figures
are ``matplotlib.figure.Figure`` objects drawn without pyplot, so nothing depends on a display
or on the backend a notebook chose; a notebook shows a returned Figure inline.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from matplotlib.figure import Figure
from torch import Tensor, nn
from torch.utils.data import DistributedSampler
from torchmetrics.classification import MulticlassConfusionMatrix

from tlfinetune.backbone import block_of
from tlfinetune.errors import ConfigError, DataError
from tlfinetune.freeze import FreezeSchedule, count_parameters
from tlfinetune.runs import free_number, numbered
from tlfinetune.saliency import grad_cam, overlay

log = logging.getLogger(__name__)

CURVE_KEYS = ("train/loss", "train/acc", "val/loss", "val/acc")
DPI = 100
REPORT_FILES = ("metrics.json", "confusion_matrix.png", "mistakes.png")


# --- evaluation results ------------------------------------------------------------------------


@dataclass
class Mistake:
    """One wrongly classified image, with the probability the model gave its wrong answer."""

    image: Tensor  # (3, H, W) uint8
    label: int
    pred: int
    confidence: float
    heat: Tensor | None = None  # (H, W) in [0, 1]: Grad-CAM of the predicted class


@dataclass
class EvalResult:
    """Counts over a dataset: the confusion matrix, top-5 hits, the most confident mistakes.

    Only what the report needs is kept, so its size does not grow with the number of images:
    every metric of :func:`compute_metrics` follows from the confusion matrix (and the top-5
    hit count). :meth:`from_probs` builds one from probabilities a caller already has.
    """

    confusion: Tensor  # (C, C) int64: rows true class, columns predicted class
    class_names: list[str]
    mistakes: list[Mistake] = field(default_factory=list)  # most confident first
    top5_correct: int | None = None  # images whose label is among the 5 most probable classes

    @classmethod
    def from_probs(
        cls,
        probs: Tensor,
        labels: Tensor,
        class_names: Sequence[str],
        mistakes: Sequence[Mistake] = (),
    ) -> EvalResult:
        """The counts of probabilities ``probs`` (N, C) against true ``labels`` (N,)."""
        counts = _Counts(len(class_names))
        counts.update(probs, labels)
        return cls(counts.confusion, list(class_names), list(mistakes), counts.top5)

    @property
    def num_samples(self) -> int:  # noqa: D102
        return int(self.confusion.sum())

    @property
    def num_classes(self) -> int:  # noqa: D102
        return len(self.class_names)

    @property
    def accuracy(self) -> float:
        """Top-1 accuracy (0.0 without samples)."""
        return float(self.confusion.trace()) / max(self.num_samples, 1)


class _Counts:
    """Confusion matrix and top-5 hit count, updated batch by batch (fixed size)."""

    def __init__(self, num_classes: int) -> None:
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
        self.top5: int | None = 0 if num_classes > 5 else None

    def update(self, probs: Tensor, labels: Tensor) -> Tensor:
        """Count a batch; returns the top-1 predictions."""
        probs, labels = probs.detach().float().cpu(), labels.detach().long().cpu()
        c = len(self.confusion)
        if probs.ndim != 2 or probs.shape[1] != c:
            raise ConfigError(
                f"The model gives {probs.shape[-1]} scores per image but there are {c} classes."
            )
        preds = probs.argmax(dim=1)
        self.confusion += torch.bincount(labels * c + preds, minlength=c * c).reshape(c, c)
        if self.top5 is not None:
            top = probs.topk(5, dim=1).indices
            self.top5 += int((top == labels[:, None]).any(dim=1).sum())
        return preds


class _Collector:
    """Accumulates batches into counts, keeping only the top-k most confident mistakes.

    What it holds is bounded by the number of classes and ``max_mistakes``, never by the
    number of images.
    """

    def __init__(self, max_mistakes: int, num_classes: int) -> None:
        self.max_mistakes = max_mistakes
        self.counts = _Counts(num_classes)
        self.seen = 0  # samples this process was given, padding repeats included
        self.mistakes: list[Mistake] = []
        self.image_shape = (0, 0, 0)  # (C, H, W) of the images seen

    def update(self, probs: Tensor, labels: Tensor, images: Tensor) -> None:
        self.image_shape = tuple(images.shape[1:])
        probs, labels = probs.detach().float().cpu(), labels.detach().long().cpu()
        preds = self.counts.update(probs, labels)
        confidence = probs.gather(1, preds[:, None]).squeeze(1)
        wrong = (preds != labels).nonzero().flatten().tolist()
        full = self.mistakes and len(self.mistakes) >= self.max_mistakes
        floor = self.mistakes[-1].confidence if full else -1.0
        wrong = wrong if self.max_mistakes > 0 else []
        for i in wrong:
            if confidence[i].item() > floor:  # only copy the images that can make the top k
                image = _to_uint8(images[i].detach().cpu())
                self.mistakes.append(
                    Mistake(image, int(labels[i]), int(preds[i]), confidence[i].item())
                )
        self.mistakes.sort(key=lambda m: -m.confidence)
        del self.mistakes[self.max_mistakes :]

    def result(self, class_names: Sequence[str]) -> EvalResult:
        if not self.counts.confusion.any():
            raise DataError("Nothing to report on: the dataloader gave no batches.")
        counts = self.counts
        return EvalResult(counts.confusion.clone(), list(class_names), self.mistakes, counts.top5)


def _to_uint8(image: Tensor) -> Tensor:
    if image.dtype == torch.uint8:
        return image.clone()
    return (image.float().clamp(0, 1) * 255).round().to(torch.uint8)


def resolve_class_names(model: nn.Module, class_names: Sequence[str] | None = None) -> list[str]:
    """Names given, else the model's ``hparams.class_names``, else ``"0"``, ``"1"``, ..."""
    hparams = getattr(model, "hparams", {})
    names = class_names or hparams.get("class_names")
    num_classes = hparams.get("num_classes") or (len(names) if names else None)
    if names is None:
        if num_classes is None:
            raise ConfigError("Give class_names: the model does not say how many classes it has.")
        names = [str(i) for i in range(num_classes)]
    names = [str(n) for n in names]
    if num_classes is not None and len(names) != num_classes:
        raise ConfigError(f"{len(names)} class names for a model with {num_classes} classes.")
    if len(set(names)) != len(names):
        raise ConfigError(f"Class names must be unique to key the report by them: {names}.")
    return names


def evaluate(
    model: nn.Module,
    dataloader: Iterable[Any],
    class_names: Sequence[str] | None = None,
    *,
    max_mistakes: int = 16,
    heat_maps: bool = True,
) -> EvalResult:
    """Run ``model`` in eval mode without gradients over batches ``(images, labels)``.

    Args:
        model: maps images (N, 3, H, W) to logits (N, C); used on the device its parameters are
            on, and put back in its previous train/eval mode afterwards.
        dataloader: yields ``(images, labels, ...)`` batches.
        class_names: names in label order; by default the model's ``hparams.class_names``.
        max_mistakes: how many of the most confidently wrong images to keep for the grid.
        heat_maps: add the Grad-CAM map of the predicted class to each mistake
            (:func:`add_heat_maps`).

    Returns:
        The confusion matrix, top-5 hits, class names and the most confident mistakes.
    """
    names = resolve_class_names(model, class_names)
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    collector = _Collector(max_mistakes, len(names))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in dataloader:
                images, labels = batch[0], batch[1]
                logits = model(images.to(device))
                collector.update(torch.softmax(logits.float(), dim=1), labels, images)
    finally:
        model.train(was_training)
    result = collector.result(names)
    if heat_maps:
        add_heat_maps(model, result.mistakes)
    return result


def add_heat_maps(model: nn.Module, mistakes: Sequence[Mistake]) -> None:
    """Set each mistake's ``heat`` to the Grad-CAM map of the class the model wrongly predicted.

    Shows where the model saw its wrong answer; ``mistakes.png`` overlays it. Left out, with a
    warning, when the model's backbone has no convolutional map or captum is not installed; a
    model that is not a :class:`~tlfinetune.module.TransferClassifier` gets none.
    """
    if not mistakes or not all(hasattr(model, a) for a in ("backbone", "head", "normalize")):
        return
    try:
        if len({m.image.shape for m in mistakes}) == 1:
            images = torch.stack([m.image for m in mistakes])
            heat = grad_cam(model, images, torch.tensor([m.pred for m in mistakes]))
        else:  # images of several sizes: one at a time
            heat = [grad_cam(model, m.image[None], torch.tensor([m.pred]))[0] for m in mistakes]
        for m, h in zip(mistakes, heat, strict=True):
            m.heat = h
    except ConfigError as exc:
        _warn_once(f"mistakes.png has no heat maps: {exc}")


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        log.warning(message)


# --- numbers -----------------------------------------------------------------------------------


def compute_metrics(result: EvalResult) -> dict[str, Any]:
    """Accuracy (micro top-1), top-5 (more than 5 classes), macro F1, balanced accuracy, per class.

    The numbers are torchmetrics' (``MulticlassAccuracy``, ``MulticlassF1Score``,
    ``MulticlassPrecision``, ``MulticlassRecall``, zero division giving 0, macro F1 and
    balanced accuracy (macro recall) over the classes that occur as label or prediction),
    computed from the confusion matrix with the same float32 arithmetic.

    Returns:
        ``num_samples``, ``num_classes``, ``accuracy``, ``top5_accuracy`` (only when there are
        more than 5 classes), ``macro_f1``, ``balanced_accuracy``, ``per_class`` (``{name:
        {precision, recall, f1, support}}``) and ``confusion_matrix`` (rows: true class,
        columns: predicted class).
    """
    confusion, c = result.confusion.long(), result.num_classes
    tp = confusion.diagonal()
    fp = confusion.sum(dim=0) - tp
    fn = confusion.sum(dim=1) - tp
    n = int(confusion.sum())
    metrics: dict[str, Any] = {
        "num_samples": n,
        "num_classes": c,
        "accuracy": _divide(tp.sum(), (tp + fn).sum()).item(),
    }
    if c > 5:
        metrics["top5_accuracy"] = _divide(torch.tensor(result.top5_correct or 0), n).item()
    f1 = _divide(2.0 * tp, 2.0 * tp + fn + fp)
    present = (tp + fp + fn != 0).float()  # torchmetrics leaves absent classes out of the mean
    metrics["macro_f1"] = _divide(present * f1, present.sum()).sum().item()
    recall_t = _divide(tp, tp + fn)
    # Mean per-class recall (torchmetrics' macro MulticlassRecall): every class counts the same
    # however many images it has, so favouring a large class does not pay as in accuracy.
    metrics["balanced_accuracy"] = _divide(present * recall_t, present.sum()).sum().item()
    precision = _divide(tp, tp + fp).tolist()
    recall = recall_t.tolist()
    support = (tp + fn).tolist()
    metrics["per_class"] = {
        name: {"precision": p, "recall": r, "f1": f, "support": s}
        for name, p, r, f, s in zip(
            result.class_names, precision, recall, f1.tolist(), support, strict=True
        )
    }
    metrics["confusion_matrix"] = confusion.tolist()
    return metrics


def _divide(num: Tensor, denom: Tensor | int) -> Tensor:
    """``num / denom`` in float32, 0 where ``denom`` is 0 (torchmetrics' ``_safe_divide``)."""
    num = num if num.is_floating_point() else num.float()
    denom = torch.as_tensor(denom)
    denom = denom if denom.is_floating_point() else denom.float()
    return torch.where(denom != 0, num / torch.where(denom != 0, denom, 1.0), 0.0)


def format_report(metrics: dict[str, Any]) -> str:
    """A text table for the console: the summary numbers, then one row per class."""
    lines = [f"{'accuracy':<16}{metrics['accuracy']:.4f}  ({metrics['num_samples']} samples)"]
    if "top5_accuracy" in metrics:
        lines.append(f"{'top-5 accuracy':<16}{metrics['top5_accuracy']:.4f}")
    lines.append(f"{'macro F1':<16}{metrics['macro_f1']:.4f}")
    if "balanced_accuracy" in metrics:  # metrics.json written before it existed has none
        lines.append(f"{'balanced acc.':<16}{metrics['balanced_accuracy']:.4f}  (mean recall)")
    width = max([5, *(len(name) for name in metrics["per_class"])]) + 2
    lines += ["", f"{'class':<{width}}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>10}"]
    for name, row in metrics["per_class"].items():
        lines.append(
            f"{name:<{width}}{row['precision']:>10.4f}{row['recall']:>10.4f}{row['f1']:>10.4f}"
            f"{row['support']:>10d}"
        )
    return "\n".join(lines)


def write_report(
    result: EvalResult,
    out_dir: str | Path,
    extra: dict[str, Any] | None = None,
    number: int | None = None,
) -> dict[str, Any]:
    """Write ``metrics.json``, ``confusion_matrix.png`` and ``mistakes.png`` into ``out_dir``.

    Files already there are kept: the new ones are numbered (``metrics.1.json``,
    ``confusion_matrix.1.png``, ``mistakes.1.png``; see :func:`free_number`), and the log says
    where they went.

    Args:
        result: what :func:`evaluate` returned.
        out_dir: folder for the three files; created when missing.
        extra: more entries for ``metrics.json`` (e.g. the stage or checkpoint it came from).
        number: the number for the file names (0: none), when the caller chose one for several
            folders; by default the first under which none of the three exists in ``out_dir``.

    Returns:
        The metrics written to ``metrics.json`` (see :func:`compute_metrics`).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if number is None:
        number = free_number([out], REPORT_FILES)
    json_name, confusion_name, mistakes_name = (numbered(n, number) for n in REPORT_FILES)
    metrics = {**(extra or {}), **compute_metrics(result)}
    (out / json_name).write_text(json.dumps(metrics, indent=2) + "\n")
    plot_confusion_matrix(result).savefig(out / confusion_name, dpi=DPI)
    plot_mistakes(result).savefig(out / mistakes_name, dpi=DPI)
    kept = "; the earlier report files there are kept" if number else ""
    log.info(f"Report written to {out / json_name}, {confusion_name} and {mistakes_name}{kept}.")
    return metrics


# --- figures -----------------------------------------------------------------------------------


def plot_confusion_matrix(result: EvalResult) -> Figure:
    """Counts of (true, predicted) pairs, class names on both axes."""
    c = result.num_classes
    side = min(max(5.0, 0.45 * c + 3.0), 20.0)
    fig = Figure(figsize=(side, side), layout="constrained")
    ax = fig.add_subplot()
    confmat = MulticlassConfusionMatrix(c)  # only its plot: the counts are the result's
    confmat.plot(
        result.confusion, ax=ax, labels=[_short(n) for n in result.class_names], add_text=c <= 20
    )
    for label in ax.get_xticklabels():  # rotated names end under their column
        label.set(ha="right", rotation_mode="anchor")
    for label in ax.get_yticklabels():
        label.set(rotation=0)
    for text in ax.texts:  # torchmetrics writes the counts at 15 pt
        text.set_fontsize(15 if c <= 8 else 10)
    fig.suptitle(f"Confusion matrix: {result.num_samples} images, accuracy {result.accuracy:.1%}")
    return fig


def plot_mistakes(result: EvalResult) -> Figure:
    """The most confidently wrong images with true label, predicted label and its probability."""
    mistakes = result.mistakes
    if not mistakes:
        fig = Figure(figsize=(6, 2), layout="constrained")
        fig.text(0.5, 0.5, f"No mistakes: all {result.num_samples} images classified correctly.",
                 ha="center", va="center", fontsize=12)  # fmt: skip
        return fig
    cols = min(4, len(mistakes))
    rows = math.ceil(len(mistakes) / cols)
    fig = Figure(figsize=(2.6 * cols, 2.9 * rows), layout="constrained")
    fig.suptitle("Most confident mistakes")
    names = [_short(n) for n in result.class_names]
    if any(m.heat is not None for m in mistakes):
        fig.suptitle("Most confident mistakes (heat: where the model saw its prediction)")
    for i, m in enumerate(mistakes):
        ax = fig.add_subplot(rows, cols, i + 1)
        shown = m.image if m.heat is None else overlay(m.image, m.heat)
        image = shown.permute(1, 2, 0).numpy()
        ax.imshow(image.squeeze(-1) if image.shape[-1] == 1 else image, cmap="gray")
        ax.set_title(
            f"true: {names[m.label]}\npred: {names[m.pred]} ({m.confidence:.2f})", fontsize=9
        )
        ax.axis("off")
    return fig


def _short(name: str, limit: int = 18) -> str:
    return name if len(name) <= limit else name[: limit - 1] + "…"


def plot_learning_curves(
    history: Sequence[dict[str, Any]], milestones: dict[int, str] | None = None
) -> Figure:
    """Loss and accuracy per epoch, train and val, with unfreeze milestones as vertical lines.

    Args:
        history: one dict per epoch with ``epoch`` and any of ``train/loss``, ``train/acc``,
            ``val/loss``, ``val/acc`` (as :attr:`LearningCurves.history`).
        milestones: ``{epoch: label}``; a line is drawn where that epoch starts.
    """
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, quantity in zip(axes, ("loss", "acc"), strict=True):
        for stage, style in (("train", "o-"), ("val", "s--")):
            key = f"{stage}/{quantity}"
            points = [(h["epoch"], h[key]) for h in history if h.get(key) is not None]
            if points:
                ax.plot(*zip(*points, strict=True), style, label=key)
        for epoch, label in (milestones or {}).items():
            ax.axvline(epoch - 0.5, color="tab:gray", linestyle=":")
            ax.annotate(label, (epoch - 0.5, 1.0), xycoords=ax.get_xaxis_transform(),
                        xytext=(0, 3), textcoords="offset points", ha="center", va="bottom",
                        fontsize=8, color="tab:gray")  # fmt: skip
        ax.set_xlabel("epoch")
        ax.set_ylabel("accuracy" if quantity == "acc" else "loss")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    if not history:
        fig.text(0.5, 0.5, "No epochs recorded.", ha="center", va="center")
    fig.suptitle("Learning curves")
    return fig


# --- callbacks ---------------------------------------------------------------------------------


class LearningCurves(pl.Callback):
    """Record loss and accuracy per epoch during ``fit``; draw ``learning_curves.png`` at the end.

    An epoch where more parameters train than in the one before is a milestone (the
    FreezeSchedule unfroze layers at its start); it is labelled with the backbone block the
    schedule unfroze from. The history is saved in checkpoints, so a resumed fit draws every
    epoch.

    Args:
        dirpath: folder for ``learning_curves.png`` and ``learning_curves.json``; by default the
            Trainer's ``log_dir`` (its ``default_root_dir`` without a logger).

    Attributes:
        history: one dict per epoch: ``epoch``, ``train/loss``, ``train/acc``, ``val/loss``,
            ``val/acc`` (those logged) and ``trainable_params``.
        milestones: ``{epoch: label}`` for the epochs that unfroze layers.
    """

    def __init__(self, dirpath: str | None = None) -> None:
        self.dirpath = dirpath
        self.history: list[dict[str, Any]] = []
        self.milestones: dict[int, str] = {}

    def _entry(self, epoch: int) -> dict[str, Any]:
        for entry in self.history:
            if entry["epoch"] == epoch:
                return entry
        self.history.append({"epoch": epoch})
        return self.history[-1]

    def _record(self, trainer: pl.Trainer, prefix: str) -> dict[str, Any]:
        entry = self._entry(trainer.current_epoch)
        for key in CURVE_KEYS:
            value = trainer.callback_metrics.get(key)
            if key.startswith(prefix) and value is not None:
                entry[key] = float(value)
        return entry

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Record ``val/loss`` and ``val/acc`` of the current epoch (not in the sanity check)."""
        if not trainer.sanity_checking and trainer.state.fn == "fit":
            self._record(trainer, "val/")

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Record ``train/loss``, ``train/acc`` and the trainable parameter count."""
        entry = self._record(trainer, "train/")
        entry["trainable_params"] = count_parameters(pl_module)[0]
        before = [h.get("trainable_params") for h in self.history if h["epoch"] < entry["epoch"]]
        if before and before[-1] is not None and entry["trainable_params"] > before[-1]:
            self.milestones[entry["epoch"]] = self._label(trainer, pl_module, entry["epoch"])

    @staticmethod
    def _label(trainer: pl.Trainer, pl_module: pl.LightningModule, epoch: int) -> str:
        schedule = FreezeSchedule.find(trainer)
        steps = dict(schedule.steps if schedule else [])
        backbone = pl_module.hparams.get("backbone")
        if epoch in steps and backbone is not None:
            index = steps[epoch]
            return "unfreeze all" if index == 0 else f"unfreeze {block_of(backbone, index)}+"
        return "unfreeze"

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Write ``learning_curves.png`` and ``learning_curves.json`` (rank 0 only)."""
        out = Path(self.dirpath or trainer.log_dir or trainer.default_root_dir)  # all ranks
        if not trainer.is_global_zero:
            return
        out.mkdir(parents=True, exist_ok=True)
        self.history.sort(key=lambda h: h["epoch"])
        plot_learning_curves(self.history, self.milestones).savefig(
            out / "learning_curves.png", dpi=DPI
        )
        data = {"history": self.history, "milestones": self.milestones}
        (out / "learning_curves.json").write_text(json.dumps(data, indent=2) + "\n")
        log.info(f"Learning curves written to {out / 'learning_curves.png'}.")

    def state_dict(self) -> dict[str, Any]:
        """History and milestones, so a resumed fit keeps the earlier epochs."""
        return {"history": [dict(h) for h in self.history], "milestones": dict(self.milestones)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # noqa: D102
        self.history = [dict(h) for h in state_dict.get("history", [])]
        self.milestones = {int(k): v for k, v in state_dict.get("milestones", {}).items()}


class EvaluationReport(pl.Callback):
    """Write the evaluation report at the end of ``trainer.validate`` and ``trainer.test``.

    The logits the model computes in ``validation_step`` / ``test_step`` are caught with a
    forward hook, so the report costs no second pass over the data and its numbers are the
    ones the loop logged. (A batch whose logits were not caught, e.g. from a step that never
    calls the model on the whole batch, is run through the model again.) Nothing happens during
    ``fit``. Only counts and the most confident mistakes are kept, not every prediction, so
    memory stays flat however many images there are. With several processes, the counts are
    summed and the mistakes gathered onto rank 0, which writes; images a ``DistributedSampler``
    repeated to even out the processes are counted once.

    Files go into ``dirpath``, by default ``<trainer.log_dir>/<stage>_report`` (``log_dir`` is
    ``default_root_dir`` without a logger); one sub-folder ``dataloader_<i>`` per dataloader
    when there are several. A report already there is kept; the new files are numbered, all
    of one run with the same number (:func:`write_report`).

    Args:
        dirpath: folder for the report files.
        max_mistakes: images in ``mistakes.png``.
        verbose: print the per-class table.
        heat_maps: overlay the Grad-CAM map of the predicted class on each mistake
            (:func:`add_heat_maps`).

    Attributes:
        metrics: ``{dataloader_idx: metrics}`` of the last report, on rank 0.
    """

    def __init__(
        self,
        dirpath: str | None = None,
        max_mistakes: int = 16,
        verbose: bool = True,
        heat_maps: bool = True,
    ) -> None:
        self.dirpath = dirpath
        self.max_mistakes = max_mistakes
        self.verbose = verbose
        self.heat_maps = heat_maps
        self.metrics: dict[int, dict[str, Any]] = {}
        self._collectors: dict[int, _Collector] = {}
        self._caught: list[Tensor] = []
        self._hook: Any = None
        self._tta = "none"  # the model's test-time augmentation during this run

    # Lightning hooks, for both stages.
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Start catching logits when the run is ``trainer.validate``."""
        self._start(trainer, pl_module, "validate")

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Start catching logits when the run is ``trainer.test``."""
        self._start(trainer, pl_module, "test")

    def on_validation_batch_start(self, *args: Any, **kwargs: Any) -> None:  # noqa: D102
        self._caught.clear()

    on_test_batch_start = on_validation_batch_start

    def on_validation_batch_end(  # noqa: D102
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
        batch_idx: int, dataloader_idx: int = 0,
    ) -> None:  # fmt: skip
        self._batch_end(pl_module, batch, dataloader_idx)

    on_test_batch_end = on_validation_batch_end

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Write the report of ``trainer.validate``."""
        self._end(trainer, pl_module, "validate")

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Write the report of ``trainer.test``."""
        self._end(trainer, pl_module, "test")

    def on_exception(self, *args: Any, **kwargs: Any) -> None:  # noqa: D102
        self._remove_hook()

    # The work.
    def _start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if trainer.state.fn != stage:  # validation inside fit: not ours
            return
        self._collectors, self._caught, self._tta = {}, [], "none"
        self._remove_hook()
        self._hook = pl_module.register_forward_hook(self._catch)

    def _catch(self, module: nn.Module, args: Any, output: Any) -> None:
        if isinstance(output, Tensor) and output.ndim == 2:
            self._caught.append(output.detach())

    def _batch_end(self, pl_module: pl.LightningModule, batch: Any, dataloader_idx: int) -> None:
        if self._hook is None:
            return
        # Read here, after every callback's start hook has run: the mode the logits came from.
        self._tta = getattr(pl_module, "tta", "none")
        images, labels = batch[0], batch[1]
        logits = next((t for t in reversed(self._caught) if len(t) == len(labels)), None)
        if logits is None:
            with torch.no_grad():
                logits = pl_module(images)
        self._caught.clear()
        collector = self._collectors.get(dataloader_idx)
        if collector is None:
            c = len(resolve_class_names(pl_module))
            collector = self._collectors[dataloader_idx] = _Collector(self.max_mistakes, c)
        keep = _not_padding(pl_module.trainer, dataloader_idx, collector.seen, len(labels))
        collector.seen += len(labels)
        if keep is not None:
            images, labels, logits = images[keep], labels[keep], logits[keep]
        collector.update(torch.softmax(logits.float(), dim=1), labels, images)

    def _end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._hook is None or trainer.state.fn != stage:
            return
        self._remove_hook()
        if trainer.world_size > 1:
            # The same collectives on every rank, also one that got no batch of a dataloader.
            names = resolve_class_names(pl_module)
            for idx in range(len(_eval_loaders(trainer, stage))):
                collector = self._collectors.get(idx) or _Collector(self.max_mistakes, len(names))
                self._collectors[idx] = collector
                _gather(trainer, collector)
        log_dir = trainer.log_dir or trainer.default_root_dir  # on all ranks: log_dir broadcasts
        root = Path(self.dirpath) if self.dirpath else Path(log_dir) / f"{stage}_report"
        if not trainer.is_global_zero:
            return
        names = resolve_class_names(pl_module)
        many = len(self._collectors) > 1
        folders = {i: root / f"dataloader_{i}" if many else root for i in self._collectors}
        number = free_number(folders.values(), REPORT_FILES)  # one run, one number
        self.metrics = {}
        for idx, collector in sorted(self._collectors.items()):
            out = folders[idx]
            extra = {"stage": stage, "dataloader_idx": idx, "tta": self._tta}
            result = collector.result(names)
            if self.heat_maps:
                add_heat_maps(pl_module, result.mistakes)
            self.metrics[idx] = write_report(result, out, extra, number=number)
            if self.verbose:
                tta = f", test-time augmentation: {self._tta}" if self._tta != "none" else ""
                print(f"\n{stage} report ({out}{tta}):\n{format_report(self.metrics[idx])}")
        self._collectors = {}

    def _remove_hook(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None


def _gather(trainer: pl.Trainer, collector: _Collector) -> None:
    """Replace one process's counts and mistakes by those of all processes."""
    strategy = trainer.strategy
    device = strategy.root_device
    counts = collector.counts
    counts.confusion = strategy.reduce(counts.confusion.to(device), reduce_op="sum").cpu()
    if counts.top5 is not None:
        top5 = strategy.reduce(torch.tensor(counts.top5, device=device), reduce_op="sum")
        counts.top5 = int(top5)
    mistakes = collector.mistakes
    shape = torch.tensor(collector.image_shape, device=device)
    shape = strategy.all_gather(shape).reshape(-1, 3).max(dim=0).values.tolist()
    images = torch.stack([m.image for m in mistakes]) if mistakes else torch.zeros(0, *shape)
    meta = torch.tensor([[m.label, m.pred, m.confidence] for m in mistakes], dtype=torch.float64)
    images = _gather_rows(trainer, images.to(torch.uint8))
    meta = _gather_rows(trainer, meta.reshape(-1, 3))
    collector.mistakes = [
        Mistake(image, int(label), int(pred), conf)
        for image, (label, pred, conf) in zip(images, meta.tolist(), strict=True)
    ]
    collector.mistakes.sort(key=lambda m: -m.confidence)
    del collector.mistakes[collector.max_mistakes :]


def _eval_loaders(trainer: pl.Trainer, stage: str) -> list[Any]:
    """The loaders of a ``validate``/``test`` run, as a list (one per dataloader_idx)."""
    loaders = trainer.test_dataloaders if stage == "test" else trainer.val_dataloaders
    if loaders is None:
        return []
    return list(loaders) if isinstance(loaders, (list, tuple)) else [loaders]


def _not_padding(trainer: pl.Trainer, dataloader_idx: int, seen: int, n: int) -> Tensor | None:
    """Mask of the ``n`` samples after the first ``seen`` that are not padding repeats.

    ``DistributedSampler`` repeats the first images so every process gets as many: position
    ``j`` of rank ``r`` is image ``j * world_size + r`` of the padded list, and positions from
    ``len(dataset)`` on are the repeats. ``None`` when nothing in the batch is padding.
    """
    if trainer is None or trainer.world_size < 2:
        return None
    sampler = getattr(_eval_loaders(trainer, trainer.state.fn)[dataloader_idx], "sampler", None)
    if not isinstance(sampler, DistributedSampler) or sampler.drop_last:
        return None
    size = len(sampler.dataset)  # type: ignore[arg-type]
    if sampler.total_size <= size:  # no padding (e.g. an UnrepeatedDistributedSampler)
        return None
    positions = torch.arange(seen, seen + n) * sampler.num_replicas + sampler.rank
    keep = positions < size
    return None if bool(keep.all()) else keep


def _gather_rows(trainer: pl.Trainer, tensor: Tensor) -> Tensor:
    """Concatenate the rows of ``tensor`` over all processes (row counts may differ)."""
    strategy = trainer.strategy
    device = strategy.root_device
    counts = strategy.all_gather(torch.tensor([len(tensor)], device=device)).flatten().tolist()
    pad = tensor.new_zeros((max(counts) - len(tensor), *tensor.shape[1:]))
    gathered = strategy.all_gather(torch.cat([tensor, pad]).to(device)).cpu()
    return torch.cat([rows[:n] for rows, n in zip(gathered, counts, strict=True)])
