"""FreezeSchedule: which backbone layers train at which epoch.

The Keras recipe freezes layers with ``layer.trainable = False``. Here the same thing is
``requires_grad = False`` on the backbone's parameters, decided per epoch by this callback:

- ``regime="frozen"``: the whole backbone is frozen and only the head trains (seed snippet 1,
  "transfer learning / feature extraction").
- ``regime="partial"``: layers before ``unfreeze_from`` are frozen, the rest trains with the head
  (seed snippet 2: ``base_model.layers[:15]`` frozen is ``unfreeze_from=15`` = ``block5_conv1`` =
  ``block5`` = torchvision ``features[24:]`` trainable).
- ``regime="full"``: everything trains.
- ``milestones={epoch: unfreeze_from}`` unfreeze more of the backbone at the start of those epochs
  (gradual unfreezing as in fastai's ``fine_tune`` and ULMFiT). Layers never freeze again.

``unfreeze_from`` accepts a Keras layer index, a Keras layer name or a block name; the table that
maps them to torchvision's module indices is in :mod:`tlfinetune.backbone`. Other families
(ResNet, EfficientNet, ConvNeXt, ViT...) take their own stage names, unit names or torchvision
module paths (:mod:`tlfinetune.families`); ``partial`` there trains the last stage.

Why this is a plain callback and not Lightning's ``BaseFinetuning`` / ``BackboneFinetuning``:

- The trainable set is a pure function of the epoch, so a resumed run recomputes it from the
  restored epoch. ``BaseFinetuning`` re-runs ``freeze_before_training`` on resume and restores
  the param groups but not ``requires_grad``, so an unfrozen backbone silently stops training
  (Lightning #21901).
- The optimizer gets every parameter that will *ever* train up front, in two fixed groups (head,
  backbone at ``lr * backbone_lr_ratio``). Parameters that are still frozen get no gradient, so
  torch optimizers skip them; no param group is ever added mid-training, so LR schedulers,
  optimizer checkpoints and resume keep working across an unfreeze (Lightning #8720, Flash #1321).
- Under DDP the model is wrapped again whenever the trainable set changes (at the start of the
  fit and at each milestone), so DDP's reducer always holds exactly the parameters that train:
  a layer unfrozen later is all-reduced (Lightning #20340), and ``find_unused_parameters`` is
  not needed (measured in ``benchmarks/ddp_find_unused.py``).
- Frozen BatchNorm stays in eval mode (Keras semantics of ``trainable=False``): its running
  statistics never move. :class:`~tlfinetune.module.TransferClassifier` re-asserts this on every
  ``train()`` call, so Lightning's mode switching after validation cannot undo it.
"""

from __future__ import annotations

import gc
import logging
import weakref
from typing import Any, Literal, get_args

import lightning.pytorch as pl
from lightning.pytorch.strategies import DDPStrategy
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from tlfinetune.backbone import block_of, resolve_unfreeze_from
from tlfinetune.errors import ConfigError

log = logging.getLogger(__name__)

Regime = Literal["frozen", "partial", "full"]
REGIMES: tuple[str, ...] = get_args(Regime)  # the one list of regimes (compare, CLI, messages)


def regime_start(
    regime: str, backbone: str, unfreeze_from: int | str | None, num_modules: int
) -> int:
    """First backbone module index that trains in ``regime`` (``num_modules``: none does).

    ``unfreeze_from`` is resolved whatever the regime, so a typo in it fails in every regime.
    """
    partial = resolve_unfreeze_from(backbone, unfreeze_from)
    starts = {"frozen": num_modules, "partial": partial, "full": 0}
    if regime not in starts:
        raise ConfigError(f"regime={regime!r} is not one of: {', '.join(REGIMES)}.")
    return starts[regime]


class FreezeSchedule(pl.Callback):
    """Freeze the backbone, or part of it, and unfreeze more of it at milestone epochs.

    Args:
        regime: ``frozen`` (only the head trains), ``partial`` (the backbone trains from
            ``unfreeze_from`` on) or ``full`` (everything trains).
        unfreeze_from: where the trainable part starts in the ``partial`` regime. For VGG a
            Keras layer index (``15`` as in the seed's ``layers[15:]``), a Keras layer name
            (``block5_conv1``, ``block4_pool``) or a block name (``block5``); for the other
            families a stage name (ResNet ``layer4``, EfficientNet ``stage7``, ViT
            ``encoder_layer_11`` or ``11``), a unit name (``layer4_1``) or a torchvision module
            path (``layer4.1``). Left out: the backbone's last stage (VGG ``block5``, ResNet
            ``layer4``; :mod:`tlfinetune.families` lists them).
        milestones: ``{epoch: unfreeze_from}``; at the start of each epoch listed, the backbone
            trains from that layer on. Each milestone must unfreeze more than the one before.
        backbone_lr_ratio: learning rate of every backbone layer that trains, relative to the
            head's. ``1.0`` is the seed's single learning rate; the default ``0.1`` keeps the
            pretrained filters from being wrecked by the first large updates of a random head.
            Measured in ``benchmarks/lr_ratio.md``: with Adam at 1e-3, ``1.0`` drove the
            ``full`` regime to chance, ``0.1`` was best there and close to the best (``0.3``)
            in the ``partial`` regime.

    Example:
        >>> schedule = FreezeSchedule(regime="frozen", milestones={3: "block5", 6: "block4"})
        >>> trainer = pl.Trainer(callbacks=[schedule])  # doctest: +SKIP
    """

    def __init__(
        self,
        regime: Regime = "frozen",
        unfreeze_from: int | str | None = None,
        milestones: dict[int, int | str] | None = None,
        backbone_lr_ratio: float = 0.1,
    ) -> None:
        if regime not in REGIMES:
            raise ConfigError(f"regime={regime!r} is not one of: {', '.join(REGIMES)}.")
        if not backbone_lr_ratio > 0:
            raise ConfigError(f"backbone_lr_ratio={backbone_lr_ratio} must be positive.")
        bad = [e for e in (milestones or {}) if not isinstance(e, int) or e < 0]
        if bad:
            raise ConfigError(f"milestones epochs {bad} must be non-negative integers.")
        self.regime = regime
        self.unfreeze_from = unfreeze_from
        self.milestones = dict(sorted((milestones or {}).items()))
        self.backbone_lr_ratio = backbone_lr_ratio
        # The resolved schedule, [(first epoch, first trainable module index), ...]; set at setup.
        self.steps: list[tuple[int, int]] = []
        self._applied: int | None = None  # trainable_from currently in force
        self._restored_epoch: int | None = None
        self._wrapped_for: int | None = None  # trainable_from the DDP wrapper was built for

    @staticmethod
    def find(trainer: pl.Trainer | None) -> FreezeSchedule | None:
        """The Trainer's FreezeSchedule, or None: the one way other parts reach the schedule."""
        callbacks = trainer.callbacks if trainer is not None else []
        return next((c for c in callbacks if isinstance(c, FreezeSchedule)), None)

    # --- the schedule as a function of the epoch -----------------------------------------------

    def resolve(self, backbone: str, num_modules: int) -> list[tuple[int, int]]:
        """The schedule as ``[(epoch, trainable_from), ...]`` in torchvision module indices."""
        steps = [(0, regime_start(self.regime, backbone, self.unfreeze_from, num_modules))]
        for epoch, spec in self.milestones.items():
            try:
                index = resolve_unfreeze_from(backbone, spec)
            except ConfigError as err:  # it says unfreeze_from; the value came from a milestone
                said = str(err).replace(f"unfreeze_from={spec!r}", repr(spec))
                raise ConfigError(f"--freeze.milestones, milestone {epoch}: {said}") from None
            prev_epoch, prev = steps[-1]
            if index >= prev:
                raise ConfigError(
                    f"milestone {epoch}: {spec!r} unfreezes nothing new: from epoch {prev_epoch} "
                    f"the backbone already trains from module {prev}. Milestones must unfreeze "
                    f"earlier layers as the epochs grow, e.g. {{3: block5, 6: block4}}."
                )
            steps.append((epoch, index))
        return steps

    def trainable_from(self, epoch: int) -> int:
        """First backbone module index that trains at ``epoch`` (``len(backbone)``: none)."""
        return [index for first, index in self.steps if first <= epoch][-1]

    # --- Lightning hooks -----------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Make every parameter that will ever train trainable, so optimizer and DDP see it."""
        self.steps = self.resolve(pl_module.hparams.backbone, len(pl_module.backbone))
        if stage != "fit":
            return
        # Before the optimizer and the DDP wrapper exist: they must know every parameter that
        # will ever train. on_fit_start then freezes what is frozen at the starting epoch.
        set_trainable_from(pl_module, self.steps[-1][1])
        self._wrapped_for = self.steps[-1][1]

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Freeze for the starting epoch (restored from the checkpoint when resuming)."""
        epoch = self._restored_epoch if self._restored_epoch is not None else trainer.current_epoch
        self._apply(trainer, pl_module, epoch, announce=False)
        log.info(describe(pl_module, self._applied))

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Unfreeze at milestones; idempotent otherwise."""
        self._apply(trainer, pl_module, trainer.current_epoch, announce=True)

    def _apply(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, epoch: int, announce: bool
    ) -> None:
        index = self.trainable_from(epoch)
        if index == self._applied:
            return
        set_trainable_from(pl_module, index)
        self._applied = index
        if index != self._wrapped_for and rewrap_ddp(trainer):
            self._wrapped_for = index
        if announce:
            name = pl_module.hparams.backbone
            log.info(
                f"Epoch {epoch}: unfreezing {name} from module {index} ({block_of(name, index)})"
                f" at lr x {self.backbone_lr_ratio}. {describe(pl_module, index)}"
            )

    def state_dict(self) -> dict[str, Any]:
        """The schedule and where it stands, so a resumed run can check and restore it."""
        return {"trainable_from": self._applied, "steps": self.steps, "epoch": self._epoch()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Remember the epoch the checkpoint was taken at; on_fit_start freezes for it."""
        self._restored_epoch = state_dict.get("epoch")

    def _epoch(self) -> int | None:
        for first, index in reversed(self.steps):
            if index == self._applied:
                return first
        return None


def rewrap_ddp(trainer: pl.Trainer) -> bool:
    """Wrap the module in a new DistributedDataParallel for the parameters that train now.

    DDP registers the parameters that require grad when it wraps the model and all-reduces
    exactly those every step. Re-wrapping at each change of the trainable set keeps that list
    equal to the parameters that get a gradient, so ``find_unused_parameters`` (a traversal of
    the autograd graph each step, and an all-reduce of zeros for every frozen parameter a later
    milestone will unfreeze) is never needed. Wrapping again broadcasts rank 0's weights, which
    every rank already has. Returns False when the model is not wrapped in DDP.
    """
    strategy = trainer.strategy
    if not isinstance(strategy, DDPStrategy) or not isinstance(
        strategy.model, DistributedDataParallel
    ):
        return False
    old = weakref.ref(strategy.model)
    strategy.model = strategy.lightning_module
    strategy.configure_ddp()
    gc.collect()  # the old reducer's gradient hooks go with it; it must not reduce again
    if old() is not None:
        raise RuntimeError("The previous DistributedDataParallel wrapper is still referenced.")
    return True


def set_trainable_from(pl_module: pl.LightningModule, index: int) -> None:
    """``requires_grad`` off for backbone modules before ``index``, on after; head always on."""
    for i, module in enumerate(pl_module.backbone):
        for p in module.parameters():
            p.requires_grad_(i >= index)
    if pl_module.head is not None:  # None until the module's setup builds it: trainable then
        for p in pl_module.head.parameters():
            p.requires_grad_(True)
    pl_module.train(pl_module.training)  # re-applies eval mode to frozen BatchNorm


def count_parameters(module: nn.Module) -> tuple[int, int]:
    """(trainable, frozen) parameter counts."""
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in module.parameters()) - trainable


def block_table(pl_module: pl.LightningModule) -> list[dict[str, Any]]:
    """Per backbone block (and the head): trainable and frozen parameter counts."""
    name = pl_module.hparams.backbone
    rows: dict[str, dict[str, Any]] = {}
    for i, module in enumerate(pl_module.backbone):
        row = rows.setdefault(block_of(name, i), {"trainable": 0, "frozen": 0})
        for p in module.parameters():
            row["trainable" if p.requires_grad else "frozen"] += p.numel()
    head = rows.setdefault("head", {"trainable": 0, "frozen": 0})
    for p in pl_module.head.parameters():
        head["trainable" if p.requires_grad else "frozen"] += p.numel()
    return [{"part": part, **counts} for part, counts in rows.items()]


def describe(pl_module: pl.LightningModule, index: int | None) -> str:
    """One line: what trains and what is frozen, with counts."""
    trainable, frozen = count_parameters(pl_module)
    n = len(pl_module.backbone)
    if index is None or index >= n:
        part = "backbone frozen, head trains"
    elif index == 0:
        part = "whole backbone and head train"
    else:
        name = pl_module.hparams.backbone
        part = f"backbone frozen before module {index} ({block_of(name, index)} on trains)"
    return f"{part}: {trainable:,} trainable / {frozen:,} frozen parameters."
