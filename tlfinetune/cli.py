"""Command line: ``python -m tlfinetune {fit,test,predict,export,compare,lr_find,backbones,...}``.

fit/validate/test/predict are LightningCLI subcommands over TransferClassifier and
ImageDataModule, with the FreezeSchedule as its own argument group (``--freeze.*``). Every run of
``fit`` gets its own ``version_N`` folder under ``trainer.default_root_dir`` holding its
checkpoints (best by ``val/acc`` and ``last.ckpt``), ``config.yaml`` and ``metrics.csv``.
``export``, ``compare`` and ``lr_find`` parse their arguments with jsonargparse too: ``export``
from a typed parser of its own, ``compare`` and ``lr_find`` with the ``fit`` parser plus their
own options.
"""

from __future__ import annotations

import argparse
import difflib
import gc
import logging
import os
import re
import shutil
import sys
import warnings
import zipfile
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.cli import (
    ArgsType,
    LightningArgumentParser,
    LightningCLI,
    SaveConfigCallback,
)
from lightning.pytorch.utilities.exceptions import SIGTERMException

from tlfinetune.data import ImageDataModule
from tlfinetune.errors import ConfigError, TLFinetuneError
from tlfinetune.freeze import FreezeSchedule
from tlfinetune.machine import device_type_of, fastest_precision, keep_freed_memory
from tlfinetune.module import TransferClassifier, _metrics
from tlfinetune.predict import PredictionWriter
from tlfinetune.report import EvaluationReport, LearningCurves
from tlfinetune.runs import (
    AtomicCheckpointIO,
    RunCheckpoint,
    RunLogger,
    find_last_checkpoint,
    next_free_name,
    version_of,
)
from tlfinetune.stopping import ScheduleEarlyStopping
from tlfinetune.tta import TestTimeAugmentation

log = logging.getLogger(__name__)

# Architecture hyperparameters: always the checkpoint's, since its weights only fit them.
# The preprocessing too: the weights were trained on images prepared that way.
ARCHITECTURE = (
    "backbone",
    "head",
    "head_hidden",
    "num_classes",
    "class_names",
    "image_size",
    "preprocessing",
)


class RunConfig(SaveConfigCallback):
    """Save the resolved config beside the checkpoints, never over an earlier one."""

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:  # noqa: D102
        if trainer.log_dir:
            self.config_filename = next_free_name(Path(trainer.log_dir), "config.yaml")
        super().setup(trainer, pl_module, stage)


class TLFinetuneCLI(LightningCLI):
    """LightningCLI with the freeze schedule, checkpoints and the tlfinetune run layout."""

    def __init__(self, args: ArgsType = None, run: bool = True) -> None:
        # The command line as given: an error in a config file then names the file.
        self._argv = sys.argv[1:] if args is None else list(args) if isinstance(args, list) else []
        super().__init__(
            TransferClassifier,
            ImageDataModule,
            args=args,
            run=run,
            save_config_callback=RunConfig,
            # Lightning's automatic optimizer would get every parameter, frozen ones included
            # (Lightning #19032, #20743); the module builds its own from the trainable ones.
            auto_configure_optimizers=False,
            trainer_defaults={"default_root_dir": "runs"},
            parser_kwargs={"parser_mode": "yaml"},
        )

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        """Lightning's parser: named as the user runs it, errors short, unknown keys explained."""
        kwargs.setdefault("prog", prog_name())
        if not getattr(self, "_building", None):  # the top-level parser, not a subcommand's
            kwargs.setdefault("description", DESCRIPTION)
            kwargs.setdefault("formatter_class", TopLevelHelp)
        parser = super().init_parser(**kwargs)
        short_errors(parser, getattr(self, "_argv", None))
        return parser

    def _add_subcommands(self, parser: LightningArgumentParser, **kwargs: Any) -> None:
        """Lightning's four subcommands, listed in the help with the other commands."""
        super()._add_subcommands(parser, **kwargs)
        action = parser._subcommands_action
        action.metavar = "COMMAND"
        for group in parser._action_groups:
            if action in group._group_actions:
                group.title, group.description = "commands", COMMANDS

    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs: Any) -> Any:
        self._building = subcommand
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        if subcommand == "predict":
            # The PredictionWriter streams rows to disk; returned predictions would keep every
            # image's probabilities in memory until the end.
            parser.set_defaults({"return_predictions": False})
        return parser

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """The --freeze, --checkpoint, --early_stopping and (predict) --prediction groups."""
        parser.add_lightning_class_args(FreezeSchedule, "freeze")
        parser.add_lightning_class_args(RunCheckpoint, "checkpoint")
        parser.add_lightning_class_args(ScheduleEarlyStopping, "early_stopping")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/acc",
                "checkpoint.mode": "max",
                "checkpoint.save_last": True,
                "checkpoint.filename": "best-epoch{epoch:02d}-acc{val/acc:.4f}",
                "checkpoint.auto_insert_metric_name": False,
            }
        )
        if getattr(self, "_building", None) == "predict":
            parser.add_lightning_class_args(PredictionWriter, "prediction")
        self._add_tta_option(parser)

    def _add_tta_option(self, parser: LightningArgumentParser) -> None:
        """``--prediction.tta`` for validate/test (predict's is the PredictionWriter's own)."""
        if getattr(self, "_building", None) in ("validate", "test"):
            parser.add_lightning_class_args(TestTimeAugmentation, "prediction")

    # --- before the classes exist --------------------------------------------------------------

    def _parse_ckpt_path(self) -> None:
        """Resolve ``--ckpt_path last``; fill the model config from the checkpoint, carefully.

        Lightning lets checkpoint hyperparameters override ``--model.*`` flags silently
        (#21455). Here the architecture always comes from the checkpoint (its weights only fit
        it; a different flag is reported), weights are the checkpoint's own, and training
        settings the user gave (``--model.optimizer``, ``--model.label_smoothing``...) win, with
        a log line saying so.
        """
        self._resume_version: int | None = None
        sub = self.config.get("subcommand")
        if not sub:
            return
        if not self.config[sub].get("ckpt_path"):
            if sub in ("validate", "test", "predict"):
                warn_untrained(sub, Path(self.config[sub].trainer.default_root_dir or "runs"))
            return
        config = self.config[sub]
        root = Path(config.trainer.default_root_dir or ".")
        if sub == "fit" and config.ckpt_path == "last":
            found = find_last_checkpoint(root)
            if found is None:
                raise ConfigError(
                    f"--ckpt_path last: no last.ckpt under {root}/version_*/checkpoints, so there "
                    f"is nothing to resume. Check --trainer.default_root_dir, or start a new run "
                    f"without --ckpt_path."
                )
            config.ckpt_path = str(found)
        if config.ckpt_path in ("last", "best"):
            return  # Lightning resolves these for the checkpoints of this process
        path = Path(config.ckpt_path)
        if not path.is_file():
            raise ConfigError(f"--ckpt_path {path}: no such checkpoint file.")
        checkpoint = read_checkpoint(path)
        if sub == "fit":
            check_epochs_left(path, checkpoint, config.trainer.get("max_epochs"))
            self._resume_version = version_of(path, root)
            log.info(f"Resuming from {path}.")
        hparams = hparams_of(checkpoint)
        del checkpoint  # the weights are read again, by Lightning, when it restores them
        model, defaults = config.model, self._parser(sub).get_defaults().model
        apply = {}
        for key, value in hparams.items():
            if key not in defaults:  # e.g. mean/std of checkpoints older than `preprocessing`
                continue
            given = key in model and model[key] != defaults.get(key) and model[key] != value
            if given and key in ARCHITECTURE:
                log.warning(
                    f"--model.{key}={model[key]!r} ignored: the checkpoint was trained with "
                    f"{value!r}, and its weights only fit that."
                )
            elif given and key != "weights":
                log.info(
                    f"--model.{key}: using your {model[key]!r}, not the checkpoint's {value!r}."
                )
                continue
            apply[key] = value
        self.config = self.parser.parse_object({sub: {"model": apply}}, self.config)
        size = hparams.get("image_size")
        if size and self.config[sub].data.get("image_size") != size:
            log.info(f"Image size {size} from the checkpoint.")
            self.config[sub].data.image_size = size

    # --- the trainer ---------------------------------------------------------------------------

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        """Fit logs to a fresh version folder (or the resumed one); the others log nowhere."""
        trainer_config = self.config_init[self.subcommand].trainer
        root = trainer_config.default_root_dir or "runs"
        check_accelerator(trainer_config.get("accelerator"))
        self._created = [] if Path(root).exists() else [Path(root)]  # removed if left empty
        check_writable(Path(root))
        try:
            return self._instantiate_trainer_in(root, trainer_config, **kwargs)
        except BaseException:
            self._remove_created()
            raise

    def _remove_created(self) -> None:
        """After a failure: the folders this command made, when they hold nothing of value."""
        for folder in self._created:
            remove_if_unused(folder)

    def _instantiate_trainer_in(self, root: str, trainer_config: Any, **kwargs: Any) -> Any:
        # Checkpoints are written atomically and only ever read with weights_only=True.
        plugins = trainer_config.get("plugins") or []
        plugins = plugins if isinstance(plugins, list) else [plugins]
        kwargs["plugins"] = [*plugins, AtomicCheckpointIO()]
        if trainer_config.get("precision") is None:
            kwargs["precision"] = self._fastest_precision(trainer_config.get("accelerator"))
        if self.subcommand == "fit":
            kwargs["logger"] = self._run_loggers(root, trainer_config.logger)
            self._extra_callbacks = [LearningCurves()]  # learning_curves.png in the run folder
        else:
            # metrics.json, confusion_matrix.png and mistakes.png under default_root_dir
            self._extra_callbacks = [EvaluationReport(dirpath=str(root))]
            kwargs["logger"] = False
            kwargs["enable_checkpointing"] = False
            self.save_config_callback = None  # validate/test/predict write no config.yaml
        try:
            return super().instantiate_trainer(**kwargs)
        except (MisconfigurationException, ValueError) as exc:
            # The Trainer's constructor only checks its settings: what it rejects is a flag.
            raise ConfigError(
                f"Lightning's Trainer rejects the --trainer settings: {one_line(exc)} "
                f"Correct the --trainer flag (or the trainer: section of the config) it names."
            ) from None

    def _run_loggers(self, root: str, logger: Any) -> Any:
        """The run folder's logger first, then the user's trackers (TensorBoard, MLflow, W&B).

        Lightning puts checkpoints, ``config.yaml`` and ``learning_curves.png`` in the first
        logger's folder, so keeping tlfinetune's own first keeps ``version_N/`` (and
        ``--ckpt_path last``) whichever trackers log beside it. ``--trainer.logger false``:
        no logger and no run folder, as in Lightning.
        """
        if logger is False:
            return False
        run_logger = RunLogger(root, name="", version=self._resume_version)
        folder = Path(root) / f"version_{run_logger.version}"
        if folder.exists() and not folder.is_dir():
            raise ConfigError(
                f"{folder} is a file, but this run keeps its checkpoints and logs in a folder of "
                f"that name. Move or rename the file, or choose another --trainer.default_root_dir."
            )
        if logger in (None, True):
            return run_logger
        return [run_logger, *(logger if isinstance(logger, (list, tuple)) else [logger])]

    @staticmethod
    def _fastest_precision(accelerator: Any) -> str | None:
        """``--trainer.precision`` left unset: the fastest that keeps accuracy here, said once."""
        device = device_type_of(accelerator or "auto")
        chosen = fastest_precision(device)
        if chosen is not None:
            has = "has" if chosen == "bf16-mixed" else "has no"  # bf16 is chosen only if native
            what = "GPU" if device == "cuda" else device.upper()
            log.info(
                f"Precision {chosen}: the fastest that keeps accuracy on this {what}, "
                f"which {has} native bf16 (--trainer.precision sets another)."
            )
        return chosen

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Any]) -> Any:
        if self.subcommand != "fit":  # nothing to checkpoint outside fit
            callbacks = [c for c in callbacks if not isinstance(c, ModelCheckpoint)]
        callbacks = without_idle_early_stopping(callbacks, self.subcommand)
        if self.subcommand in ("fit", "validate", "test"):
            callbacks = [*callbacks, *self._extra_callbacks]
        if self.subcommand == "predict":
            callbacks = [*callbacks, StopPredictingOnSigterm()]
        return super()._instantiate_trainer(config, callbacks)

    def before_fit(self) -> None:
        """Check the settings Lightning would only reject mid-run, before anything trains."""
        check_optimizer(self.model)
        check_monitors(self.trainer.callbacks, self.model.hparams.get("num_classes"))

    def _run_subcommand(self, subcommand: str) -> None:
        ckpt_path = self.config[subcommand].get("ckpt_path")
        if ckpt_path:  # the log then names the checkpoint as the weights' source
            self.model.restored_from = str(ckpt_path)
        run_logger = next((lg for lg in self.trainer.loggers if isinstance(lg, RunLogger)), None)
        if run_logger is not None and not Path(run_logger.log_dir).exists():
            self._created.insert(0, Path(run_logger.log_dir))
        try:
            super()._run_subcommand(subcommand)
        except SIGTERMException:
            raise StoppedBySigterm(subcommand, self.trainer) from None
        except BaseException:
            if self.trainer.is_global_zero:
                self._remove_created()
            raise

    def after_fit(self) -> None:
        """The final summary: best validation accuracy and where the checkpoints are."""
        ckpt = self.trainer.checkpoint_callback
        if ckpt is None:  # the same on every rank
            return
        # log_dir is a broadcast under DDP: every rank reads it, or rank 0 waits forever.
        run_folder = self.trainer.log_dir
        if not self.trainer.is_global_zero:
            return
        score = ckpt.best_model_score
        best = f"{score.item():.4f}" if score is not None else "n/a"
        stopper = next(
            (c for c in self.trainer.callbacks if isinstance(c, ScheduleEarlyStopping)), None
        )
        if stopper is not None and stopper.stopped:
            print(
                f"\nStopped early after epoch {stopper.stopped_epoch}: "
                f"{stopper.stopped_reason()} Use the best checkpoint below, not last.ckpt."
            )
        print(
            f"\nBest {ckpt.monitor}: {best}\n  best checkpoint: {ckpt.best_model_path or '-'}\n"
            f"  last checkpoint: {ckpt.last_model_path or '-'}\n"
            f"  run folder: {run_folder}"
        )


def without_idle_early_stopping(callbacks: list[Any], subcommand: str | None) -> list[Any]:
    """Leave out early stopping when it is off (no patience) or nothing trains.

    So a fit without ``--early_stopping.patience`` runs and checkpoints exactly as before.
    """
    return [
        c
        for c in callbacks
        if not isinstance(c, ScheduleEarlyStopping) or (c.enabled and subcommand == "fit")
    ]


class StopPredictingOnSigterm(pl.Callback):
    """Stop predict on SIGTERM as Lightning's fit, validate and test loops do.

    Lightning's predict loop notes the signal but runs on to the end. Raising its
    ``SIGTERMException`` goes through the callbacks' ``on_exception``, where the
    PredictionWriter drops its partial file, so an earlier CSV stays as it was.
    """

    def on_predict_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:  # noqa: D102
        if trainer.received_sigterm:
            raise SIGTERMException


class StoppedBySigterm(Exception):  # noqa: N818 - a stop, not a fault
    """The command stopped on SIGTERM; the message says what was kept and how to go on."""

    EXIT_CODE = 128 + 15  # the shell's code for a process ended by SIGTERM

    def __init__(self, subcommand: str, trainer: Any) -> None:
        self.global_zero = bool(getattr(trainer, "is_global_zero", True))  # says it, once
        if subcommand == "fit":
            ckpt = getattr(trainer, "checkpoint_callback", None)
            last = getattr(ckpt, "last_model_path", "") or ""
            done = trainer.current_epoch
            text = f"fit stopped on SIGTERM after {done} complete epoch{'s' * (done != 1)}. "
            if last:
                # RunCheckpoint keeps the epoch in progress when it can (one process)
                now = getattr(ckpt, "_last_global_step_saved", None) == trainer.global_step
                held = "every step trained so far" if now else "the last save before the stop"
                text += (
                    f"The last checkpoint is {last} ({held}): resume with the same command "
                    f"plus --ckpt_path last."
                )
            else:
                text += "No checkpoint was saved yet: run the command again to start over."
        else:
            text = (
                f"{subcommand} stopped on SIGTERM before it finished; it wrote no results "
                f"(earlier ones are unchanged). Run the command again."
            )
        super().__init__(text)


def one_line(exc: BaseException) -> str:
    """An exception's message as one sentence-ended line (Lightning's span several)."""
    text = " ".join(str(exc).split())
    return text if text.endswith((".", "!", "?")) else text + "."


def check_accelerator(accelerator: Any) -> None:
    """An accelerator this machine does not have (``gpu`` without CUDA, ``tpu``): say so by name.

    Lightning says "No supported gpu backend found!" with a traceback, or fails importing
    torch_xla for ``tpu``.
    """
    if not isinstance(accelerator, str):
        return
    from lightning.pytorch.accelerators import AcceleratorRegistry

    name = accelerator.lower()
    kinds = ["cuda", "mps"] if name == "gpu" else [name]
    known = [k for k in kinds if k in AcceleratorRegistry.available_accelerators()]
    if not known or name == "cpu":
        return  # auto, cpu, or a name Lightning reports itself, with its list of names
    if not any(AcceleratorRegistry[k]["accelerator"].is_available() for k in known):
        raise ConfigError(
            f"--trainer.accelerator {accelerator}: this machine has no {name.upper()} that "
            f"PyTorch can use. Use --trainer.accelerator cpu, or auto to take a GPU when there "
            f"is one."
        )


def check_optimizer(model: Any) -> None:
    """Build the optimizer once over a stand-in parameter: a bad rate fails before training."""
    factory = getattr(model, "optimizer", None)
    if not callable(factory):
        return
    try:
        factory([torch.nn.Parameter(torch.zeros(1))])
    except ValueError as exc:
        raise ConfigError(
            f"--model.optimizer: the optimizer rejects its settings ({one_line(exc)[:-1]}). "
            f"Correct --model.optimizer.init_args (e.g. --model.optimizer.lr 0.001: a positive "
            f"learning rate)."
        ) from None


def check_monitors(callbacks: list[Any], num_classes: int | None) -> None:
    """A checkpoint or early-stopping monitor under train/ or val/ must be a logged metric.

    Lightning finds out only when it first saves or stops, after a whole epoch; the module's
    own metrics are known now. Monitors outside those prefixes (logged by other callbacks)
    are left to Lightning.
    """
    known = {"epoch", "step"}
    for stage in ("train", "val"):
        known |= {f"{stage}/loss", *_metrics(max(num_classes or 6, 2), f"{stage}/").keys()}
    for cb in callbacks:
        if isinstance(cb, ModelCheckpoint):
            flag = "--checkpoint.monitor"
        elif isinstance(cb, EarlyStopping):
            flag = "--early_stopping.monitor"
        else:
            continue
        monitor = cb.monitor
        if monitor and monitor.startswith(("train/", "val/")) and monitor not in known:
            close = difflib.get_close_matches(monitor, sorted(known), n=1)
            hint = f"Did you mean {close[0]}? " if close else ""
            raise ConfigError(
                f"{flag} {monitor}: the model logs no such metric, so it could not be "
                f"monitored. {hint}Logged: {', '.join(sorted(known - {'epoch', 'step'}))}."
            )


def valid_keys(parser: Any) -> list[str]:
    """Every key ``parser`` accepts (``model.head_hidden``...), for "did you mean" hints."""
    try:
        return sorted(parser.get_defaults().keys())
    except Exception:  # noqa: BLE001 - the explanation is a courtesy; never hide the error
        return []


def explain_unknown(message: str, parser: LightningArgumentParser) -> str:
    """Add the closest valid keys and the valid keys of that group to 'unrecognized' errors."""
    unknown = re.findall(r"--([\w.]+)", message) if "nrecognized" in message else []
    valid = valid_keys(parser) if unknown else []
    if not valid:
        return message
    hints = []
    for key in unknown:
        close = difflib.get_close_matches(key, valid, n=3, cutoff=0.6)
        group = key.split(".")[0] + "."
        same = list(dict.fromkeys(k.split(".")[1] for k in valid if k.startswith(group)))
        hint = f"did you mean {', '.join('--' + c for c in close)}? " if close else ""
        if same:
            hint += f"valid keys of --{group[:-1]}: {', '.join(same)}"
        if hint:
            hints.append(f"--{key}: {hint}")
    if not hints:
        return message
    return message + "\n" + "\n".join(hints)


def check_writable(root: Path, need_mb: int = 200) -> None:
    """Fail before training when the output folder cannot be written or the disk is full."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".write-test-{os.getpid()}"
        probe.write_bytes(b"x" * 1024)
        probe.unlink()
    except OSError as exc:
        raise ConfigError(
            f"--trainer.default_root_dir {root} cannot be written ({exc.strerror or exc}). "
            f"Choose a folder you can write to."
        ) from None
    free_mb = shutil.disk_usage(root).free / 2**20
    if free_mb < need_mb:
        raise ConfigError(
            f"Only {free_mb:.0f} MB are free on the disk of {root}; checkpoints need about "
            f"{need_mb} MB or more. Free some space or choose another --trainer.default_root_dir."
        )


def read_checkpoint(path: Path) -> dict[str, Any]:
    """A Lightning checkpoint's contents (safe unpickler only), or a ConfigError saying why not."""
    what = "pass a .ckpt written by fit (version_N/checkpoints/ under --trainer.default_root_dir)"
    if not zipfile.is_zipfile(path):  # torch.save has written zip archives since torch 1.6
        raise ConfigError(
            f"--ckpt_path {path} is not a Lightning checkpoint (it is not a file written by "
            f"torch.save); {what}."
        )
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure here means the file cannot be used
        refused = "Weights only load failed" in str(exc)
        why = (
            "it holds pickled code, which is refused unread"
            if refused
            else f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        )
        raise ConfigError(
            f"--ckpt_path {path} cannot be read as a checkpoint ({why}); {what}."
        ) from None
    if not isinstance(ckpt, dict) or not {"state_dict", "pytorch-lightning_version"} <= set(ckpt):
        keys = (
            ", ".join(map(str, list(ckpt)[:5])) if isinstance(ckpt, dict) else type(ckpt).__name__
        )
        raise ConfigError(
            f"--ckpt_path {path} is not a Lightning checkpoint (it has no state_dict and "
            f"pytorch-lightning_version entries; it holds: {keys or 'nothing'}); {what}."
        )
    return ckpt


def hparams_of(ckpt: dict[str, Any]) -> dict[str, Any]:
    """The model hyperparameters stored in a checkpoint."""
    hparams = ckpt.get("hyper_parameters") or {}
    return {k: v for k, v in hparams.items() if not k.startswith("_")}


# What a run folder holds before anything is trained; a folder of only these is removed when
# the command that made it fails.
UNUSED = re.compile(r"config(\.\d+)?\.yaml|hparams\.yaml|\.write-test-\d+")


def remove_if_unused(folder: Path) -> None:
    """Remove ``folder`` (made by this failed command) when it holds nothing of value.

    Anything else in it (a checkpoint, metrics, a file the user put there) keeps it all.
    """
    if not folder.is_dir():
        return
    for path in folder.rglob("*"):
        if path.is_dir():
            continue
        if path.name == "metrics.csv" and len(path.read_bytes().splitlines()) <= 1:
            continue  # a header, no epoch
        if not UNUSED.fullmatch(path.name):
            return
    shutil.rmtree(folder, ignore_errors=True)


def warn_untrained(subcommand: str, root: Path) -> None:
    """validate/test/predict without a checkpoint use an untrained head: say so, loudly.

    A warning rather than a refusal: a pipeline's smoke test may want exactly that, and
    ``--model.weights`` may bring a trained backbone. But results look real and are not.
    """
    found = find_last_checkpoint(root) if root.is_dir() else None
    example = (
        f"--ckpt_path {found}" if found else "--ckpt_path runs/version_N/checkpoints/best-...ckpt"
    )
    log.warning(
        f"No --ckpt_path: {subcommand} uses a model whose head was never trained, so its "
        f"{'predictions' if subcommand == 'predict' else 'scores'} are chance level and mean "
        f"nothing. Pass the checkpoint a fit wrote, e.g. {example}."
    )


def check_epochs_left(path: Path, ckpt: dict[str, Any], max_epochs: int | None) -> None:
    """A resume with ``--trainer.max_epochs`` below the epochs the run has trained: say so.

    Lightning would train nothing, or (further below) stop with a traceback once it has
    restored the run.
    """
    try:
        done = ckpt["loops"]["fit_loop"]["epoch_progress"]["current"]["processed"]
    except (KeyError, TypeError):
        epoch = ckpt.get("epoch")
        done = epoch + 1 if isinstance(epoch, int) else None
    if isinstance(done, int) and max_epochs not in (None, -1) and done > max_epochs:
        raise ConfigError(
            f"--ckpt_path {path}: that run has already trained {done} epochs, more than "
            f"--trainer.max_epochs {max_epochs}. max_epochs counts from the run's start, not from "
            f"the resume: raise --trainer.max_epochs above {done} to train further."
        )


EXTRA_COMMANDS = ("export", "compare", "lr_find", "backbones")
DESCRIPTION = """\
Adapt a pretrained torchvision image classifier (VGG16 and others) to your images by
transfer learning. Each command has its own --help: python -m tlfinetune fit --help."""
# One line per command, Lightning's four first (argparse would list only those).
COMMANDS = """\
fit        train on your images (runs/version_N/ holds checkpoints, config, metrics)
validate   score a checkpoint on the validation images
test       score a checkpoint on the test images (metrics.json, confusion matrix)
predict    classify images with a checkpoint into predictions.csv
export     write a checkpoint as ONNX or a torch.export program for deployment
compare    train the freeze regimes side by side and report which is best
lr_find    sweep learning rates and suggest --model.optimizer.lr
backbones  list the backbones and their pretrained weights"""
COMMAND_NAMES = [line.split()[0] for line in COMMANDS.splitlines()]


class TopLevelHelp(argparse.RawDescriptionHelpFormatter):
    """Keep the command list's lines as written, and the subcommand choices out of the list."""

    def _format_action(self, action: argparse.Action) -> str:
        if isinstance(action, argparse._SubParsersAction):
            return ""  # the epilog lists every command, extra ones included
        return super()._format_action(action)


def short_errors(parser: Any, argv: list[str] | None = None) -> None:
    """Make ``parser`` print its error as one paragraph and a pointer to ``--help``.

    jsonargparse prints the whole usage first (over 100 lines for fit), which buries the error.
    Unknown keys get the close ones, unknown commands every command, a config file's problems
    its name.
    """
    plain_error = parser.error

    def error(message: str, ex: Exception | None = None) -> Any:
        message = explain_unknown(message, parser)
        if not parser.exit_on_error or os.environ.get("JSONARGPARSE_DEBUG"):
            return plain_error(message, ex)  # raises, for a caller that handles it
        where = getattr(ex, "subcommand_parser", None) or parser
        prog = where.prog.replace(" [options]", "")
        message = tidy_parser_error(explain_command(message), where, config_files(argv or []))
        sys.stderr.write(f"error: {message}\nRun `{prog} --help` for the options.\n")
        raise SystemExit(2)

    parser.error = error


def config_files(argv: list[str]) -> list[str]:
    """The files given with ``-c``/``--config`` on a command line."""
    files = []
    for i, arg in enumerate(argv):
        if arg in ("-c", "--config") and i + 1 < len(argv):
            files.append(argv[i + 1])
        elif arg.startswith("--config="):
            files.append(arg.split("=", 1)[1])
    return files


def tidy_parser_error(message: str, parser: Any, configs: list[str]) -> str:
    """The parser's multi-line errors as one paragraph naming the flag, value and file."""
    source = " or ".join(configs) if configs else "the config file"
    # A key a config file does not know: name the file and the close keys, as for a flag.
    unknown = re.search(r"does not accept option '([\w.]+)'", message)
    if unknown:
        key = unknown.group(1)
        close = difflib.get_close_matches(key, valid_keys(parser), n=3, cutoff=0.6)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        where = f" (in {source})" if configs else ""
        return f"unknown key {key}{where}.{hint}"
    if "nrecognized" in message:
        return message  # explain_unknown's hint line follows the error line
    message = message.replace('in "<unicode string>"', f"in {source}")
    message = re.sub(r"Expected a <class '([\w.]+)'>", r"expected \1", message)
    message = re.sub(r"Expected a typing\.Literal\[(.*?)\]\.?", r"expected one of \1.", message)
    key = re.match(r'Parser key "([\w.]+)":\s*', message)
    if key and "Does not validate against any of the Union subtypes" in message:
        given = re.search(r"Given value: (.*)", message)
        accepted = [
            v.strip().strip("'")
            for group in re.findall(r"Literal\[([^\]]*)\]", message)
            for v in group.split(",")
        ]
        if given and accepted:
            values = ", ".join(dict.fromkeys(accepted))
            return f"--{key.group(1)} {given.group(1)}: not an accepted value; use one of {values}."
    if key:
        message = f"--{key.group(1)}: " + message[key.end() :]
    return " ".join(message.split())


def explain_command(message: str) -> str:
    """An unknown command: every command, not only Lightning's four, and the closest."""
    if re.search(r'"subcommand" to be one of .* not provided', message):
        return f"no command given: use one of {', '.join(COMMAND_NAMES)}."
    match = re.search(r"argument COMMAND: invalid choice: '([^']*)'", message)
    if not match:
        return message
    close = difflib.get_close_matches(match.group(1), COMMAND_NAMES, n=1)
    hint = f" Did you mean {close[0]}?" if close else ""
    return f"{match.group(1)!r} is not a command: use one of {', '.join(COMMAND_NAMES)}.{hint}"


def prog_name() -> str:
    """How the user started this: ``python -m tlfinetune`` or the ``tlfinetune`` script."""
    argv0 = Path(sys.argv[0] if sys.argv else "")
    as_module = argv0.name == "__main__.py" and argv0.parent.name == "tlfinetune"
    return "python -m tlfinetune" if as_module else "tlfinetune"


# Lightning warnings that do not apply to how this CLI uses it.
NOISE = (
    ".*callbacks used to create the checkpoint need to be provided.*",
    ".*isinstance\\(treespec, LeafSpec\\).*",
    # Training metrics are logged once per epoch (on_epoch), however few the batches.
    ".*is smaller than the logging interval.*",
    # The summary's size estimate in bf16; the parameter counts it prints are exact.
    ".*is not supported by the model summary.*",
)
# Lightning's log lines that advertise rather than inform.
ADVERTS = ("litlogger",)


def _no_adverts(record: logging.LogRecord) -> bool:
    return not any(word in record.getMessage() for word in ADVERTS)


def main(args: ArgsType = None) -> None:
    """Entry point of ``python -m tlfinetune`` and the ``tlfinetune`` script."""
    argv = list(sys.argv[1:] if args is None else args)
    if args is None:  # the process is this command's own (not a test's or a notebook's)
        keep_freed_memory()
    for noise in NOISE:
        warnings.filterwarnings("ignore", message=noise)
    rank_zero_log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if _no_adverts not in rank_zero_log.filters:
        rank_zero_log.addFilter(_no_adverts)
    try:
        if argv and argv[0] == "bench":
            raise ConfigError(
                "The throughput benchmark is no longer a tlfinetune command: it lives beside the "
                "package, in a checkout of the repository. Run `python benchmarks/bench.py "
                f"{' '.join(argv[1:]) or '--help'}` from the repository's root."
            )
        if argv and argv[0] in EXTRA_COMMANDS:
            import importlib

            importlib.import_module(f"tlfinetune.{argv[0]}").main(argv[1:])
        else:
            TLFinetuneCLI(args=None if args is None else argv)  # None: Lightning reads sys.argv
    except TLFinetuneError as exc:
        sys.stderr.write(f"error: {plain_message(exc)}\n")
        raise SystemExit(2) from None
    except StoppedBySigterm as exc:
        if exc.global_zero:
            sys.stderr.write(f"{exc}\n")
        raise SystemExit(StoppedBySigterm.EXIT_CODE) from None
    except MisconfigurationException as exc:
        # Lightning's word for a setting it cannot use; the targeted checks above name the flag
        # where they can, this is the last resort for the rest.
        sys.stderr.write(f"error: Lightning rejects a setting: {one_line(exc)}\n")
        raise SystemExit(2) from None
    finally:
        close_process_group()
        if args is None:
            # The process ends here (`python -m tlfinetune`, the `tlfinetune` script). At exit
            # Python walks every object torch, Lightning and the run left for garbage cycles:
            # 1.3-2.1 s on a 2-core CPU, 0.4-0.7 s with them frozen (the seed's whole job takes
            # about 20 s). atexit handlers, thread joins and the closing of files run as before.
            # Not done for a caller that passes `args` (tests, notebooks): its process goes on.
            gc.freeze()


def close_process_group() -> None:
    """Shut down the DDP process group before the interpreter exits.

    Lightning destroys it at exit only for NCCL. A gloo group left to the interpreter's teardown
    can abort the process at exit ("terminate called without an active exception", exit 134)
    after a run that succeeded: seen about once in 15 two-process CPU fits here.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def plain_message(exc: BaseException) -> str:
    """The user-facing paragraph, also when a DataLoader worker wrapped it in its traceback."""
    text = str(exc)
    if "Original Traceback" in text:
        last = text.strip().splitlines()[-1]
        text = re.sub(r"^[\w.]+Error: ", "", last)
    return text
