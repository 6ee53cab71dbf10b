"""Learning-rate finder that follows the freeze schedule: ``python -m tlfinetune lr_find``.

Lightning's finder (:meth:`lightning.pytorch.tuner.Tuner.lr_find`) trains a few steps while the
learning rate grows exponentially and suggests the rate where the loss falls fastest. Run as it
comes on a fine-tuning setup it misleads twice: it sweeps whatever is trainable when it starts
(with a schedule, every layer that will *ever* train, since the optimizer must know them), and
it sets every param group to the same rate, erasing the backbone's ``backbone_lr_ratio``
(with ``BackboneFinetuning`` it fails outright, Lightning #14674). So here every freeze phase
gets sweeps of its own, each in a throw-away Trainer:

- phase 0 (the head, with the backbone as the schedule has it at epoch 0), and every milestone:
  the phase's trainable set, the backbone group at ``lr x backbone_lr_ratio`` (x axis: the
  head's rate). Phase 0's suggestion is the ``--model.optimizer.lr`` to use.
- every phase where backbone layers train: those layers alone, the head held still (x axis: the
  backbone's rate). Its suggestion divided by the head's is the ratio that phase tolerates; the
  smallest over the phases is the ``--freeze.backbone_lr_ratio`` to use.

It leaves no trace. Lightning's finder saves a checkpoint and restores weights, optimizer and
loop state from it; it does not restore ``requires_grad``, train/eval modes, hyperparameters
the model fills from the data, or the random generators outside its own sweep. Here all of
that is put back, the schedule given is only read, and the feature cache stays off during the
sweeps (a sweep is about 100 steps, mostly inside one epoch, while the cache only serves from a
phase's second epoch), so a fit after ``find_lr`` ends with the weights a fit without it gives.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import sys
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LightningArgumentParser
from lightning.pytorch.tuner import Tuner
from lightning.pytorch.utilities.seed import isolate_rng
from matplotlib.figure import Figure
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)

from tlfinetune.backbone import block_of
from tlfinetune.errors import ConfigError
from tlfinetune.freeze import FreezeSchedule
from tlfinetune.runs import AtomicCheckpointIO, free_number, numbered

log = logging.getLogger(__name__)

# Trainer settings a sweep takes over from the fit's configuration; the rest would log,
# checkpoint, validate or stop early, none of which a sweep wants.
CARRIED = (
    "accelerator",
    "precision",
    "accumulate_grad_batches",
    "gradient_clip_val",
    "gradient_clip_algorithm",
    "limit_train_batches",
    "enable_progress_bar",
    "deterministic",
)


@dataclass
class Sweep:
    """One learning-rate sweep: which parameters moved, the curve and its suggestion."""

    phase: int  # 0: the schedule at epoch 0; k: its k-th milestone
    epoch: int  # first epoch of the phase
    trainable_from: int  # first backbone module that trains in the phase
    swept: str  # "head" (x: head lr, backbone at the ratio) or "backbone" (head held still)
    label: str
    lrs: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    suggestion: float | None = None
    suggestion_index: int | None = None


@dataclass
class LRFindResult:
    """The sweeps of :func:`find_lr` and the flags they suggest.

    Attributes:
        sweeps: every sweep, in the order run.
        backbone_lr_ratio: the schedule's configured ratio (used in the ``head`` sweeps).
    """

    sweeps: list[Sweep]
    backbone_lr_ratio: float

    @property
    def lr(self) -> float | None:
        """Suggested ``--model.optimizer.lr``: phase 0's head sweep (None: no suggestion)."""
        return self.sweeps[0].suggestion if self.sweeps else None

    def ratios(self) -> dict[int, float]:
        """Per phase with backbone layers training: backbone suggestion / head suggestion."""
        lr = self.lr
        return {
            s.phase: s.suggestion / lr
            for s in self.sweeps
            if s.swept == "backbone" and s.suggestion is not None and lr
        }

    @property
    def ratio(self) -> float | None:
        """Suggested ``--freeze.backbone_lr_ratio``: the smallest phase's ratio (or None)."""
        ratios = self.ratios()
        return min(ratios.values()) if ratios else None

    def flags(self) -> str:
        """The suggestion as command-line flags."""
        parts = []
        if self.lr is not None:
            parts.append(f"--model.optimizer.lr {self.lr:.2g}")
        if self.ratio is not None:
            parts.append(f"--freeze.backbone_lr_ratio {self.ratio:.2g}")
        return " ".join(parts)

    def summary(self) -> str:
        """A few lines for the console: each sweep's suggestion, then the flags."""
        lines = []
        width = max(len(s.label) for s in self.sweeps) + 2
        for s in self.sweeps:
            what = "head lr" if s.swept == "head" else "backbone lr"
            found = (
                f"{what} {s.suggestion:.2g}" if s.suggestion is not None else "loss did not fall"
            )
            ratio = self.ratios().get(s.phase) if s.swept == "backbone" else None
            if ratio is not None:
                found += f" = {ratio:.2g} x head lr"
            lines.append(f"  {s.label:<{width}}{found}")
        flags = self.flags()
        if not flags:
            lines.append(
                "No suggestion: the loss did not fall in the sweep. Look at the curves; more "
                "steps (--lr_find.num_training), pretrained weights or more data may help."
            )
        else:
            lines.append(f"Suggested: {flags}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:  # noqa: D102
        return {
            "lr": self.lr,
            "backbone_lr_ratio": self.ratio,
            "configured_backbone_lr_ratio": self.backbone_lr_ratio,
            "sweeps": [asdict(s) for s in self.sweeps],
        }

    def plot(self) -> Figure:
        """Loss against learning rate, one panel per phase, each suggestion marked."""
        phases = sorted({s.phase for s in self.sweeps})
        fig = Figure(figsize=(5.2 * len(phases), 4.0), layout="constrained")
        axes = fig.subplots(1, len(phases), squeeze=False)[0]
        for ax, phase in zip(axes, phases, strict=True):
            for s, color in zip(
                [s for s in self.sweeps if s.phase == phase],
                ("tab:blue", "tab:orange"),
                strict=False,
            ):
                x = "head lr" if s.swept == "head" else "backbone lr"
                ax.plot(s.lrs, s.losses, color=color, label=f"{s.label.split(': ')[-1]} (x: {x})")
                if s.suggestion_index is not None:
                    i = s.suggestion_index
                    ax.plot(s.lrs[i], s.losses[i], "o", color=color, markersize=9,
                            markeredgecolor="black")  # fmt: skip
                    below = color != "tab:blue"  # two suggestions in a panel: one label each side
                    ax.annotate(f"{s.suggestion:.1e}", (s.lrs[i], s.losses[i]), color=color,
                                xytext=(6, -14 if below else 6), textcoords="offset points",
                                fontsize=9)  # fmt: skip
            ax.set_xscale("log")
            ax.set_xlabel("learning rate")
            ax.set_ylabel("training loss (smoothed)")
            first = next(s for s in self.sweeps if s.phase == phase)
            ax.set_title(first.label.split(": ")[0], fontsize=10)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        flags = self.flags()
        fig.suptitle(f"Learning-rate finder{': ' + flags if flags else ''}", fontsize=11)
        return fig


class _Phase(FreezeSchedule):
    """The schedule held at one phase's trainable set, for the length of a sweep."""

    def __init__(self, trainable_from: int, backbone_lr_ratio: float) -> None:
        super().__init__(backbone_lr_ratio=backbone_lr_ratio)
        self._index = trainable_from

    def resolve(self, backbone: str, num_modules: int) -> list[tuple[int, int]]:  # noqa: D102
        return [(0, self._index)]


def find_lr(
    model: pl.LightningModule,
    datamodule: pl.LightningDataModule,
    schedule: FreezeSchedule | None = None,
    *,
    min_lr: float = 1e-7,
    max_lr: float = 1.0,
    num_training: int = 100,
    early_stop_threshold: float | None = 4.0,
    trainer_kwargs: dict[str, Any] | None = None,
) -> LRFindResult:
    """Sweep the learning rate for every freeze phase of ``schedule``; change nothing.

    Args:
        model: a :class:`~tlfinetune.module.TransferClassifier`; its weights, ``requires_grad``
            flags, modes and hyperparameters are the same afterwards, and so are the random
            generators of torch, numpy and Python.
        datamodule: the training data; each sweep draws its batches from ``train_dataloader``.
        schedule: the freeze schedule to follow (only read); ``FreezeSchedule()`` by default.
        min_lr: first learning rate of each sweep.
        max_lr: last learning rate of each sweep.
        num_training: steps per sweep (fewer when the loss diverges first).
        early_stop_threshold: stop a sweep once the smoothed loss exceeds this multiple of its
            best (Lightning's rule); ``None`` runs every step.
        trainer_kwargs: more ``pl.Trainer`` arguments for the sweeps (``accelerator``,
            ``precision``...); each sweep runs on one device.

    Returns:
        The sweeps and the suggested learning rate and backbone ratio.
    """
    schedule = schedule or FreezeSchedule()
    steps = schedule.resolve(model.hparams.backbone, len(model.backbone))
    n = len(model.backbone)
    ratio = schedule.backbone_lr_ratio
    plan: list[Sweep] = []
    for phase, (epoch, index) in enumerate(steps):
        end = steps[phase + 1][0] - 1 if phase + 1 < len(steps) else None
        if end is not None and end < epoch:
            continue  # a milestone at the same epoch replaces this phase before it trains
        epochs = f"epoch {epoch} on" if end is None else f"epochs {epoch}-{end}"
        if end == epoch:
            epochs = f"epoch {epoch}"
        where = f"phase {phase}, {epochs}"
        trains = _what_trains(model, index)
        at = f" (backbone at lr x {ratio:g})" if index < n else ""
        plan.append(Sweep(phase, epoch, index, "head", f"{where}: {trains}{at}"))
        if index < n:
            alone = f"{where}: {_what_trains(model, index, head=False)} alone, head held"
            plan.append(Sweep(phase, epoch, index, "backbone", alone))
    settings = {
        "min_lr": min_lr,
        "max_lr": max_lr,
        "num_training": num_training,
        "early_stop_threshold": early_stop_threshold,
    }
    with _no_trace(model, datamodule), _said_once(), tempfile.TemporaryDirectory() as work:
        for sweep in plan:
            scales = {"head": 1.0, "backbone": ratio} if sweep.swept == "head" else {"head": 0.0}
            finder = _sweep(model, datamodule, sweep.trainable_from, ratio, scales, settings,
                            {**(trainer_kwargs or {}), "default_root_dir": work})  # fmt: skip
            if finder is None:
                continue
            sweep.lrs = [float(v) for v in finder.results.get("lr", [])]
            sweep.losses = debiased([float(v) for v in finder.results.get("loss", [])])
            sweep.suggestion_index = steepest(sweep.lrs, sweep.losses)
            if sweep.suggestion_index is not None:
                sweep.suggestion = sweep.lrs[sweep.suggestion_index]
    return LRFindResult(plan, ratio)


def debiased(losses: list[float], beta: float = 0.98) -> list[float]:
    """Lightning's smoothed losses with the bias correction it means to apply.

    Its finder averages the loss with momentum ``beta`` and divides the average by
    ``1 - beta ** (global_step + 1)``, but reads ``global_step`` after the optimizer step has
    counted the batch: the k-th value (from 0) is divided by ``1 - beta ** (k + 2)`` instead of
    ``1 - beta ** (k + 1)``. Its curve then starts at half the loss and climbs for the first few
    dozen steps whatever the learning rate does, which on a short sweep is all one sees (and
    where the steepest fall is looked for). Exact when every step was an optimizer step.
    """
    return [v * (1 - beta ** (k + 2)) / (1 - beta ** (k + 1)) for k, v in enumerate(losses)]


def steepest(
    lrs: list[float], losses: list[float], skip_begin: int = 10, skip_end: int = 1
) -> int | None:
    """Index of the steepest fall of the loss against ``log(lr)``; None: too few points.

    Lightning's ``suggestion()`` takes the gradient against the learning rate itself. On an
    exponential sweep that divides the small rates' differences by their tiny spacing, so it
    lands on the flat start of the curve: 8.3e-4 on the toy problem of the tests, where 1e-2
    trains best and 1e-3 has not moved the loss after 30 steps. Against ``log(lr)``, the axis
    the curve is drawn on (fastai's ``steep``), and before the lowest loss, it picks 4e-2 there.
    Lightning's skips are kept: the first 10 points (its smoothing's warm-up) and the last.
    None also when the loss never falls by 2% below its start: then there is nothing to suggest
    (e.g. a head on random features that 100 steps cannot teach).
    """
    index = torch.arange(len(losses))[skip_begin : len(losses) - skip_end]
    loss = torch.tensor(losses, dtype=torch.float64)[index]
    lr = torch.tensor(lrs, dtype=torch.float64)[index]
    finite = torch.isfinite(loss) & (lr > 0)
    index, loss, lr = index[finite], loss[finite], lr[finite]
    if len(loss) < 3:
        return None
    slope = torch.gradient(loss, spacing=[lr.log()])[0]
    # Only before the lowest loss: after it the sweep diverges, and its wobbles are no guide.
    before = int(loss.argmin())
    # A curve that never falls clearly below where it starts (2%: its noise on a flat sweep is
    # about 0.5%, the toy problem's fall in 40 steps 4%) has no steepest fall, only noise.
    if before < 1 or loss[before] > (1 - MIN_FALL) * loss[0]:
        return None
    return int(index[slope[:before].argmin()])


MIN_FALL = 0.02


def _what_trains(model: pl.LightningModule, index: int, head: bool = True) -> str:
    n = len(model.backbone)
    if index >= n:
        return "head"
    part = "backbone" if index == 0 else f"{block_of(model.hparams.backbone, index)}+"
    return f"{part} and head" if head else part


def _sweep(
    model: pl.LightningModule,
    datamodule: pl.LightningDataModule,
    index: int,
    ratio: float,
    scales: dict[str, float],
    settings: dict[str, Any],
    trainer_kwargs: dict[str, Any],
) -> Any:
    """One Lightning LR-finder run with the trainable set of ``index``, groups scaled."""
    kwargs = {
        "logger": False,
        "enable_checkpointing": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "max_epochs": -1,  # the finder's step count ends the sweep, however small the data
        "check_val_every_n_epoch": 2**31,  # a sweep never validates
        "devices": 1,
        # The finder reloads its own checkpoint: read as plain data, like every checkpoint here.
        "plugins": [AtomicCheckpointIO()],
        **trainer_kwargs,
        "callbacks": [_Phase(index, ratio)],
    }
    trainer = pl.Trainer(**kwargs)

    # Lightning's finder sets every param group to one rate. These global torch hooks give each
    # group its share of that rate for the step (the head's, or the backbone's at the ratio) and
    # put the finder's rate back before its scheduler reads it.
    def scale(optimizer: torch.optim.Optimizer, *_: Any) -> None:
        for group in optimizer.param_groups:
            group["_swept_lr"] = group["lr"]
            group["lr"] = group["lr"] * scales.get(group.get("name", "head"), 1.0)

    def unscale(optimizer: torch.optim.Optimizer, *_: Any) -> None:
        for group in optimizer.param_groups:
            group["lr"] = group.pop("_swept_lr", group["lr"])

    hooks = [register_optimizer_step_pre_hook(scale), register_optimizer_step_post_hook(unscale)]
    try:
        return Tuner(trainer).lr_find(model, datamodule=datamodule, update_attr=False, **settings)
    finally:
        for hook in hooks:
            hook.remove()


@contextmanager
def _no_trace(model: pl.LightningModule, datamodule: pl.LightningDataModule) -> Iterator[None]:
    """Put back what a sweep changes and Lightning's own restore does not."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    grads = {name: p.requires_grad for name, p in model.named_parameters()}
    modes = {name: m.training for name, m in model.named_modules()}
    hparams = copy.deepcopy(dict(model.hparams))
    initial = copy.deepcopy(dict(getattr(model, "_hparams_initial", {}) or {}))
    children, attributes = set(model._modules), dict(model.__dict__)
    trainer, dm_trainer = model._trainer, datamodule.trainer
    checks = model.__dict__.get("nonfinite_check_every", _UNSET)
    try:
        # The sweep is meant to diverge at its end: the model's NaN guard must not stop it.
        model.nonfinite_check_every = 0
        model.hparams["feature_cache"] = False  # no cache: see the module docstring
        with isolate_rng():
            yield
    finally:
        # Built from the data by the first sweep (the head, its metrics): the fit builds them.
        for name in set(model._modules) - children:
            delattr(model, name)
            if name in attributes:
                setattr(model, name, attributes[name])
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise RuntimeError(f"lr_find could not restore {missing or unexpected}.")
        for name, p in model.named_parameters():
            p.requires_grad_(grads[name])
        for name, m in model.named_modules():
            m.training = modes.get(name, m.training)
        model.hparams.clear()
        model.hparams.update(hparams)
        if hasattr(model, "_hparams_initial"):
            model._hparams_initial.clear()
            model._hparams_initial.update(initial)
        if checks is _UNSET:
            del model.nonfinite_check_every
        else:
            model.nonfinite_check_every = checks
        model.trainer = trainer
        datamodule.trainer = dm_trainer


_UNSET = object()


class _Once(logging.Filter):
    """Each distinct message once, none about the finder's own temporary checkpoint.

    Every sweep's Trainer says the same things; the checkpoint is never the user's.
    """

    INTERNAL = (".lr_find_", "`weights_only` was not set")

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:  # noqa: D102
        message = record.getMessage()
        if any(word in message for word in self.INTERNAL):
            return False
        new = message not in self.seen
        self.seen.add(message)
        return new


@contextmanager
def _said_once() -> Iterator[None]:
    names = (
        "tlfinetune.module",
        "lightning.pytorch",
        "lightning.pytorch.utilities.rank_zero",
        "lightning.pytorch.trainer.connectors.checkpoint_connector",
    )
    once = _Once()
    loggers = [logging.getLogger(name) for name in names]
    for logger in loggers:
        logger.addFilter(once)
    try:
        with warnings.catch_warnings():
            # Lightning's finder restores from a checkpoint without the sweep's own callback.
            warnings.filterwarnings("ignore", message=".*callbacks used to create the checkpo.*")
            yield
    finally:
        for logger in loggers:
            logger.removeFilter(once)


def write_result(result: LRFindResult, folder: Path) -> Path:
    """``lr_find.png`` and ``lr_find.json`` in ``folder`` (``lr_find.1.png``... when taken)."""
    folder.mkdir(parents=True, exist_ok=True)
    number = free_number([folder], ("lr_find.png", "lr_find.json"))  # one number: they pair up
    png = folder / numbered("lr_find.png", number)
    result.plot().savefig(png, dpi=100)
    png.with_suffix(".json").write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    return png


# --- the command ---------------------------------------------------------------------------------


def _cli_class() -> type:
    from tlfinetune.cli import TLFinetuneCLI, prog_name

    class _Arguments(TLFinetuneCLI):
        """The ``fit`` command's parser (config files, every fit flag) plus ``--lr_find.*``."""

        def __init__(self, args: list[str]) -> None:
            with warnings.catch_warnings():  # args given while sys.argv holds lr_find's own
                warnings.filterwarnings("ignore", message=".*args parameter is intended.*")
                super().__init__(args=args, run=False)

        def init_parser(self, **kwargs: Any) -> LightningArgumentParser:  # noqa: D102
            kwargs.update(prog=f"{prog_name()} lr_find", description=__doc__.split("\n\n")[0])
            return super().init_parser(**kwargs)

        def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:  # noqa: D102
            super().add_arguments_to_parser(parser)
            group = "lr_find"
            parser.add_argument(f"--{group}.num_training", type=int, default=100,
                                help="Steps per sweep.")  # fmt: skip
            parser.add_argument(f"--{group}.min_lr", type=float, default=1e-7,
                                help="First learning rate of each sweep.")  # fmt: skip
            parser.add_argument(f"--{group}.max_lr", type=float, default=1.0,
                                help="Last learning rate of each sweep.")  # fmt: skip

        def instantiate_classes(self) -> None:
            """Nothing yet: :func:`main` builds what the sweeps need."""

    return _Arguments


def main(argv: list[str] | None = None) -> LRFindResult:
    """Entry point of ``python -m tlfinetune lr_find``: the fit arguments plus ``--lr_find.*``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    cli = _cli_class()(argv or ["--help"])
    config = cli.config  # no --ckpt_path: sweeps start from --model.weights, never a resume
    settings = config.lr_find
    if not 0 < settings.min_lr < settings.max_lr or settings.num_training < 20:
        raise ConfigError(
            f"--lr_find.min_lr {settings.min_lr}, --lr_find.max_lr {settings.max_lr}, "
            f"--lr_find.num_training {settings.num_training}: need 0 < min_lr < max_lr and at "
            "least 20 steps (the suggestion skips the first 10)."
        )
    # jsonargparse 4.49 renamed instantiate_classes to instantiate.
    from tlfinetune.cli import check_accelerator

    init = getattr(cli.parser, "instantiate", cli.parser.instantiate_classes)(config)
    trainer_config = config.trainer
    check_accelerator(trainer_config.get("accelerator"))
    kwargs = {k: trainer_config.get(k) for k in CARRIED if trainer_config.get(k) is not None}
    if kwargs.get("precision") is None:
        chosen = cli._fastest_precision(trainer_config.get("accelerator"))
        if chosen is not None:
            kwargs["precision"] = chosen
    if (trainer_config.get("devices") not in (None, "auto", 1, "1")) or trainer_config.get(
        "num_nodes", 1
    ) != 1:
        log.info("lr_find runs in one process on one device; --trainer.devices is not used.")
    schedule = init.freeze
    model, data = init.model, init.data
    result = find_lr(
        model,
        data,
        schedule,
        min_lr=settings.min_lr,
        max_lr=settings.max_lr,
        num_training=settings.num_training,
        trainer_kwargs=kwargs,
    )
    root = Path(trainer_config.default_root_dir or "runs")
    png = write_result(result, root)
    count = len(result.sweeps)
    print(
        f"\nLearning-rate finder: {count} sweep{'s' * (count > 1)} of up to "
        f"{settings.num_training} steps from the starting weights, lr {settings.min_lr:g} -> "
        f"{settings.max_lr:g}:\n{result.summary()}\n  curves: {png} (numbers in "
        f"{png.with_suffix('.json').name})"
    )
    if result.lr is not None and not math.isfinite(result.lr):
        raise ConfigError("lr_find found no finite suggestion; see the curves.")
    return result
