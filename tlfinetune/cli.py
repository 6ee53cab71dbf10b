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

import difflib
import gc
import logging
import os
import re
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import (
    ArgsType,
    LightningArgumentParser,
    LightningCLI,
    SaveConfigCallback,
)

from tlfinetune.data import ImageDataModule
from tlfinetune.errors import ConfigError, TLFinetuneError
from tlfinetune.freeze import FreezeSchedule
from tlfinetune.machine import device_type_of, fastest_precision, keep_freed_memory
from tlfinetune.module import TransferClassifier
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
        """Lightning's parser, with the valid keys named when a key is unknown."""
        parser = super().init_parser(**kwargs)
        plain_error = parser.error

        def error(message: str, *args: Any, **kw: Any) -> Any:
            return plain_error(explain_unknown(message, parser), *args, **kw)

        parser.error = error  # type: ignore[method-assign]
        return parser

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
        if not sub or not self.config[sub].get("ckpt_path"):
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
        if sub == "fit":
            self._resume_version = version_of(path, root)
            log.info(f"Resuming from {path}.")
        hparams = read_hparams(path)
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
        check_writable(Path(root))
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
        return super().instantiate_trainer(**kwargs)

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
        return super()._instantiate_trainer(config, callbacks)

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


def explain_unknown(message: str, parser: LightningArgumentParser) -> str:
    """Add the closest valid keys and the valid keys of that group to 'unrecognized' errors."""
    unknown = re.findall(r"--([\w.]+)", message) if "nrecognized" in message else []
    if not unknown:
        return message
    try:
        valid = sorted(parser.get_defaults().keys())
    except Exception:  # noqa: BLE001 - the explanation is a courtesy; never hide the error
        return message
    if not valid:
        return message
    hints = []
    for key in unknown:
        close = difflib.get_close_matches(key, valid, n=3, cutoff=0.6)
        group = key.split(".")[0] + "."
        same = list(dict.fromkeys(k.split(".")[1] for k in valid if k.startswith(group)))
        hint = f"--{key}: " + (
            f"did you mean {', '.join('--' + c for c in close)}? " if close else ""
        )
        if same:
            hint += f"valid keys of --{group[:-1]}: {', '.join(same)}"
        hints.append(hint)
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


def read_hparams(path: Path) -> dict[str, Any]:
    """The model hyperparameters stored in a checkpoint (safe unpickler only)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure here means the file cannot be used
        raise ConfigError(
            f"--ckpt_path {path} cannot be read as a checkpoint ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:200]}). Files holding pickled code are refused unread."
        ) from None
    hparams = ckpt.get("hyper_parameters", {}) if isinstance(ckpt, dict) else {}
    return {k: v for k, v in hparams.items() if not k.startswith("_")}


EXTRA_COMMANDS = ("export", "compare", "lr_find", "backbones")
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
