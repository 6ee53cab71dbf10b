"""TransferClassifier: a pretrained backbone plus a new head, with loss, metrics and optimizer.

An image batch flows: uint8 (N, 3, H, W) -> normalise with the weights' mean/std -> backbone
(N, C, H/32, W/32; VGG16: C = 512) -> head -> logits (N, num_classes). Normalisation lives
here, not in the data pipeline, so a checkpoint or an exported model carries it. The whole
preprocessing preset (resize, crop, interpolation, mean/std) is the model's too: the datamodule
reads it from here.
"""

from __future__ import annotations

import inspect
import logging
import os
import random
import warnings
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score, MulticlassRecall

from tlfinetune import backbone as bb
from tlfinetune import fusion
from tlfinetune.balance import ClassWeights, resolve_class_weights
from tlfinetune.cache import CachedBatch, FeatureCache
from tlfinetune.errors import ConfigError, TLFinetuneError
from tlfinetune.freeze import FreezeSchedule
from tlfinetune.head import HeadFactory, HeadName, build_head
from tlfinetune.machine import emulated_bf16_warning
from tlfinetune.transforms import Preprocessing, weights_preprocessing
from tlfinetune.tta import averaged_logits

log = logging.getLogger(__name__)


class TransferClassifier(pl.LightningModule):
    """A torchvision backbone (VGG16 by default) with a replaceable head, trained by Lightning.

    Which backbone layers train is decided by a :class:`~tlfinetune.freeze.FreezeSchedule`
    callback; without one in the Trainer, ``FreezeSchedule()`` (whole backbone frozen) is used.

    Args:
        num_classes: number of classes; read from the datamodule when left out.
        class_names: names of the classes in label order; read from the datamodule when left out.
        backbone: a torchvision classifier: a VGG variant (``vgg11``..``vgg19``, each also
            ``_bn``) or a member of another family (``resnet50``, ``efficientnet_b0``,
            ``convnext_tiny``, ``vit_b_16``...; ``python -m tlfinetune backbones`` lists them).
        weights: ``imagenet`` (torchvision's weights, downloaded or from its cache), ``none``
            (random init), or the path of a torchvision-format ``.pth``/``.safetensors`` state
            dict or of a tlfinetune checkpoint (its backbone is reused, not its head).
        image_size: side of the square input images; sizes the head. Read from the datamodule
            when left out.
        head: ``flatten`` (the seed's Flatten-Dense(256)-Dense(num_classes)), ``gap`` (global
            average pooling + linear), ``torchvision`` (the model's own classifier with a new
            last layer), or a factory ``(in_features, num_classes) -> nn.Module`` given by
            class_path. Left out: ``flatten`` for VGG, ``gap`` for the other families.
        head_hidden: width of the ``flatten`` head's hidden layer.
        head_dropout: dropout before the head's last layer.
        optimizer: optimizer factory; the seed's Adam by default.
        lr_scheduler: optional LR scheduler factory; ``ReduceLROnPlateau`` watches ``val/loss``.
        label_smoothing: cross-entropy label smoothing.
        class_weights: weights of the classes in the cross-entropy, for imbalanced classes:
            ``auto`` (inverse frequency of the training images, ``n_images / (n_classes *
            count)``, as Keras' and scikit-learn's ``balanced``; read from the datamodule) or
            one float per class in label order. Saved in checkpoints (the ``class_weight``
            buffer), so a resumed fit and ``validate`` use the loss the run trained with.
        channels_last: run convolutions in channels-last memory layout (about 1.5x faster on CPU).
        preprocessing: how images are prepared for the weights (resize, crop, interpolation,
            antialiasing, mean/std); default: the preset of the backbone's torchvision weights
            (``Weights.DEFAULT.transforms()``). The model normalises with its mean/std; the
            datamodule resizes and crops with the rest (and takes its crop size as image size
            unless given one). Stored in the checkpoint, so predicting uses what training used.
        feature_cache: compute the frozen backbone layers once and train the rest from cached
            features while that cannot change results (frozen prefix, ``augment: false``).
            The one switch of the cache: a :class:`~tlfinetune.cache.FeatureCache` in the
            Trainer only serves a model that has it on.

    Example:
        >>> model = TransferClassifier(num_classes=3, weights="none", image_size=32)
        >>> model(torch.zeros(2, 3, 32, 32, dtype=torch.uint8)).shape
        torch.Size([2, 3])
    """

    def __init__(
        self,
        num_classes: int | None = None,
        class_names: list[str] | None = None,
        backbone: str = "vgg16",
        weights: str = "imagenet",
        image_size: int | None = None,
        head: HeadName | HeadFactory | None = None,
        head_hidden: int = 256,
        head_dropout: float = 0.0,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
        label_smoothing: float = 0.0,
        class_weights: ClassWeights = None,
        channels_last: bool = True,
        preprocessing: Preprocessing | None = None,
        feature_cache: bool = True,
    ) -> None:
        super().__init__()
        # Callables are not plain data: keeping them out of the checkpoint keeps it loadable
        # with weights_only=True. (From the CLI, hparams are the config, class paths included.)
        factory = not (head is None or isinstance(head, str))
        ignore = ["optimizer", "lr_scheduler"] + (["head"] if factory else [])
        self.save_hyperparameters(ignore=ignore)
        if head is None:  # the family's default, recorded so checkpoints name it
            head = bb.get_spec(backbone).default_head
            self._fill_hparams(head=head)
        if class_names is not None and num_classes is not None and len(class_names) != num_classes:
            raise ConfigError(
                f"class_names has {len(class_names)} names but num_classes={num_classes}."
            )
        if num_classes is not None:  # a wrong list fails here, before any data is read
            resolve_class_weights(class_weights, num_classes, [1] * num_classes)
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self._nonfinite: torch.Tensor | None = None  # (loss, step, batch) of the first bad step
        self.head_spec = head
        if preprocessing is None:  # the backbone's weights own the preset
            self._preset = weights_preprocessing(bb.get_spec(backbone).weights_enum)
        else:
            self._preset = Preprocessing.from_value(preprocessing)
        # Plain values in the hyperparameters: the checkpoint (weights_only) carries the preset.
        self._fill_hparams(preprocessing=self._preset.as_dict())
        mean, std = self._preset.mean, self._preset.std
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

        self.backbone = bb.build_backbone(backbone)
        self._weights = bb.load_weights(self.backbone, backbone, weights)
        self.weights_info = self._weights.origin
        # Set by whoever will restore a checkpoint into this model (the CLI's --ckpt_path), so
        # the log names the checkpoint as the weights' source: Lightning restores after setup.
        self.restored_from: str | None = None
        self.head: nn.Module | None = None
        if num_classes is not None and image_size is not None:
            self._build_head(num_classes, image_size)
        if channels_last:
            self.to(memory_format=torch.channels_last)

    # --- construction --------------------------------------------------------------------------

    def _build_head(self, num_classes: int, image_size: int) -> None:
        self._fill_hparams(num_classes=num_classes, image_size=image_size)
        name = self.hparams.backbone
        self.head = build_head(
            self.head_spec,
            bb.feature_shape(self.backbone, name, image_size),
            num_classes,
            hidden=self.hparams.head_hidden,
            dropout=self.hparams.head_dropout,
            backbone=name,
            pretrained_classifier=self._weights.classifier,
        )
        self._register_class_weights(num_classes)
        self.train_metrics = _metrics(num_classes, "train/")
        self.val_metrics = _metrics(num_classes, "val/")
        self.test_metrics = _metrics(num_classes, "test/")

    def _register_class_weights(self, num_classes: int) -> None:
        """The ``class_weight`` buffer, when class weights are asked for (``auto``: ones for now).

        Only then, so checkpoints of runs without class weights keep their exact contents.
        """
        spec = self.hparams.get("class_weights")
        if spec is None:
            return
        weights = resolve_class_weights(spec, num_classes, [1] * num_classes)
        self.register_buffer("class_weight", torch.tensor(weights, dtype=torch.float32))

    def _fill_auto_class_weights(self, dm: Any, stage: str) -> None:
        """``class_weights: auto``: inverse frequency of the datamodule's training images.

        A checkpoint being restored replaces them afterwards with the weights it trained with.
        """
        if self.hparams.get("class_weights") != "auto":
            return
        counts = getattr(dm, "class_counts", None) if dm is not None else None
        if counts is None and stage != "fit":
            return  # nothing trains: the checkpoint's weights (or none) serve the loss
        weights = resolve_class_weights("auto", self.hparams.num_classes, counts)
        assert weights is not None
        self.class_weight.copy_(torch.tensor(weights))
        names = self.hparams.get("class_names") or [str(i) for i in range(len(weights))]
        shown = ", ".join(f"{n} {w:.3g}" for n, w in list(zip(names, weights, strict=True))[:20])
        log.info(f"Class weights (auto, inverse frequency of the training images): {shown}.")

    def _fill_hparams(self, **values: Any) -> None:
        # Values read from the data belong to the model's hyperparameters: the checkpoint must
        # rebuild the model alone, and loggers compare them with the datamodule's.
        self.hparams.update(values)
        if hasattr(self, "_hparams_initial"):
            self._hparams_initial.update(values)

    @property
    def preprocessing(self) -> Preprocessing:
        """The weights' preset at this model's image size (at the preset's own until known)."""
        size = self.hparams.get("image_size")
        return self._preset.at(size) if size else self._preset

    def setup(self, stage: str) -> None:
        """Take num_classes, class names and image size from the datamodule when not given."""
        # The frozen prefix runs in eval mode on purpose (Keras' trainable=False); Lightning
        # would warn about it at the start of every fit.
        warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of")
        dm = getattr(self.trainer, "datamodule", None)
        if dm is not None:
            self._check_fits_data(dm)
            if self.hparams.get("class_names") is None and getattr(dm, "class_names", None):
                self._fill_hparams(class_names=list(dm.class_names))
        if self.head is None:
            if dm is None:
                raise ConfigError(
                    "TransferClassifier needs num_classes and image_size, or a datamodule to read "
                    "them from: pass both to the constructor, or give the Trainer a datamodule."
                )
            self._build_head(dm.num_classes, dm.image_size)
            if self.hparams.channels_last:
                self.head.to(memory_format=torch.channels_last)
        self._fill_auto_class_weights(dm, stage)
        head = self.head_spec if isinstance(self.head_spec, str) else type(self.head).__name__
        ckpt = getattr(self.trainer, "ckpt_path", None) or self.restored_from
        weights = f"from checkpoint {ckpt}" if ckpt else self.weights_info
        log.info(
            f"TransferClassifier: backbone {self.hparams.backbone}, weights {weights}, "
            f"image size {self.hparams.image_size}, {self.hparams.num_classes} classes, "
            f"head {head}."
        )
        slow = emulated_bf16_warning(self.trainer.precision, self.trainer.strategy.root_device.type)
        if slow:
            log.warning(slow)
        if stage == "fit" and not ckpt and self.weights_info.startswith("none"):
            log.warning(
                "No pretrained weights: the backbone starts from random initialisation, so this "
                "run shows the mechanics of transfer learning, not its benefit."
            )

    def _check_fits_data(self, dm: Any) -> None:
        """The model's classes and image size must be the data's: say which differ, and how."""
        ours, theirs = self.hparams.get("num_classes"), getattr(dm, "num_classes", None)
        if ours is not None and theirs is not None and ours != theirs:
            mine = self.hparams.get("class_names")
            names = getattr(dm, "class_names", None)
            have = f"classes {list(mine)} ({ours})" if mine else f"{ours} classes"
            given = f"classes {list(names)} ({theirs})" if names else f"{theirs} classes"
            if self.restored_from:
                raise ConfigError(
                    f"The checkpoint {self.restored_from} has {have}, the data has {given}. A "
                    f"checkpoint only knows the classes it was trained on: point --data.root at "
                    f"images of its classes, or start a new fit (without --ckpt_path) to train "
                    f"on these."
                )
            raise ConfigError(
                f"The model was built for {have}, the data has {given}. Leave num_classes "
                f"(--model.num_classes) out to take it from the data, or give data with "
                f"{ours} classes."
            )
        ours, theirs = self.hparams.get("image_size"), getattr(dm, "image_size", None)
        if ours is not None and theirs is not None and ours != theirs:
            raise ConfigError(
                f"The model was built for image_size={ours}, the data has image_size={theirs}. "
                f"Leave --model.image_size out to take it from the data, or set "
                f"--data.image_size {ours}."
            )

    def configure_callbacks(self) -> list[pl.Callback]:
        """Add a FreezeSchedule (backbone frozen) and a FeatureCache when the Trainer has none."""
        extra: list[pl.Callback] = []
        if FreezeSchedule.find(self._trainer) is None:
            extra.append(FreezeSchedule())
        if self.hparams.feature_cache and FeatureCache.find(self._trainer) is None:
            extra.append(FeatureCache())
        return extra

    # --- forward -------------------------------------------------------------------------------

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 or [0, 1] float (N, 3, H, W) -> normalised float, channels-last if configured."""
        if self.hparams.channels_last:  # re-laid out while still uint8: a quarter of the bytes
            x = x.contiguous(memory_format=torch.channels_last)
        scale = 1 / self.std / (255 if x.dtype == torch.uint8 else 1)
        # (x / 255 - mean) / std in one fused pass: x * scale + shift
        x = torch.addcmul(-self.mean / self.std, x.float(), scale)
        if self.hparams.channels_last:
            x = x.contiguous(
                memory_format=torch.channels_last
            )  # a no-op unless broadcasting changed it
        return x

    def frozen_prefix(self) -> int:
        """Number of leading backbone modules without any trainable parameter."""
        for i, module in enumerate(self.backbone):
            if any(p.requires_grad for p in module.parameters()):
                return i
        return len(self.backbone)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images -> backbone feature map (N, C, H/32, W/32)."""
        k = self.frozen_prefix()
        if k and torch.is_grad_enabled():
            # The frozen prefix needs no autograd graph: a frozen step costs about one forward.
            with torch.no_grad():
                x = fusion.run(self.backbone[:k], x)
            return self.backbone[k:](x) if k < len(self.backbone) else x
        return fusion.run(self.backbone, x)  # as self.backbone(x) where a graph is recorded

    tta: str = "none"
    """Test-time augmentation of the forward pass outside training: ``none`` or ``flip`` (the
    log of the mean softmax of each image and its mirror, :mod:`tlfinetune.tta`).
    ``--prediction.tta`` sets it for the length of a validate, test or predict run."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images (N, 3, H, W), uint8 or float in [0, 1] -> logits (N, num_classes)."""
        if self.tta != "none" and not self.training:
            return averaged_logits(self._logits, x, self.tta)
        return self._logits(x)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(self.normalize(x)))

    def train(self, mode: bool = True) -> TransferClassifier:
        """Like ``nn.Module.train``, but frozen parts behave as in inference (Keras semantics).

        Frozen BatchNorm keeps its running statistics; the whole frozen prefix runs in eval
        mode, so its dropout (also the attention dropout inside ``nn.MultiheadAttention``) and
        stochastic depth do not run and it computes exactly what the feature cache serves.
        """
        super().train(mode)
        if mode:
            for m in self.backbone.modules():
                if isinstance(m, _BatchNorm) and not any(p.requires_grad for p in m.parameters()):
                    m.eval()
            self.backbone[: self.frozen_prefix()].eval()
        return self

    # --- steps ---------------------------------------------------------------------------------

    def _shared_step(self, batch: Any, metrics: MetricCollection, stage: str) -> torch.Tensor:
        if isinstance(batch, CachedBatch):  # backbone[:start] already ran, once, in the cache
            x, y = batch.features, batch.labels
            if self.hparams.channels_last and x.dim() == 4:  # ViT's tokens are (N, T, C)
                x = x.contiguous(memory_format=torch.channels_last)
            logits = self.head(fusion.run(self.backbone[batch.start :], x))
        else:  # (images, labels), or an ImageBatch that also carries positions for the cache
            x, y = batch[0], batch[1]
            logits = self(x)
        loss = self.loss(logits, y)
        # Soft (mixed) labels: accuracy against the class with the larger share of the blend.
        metrics.update(logits.detach().float(), y.argmax(dim=1) if y.ndim == 2 else y)
        n = len(y)
        self.log(
            f"{stage}/loss",
            loss,
            on_step=False,
            on_epoch=True,
            prog_bar=True,
            sync_dist=True,
            batch_size=n,
        )
        self.log_dict(
            metrics, on_step=False, on_epoch=True, prog_bar=stage != "train", batch_size=n
        )
        return loss

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Cross-entropy against class indices ``(N,)`` or class probabilities ``(N, C)``.

        Probabilities are the soft labels of Mixup/CutMix batches (``data.mix``).
        """
        smoothing = self.hparams.label_smoothing
        weight = getattr(self, "class_weight", None)  # --model.class_weights
        weight = None if weight is None else weight.float()
        return F.cross_entropy(logits.float(), target, weight=weight, label_smoothing=smoothing)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:  # noqa: D102
        loss = self._shared_step(batch, self.train_metrics, "train")
        self._guard_finite(loss, batch_idx)
        return loss

    nonfinite_check_every: int | None = None
    """Training steps between checks of the loss for NaN/inf; ``None``: every step on a CPU,
    every 50 on accelerators; ``0``: never (the learning-rate finder's sweeps, which are meant
    to diverge at their end). Reading a value back from a GPU waits for every queued kernel, so
    checking each step would leave it idle while Python prepares the next step. Between checks
    the first bad step is recorded on the device; it is also read at the end of each epoch and
    before any checkpoint is written, so no checkpoint ever holds weights trained on NaNs."""

    def _guard_finite(self, loss: torch.Tensor, batch_idx: int) -> None:
        if self.nonfinite_check_every == 0:
            return
        every = self.nonfinite_check_every or (1 if loss.device.type == "cpu" else 50)
        # Built on the device from scalars: a host tensor copied over would wait for the GPU.
        record = torch.stack(
            [loss.detach().float()]
            + [torch.full((), float(v), device=loss.device) for v in (self.global_step, batch_idx)]
        )
        first = self._nonfinite
        if first is None:
            first = torch.full((3,), float("nan"), device=loss.device)
        # Keep the first bad step: take this one only while none is recorded (step still nan).
        bad = ~torch.isfinite(record[0]) & first[1].isnan()
        self._nonfinite = torch.where(bad, record, first)
        if (self.global_step + 1) % every == 0:
            self._check_nonfinite()

    def _check_nonfinite(self) -> None:
        record = self._nonfinite
        if record is None:
            return
        value, step, batch_idx = record.tolist()
        if step == step:  # not nan: a step was recorded
            self._stop_nonfinite(value, int(step), int(batch_idx))

    def _stop_nonfinite(self, value: float, step: int, batch_idx: int) -> None:
        raise TLFinetuneError(
            f"The training loss became {value} at epoch {self.current_epoch}, step {step} "
            f"(batch {batch_idx}). Training stopped instead of going on with NaNs; lower the "
            f"learning rate (--model.optimizer.lr) or check the data. "
            f"{self._last_checkpoint_hint()}"
        )

    def on_train_start(self) -> None:  # noqa: D102
        self._nonfinite = None

    def on_train_epoch_end(self) -> None:  # noqa: D102
        self._check_nonfinite()

    def validation_step(self, batch: Any, batch_idx: int) -> None:  # noqa: D102
        cache = FeatureCache.find(self._trainer)
        reused = cache.reuse(batch) if cache is not None else None
        self._shared_step(batch if reused is None else reused, self.val_metrics, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:  # noqa: D102
        self._shared_step(batch, self.test_metrics, "test")

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """Class probabilities (N, num_classes) for a batch ``(images, index)`` or images."""
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return torch.softmax(self(x).float(), dim=1)

    def _last_checkpoint_hint(self) -> str:
        ckpt = getattr(self.trainer, "checkpoint_callback", None)
        path = getattr(ckpt, "last_model_path", "") or getattr(ckpt, "best_model_path", "")
        return f"The last good checkpoint is {path}." if path else "No checkpoint was saved yet."

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """Reseed from (seed, epoch, batch) so a resumed run draws what an uninterrupted one draws.

        Dropout uses the global generators; seeding them at every batch makes its stream
        independent of how many epochs or batches this process has run and of when Lightning
        created the data iterator, so a run resumed mid-epoch goes on exactly as one that was
        never stopped. Only when the run was seeded (``seed_everything`` / ``--seed_everything``).
        """
        seed = os.environ.get("PL_GLOBAL_SEED")
        if seed is not None:
            batch_seed = hash_seed(int(seed), self.current_epoch, batch_idx)
            random.seed(batch_seed)
            np.random.seed(batch_seed)
            torch.manual_seed(batch_seed)

    # --- optimizer -----------------------------------------------------------------------------

    def configure_optimizers(self) -> Any:
        """Adam (or the configured optimizer) over trainable parameters only, in two groups.

        The backbone group holds every backbone parameter that trains now or at a later
        milestone (the FreezeSchedule makes them trainable before this runs) at
        ``lr * backbone_lr_ratio``; frozen parameters get no gradient, so the optimizer skips
        them until they are unfrozen, and schedulers never see a group appear.
        """
        head = [p for p in self.head.parameters() if p.requires_grad]
        body = [p for p in self.backbone.parameters() if p.requires_grad]
        groups = [{"params": head, "name": "head"}]
        if body:
            groups.append({"params": body, "name": "backbone"})
        optimizer = _fused_when_unchosen(self.optimizer(groups))
        schedule = FreezeSchedule.find(self._trainer)
        ratio = schedule.backbone_lr_ratio if schedule else 1.0
        if body:
            optimizer.param_groups[1]["lr"] = optimizer.param_groups[0]["lr"] * ratio
        if self.lr_scheduler is None:
            return optimizer
        scheduler = self.lr_scheduler(optimizer)
        _keep_ratio(scheduler, ratio)
        config = {"scheduler": scheduler}
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            config["monitor"] = "val/loss"
        return {"optimizer": optimizer, "lr_scheduler": config}

    # --- checkpoints ---------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """The checkpoint carries its own weights: loading it must not fetch ImageNet again."""
        self._check_nonfinite()  # a checkpoint must never hold weights trained on NaNs
        hparams = dict(checkpoint.get("hyper_parameters", {}))
        if "weights" in hparams:
            hparams["weights"] = "none"
            checkpoint["hyper_parameters"] = hparams
        checkpoint["tlfinetune"] = {"weights_origin": self.weights_info}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """The weights' origin as the checkpoint records it; class weights as asked.

        ``weights_info`` becomes where the run's backbone weights first came from, so a resumed
        run's checkpoints record it too. Class weights: ``auto`` keeps the checkpoint's,
        anything else is used as asked.

        ``auto`` in both the checkpoint and this model restores the checkpoint's
        ``class_weight`` buffer (computed from the data it trained on), so a resumed fit and
        ``validate`` use the loss the run trained with. A list, or none, given now (a resume
        with other ``--model.class_weights``) is used from now on, and the log says so.
        """
        # Where the run's backbone weights first came from (ImageNet, a file), not "none": the
        # checkpoint's hyperparameters say none only so that loading it fetches nothing.
        origin = (checkpoint.get("tlfinetune") or {}).get("weights_origin")
        if origin:
            self.weights_info = origin
        state = checkpoint.get("state_dict")
        if state is None:
            return
        theirs = checkpoint.get("hyper_parameters", {}).get("class_weights")
        ours = self.hparams.get("class_weights")
        saved = state.get("class_weight")
        if ours == theirs == "auto" and saved is not None:
            return
        mine = getattr(self, "class_weight", None)
        if mine is None:
            state.pop("class_weight", None)
        else:
            state["class_weight"] = mine.detach().clone()
        if saved is not None and (mine is None or not torch.equal(saved.float().cpu(), mine.cpu())):
            log.info(f"Class weights from now on: {ours!r}, not the checkpoint's {theirs!r}.")


def hash_seed(*parts: int) -> int:
    """A 32-bit seed that depends on every part (numpy's SeedSequence mixes them)."""
    return int(np.random.SeedSequence([p & 0xFFFFFFFF for p in parts]).generate_state(1)[0])


def _metrics(num_classes: int, prefix: str) -> MetricCollection:
    # average="micro" is plain top-1 accuracy, as Keras' "accuracy"; torchmetrics defaults to macro.
    # validate_args=False: the checks run torch.unique, which waits for the GPU at every step;
    # labels out of range already fail in the loss.
    fast = {"validate_args": False}
    metrics: dict[str, Any] = {
        "acc": MulticlassAccuracy(num_classes, average="micro", **fast),
        "f1": MulticlassF1Score(num_classes, average="macro", **fast),
        # Mean recall over the classes: what accuracy hides when the classes are imbalanced.
        "balanced_acc": MulticlassRecall(num_classes, average="macro", **fast),
    }
    if num_classes > 5:
        metrics["acc_top5"] = MulticlassAccuracy(num_classes, top_k=5, average="micro", **fast)
    return MetricCollection(metrics, prefix=prefix)


def _fused_when_unchosen(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimizer again with torch's fused kernel, when the user chose no implementation.

    Adam's default (foreach) makes about ten passes over every trainable tensor per step; the
    fused kernel makes one. On the seed's Flatten head (6.4M parameters) the optimizer step is
    most of a step served from the feature cache. Same update up to float rounding.
    ``foreach`` or ``fused`` given in the optimizer's init_args is kept as given.
    """
    accepted = inspect.signature(type(optimizer)).parameters
    defaults = {k: v for k, v in optimizer.defaults.items() if k in accepted}
    if "fused" not in accepted or any(defaults.get(k) is not None for k in ("fused", "foreach")):
        return optimizer  # no fused kernel, or the user chose an implementation
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if not all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params):
        return optimizer
    groups = [
        {k: v for k, v in group.items() if k not in ("fused", "foreach")}
        for group in optimizer.param_groups
    ]
    return type(optimizer)(groups, **{**defaults, "foreach": None, "fused": True})


def _keep_ratio(scheduler: Any, ratio: float) -> None:
    """Schedulers given one max_lr (OneCycleLR, CyclicLR) would erase the backbone's lr ratio."""
    groups = scheduler.optimizer.param_groups
    if ratio == 1.0 or len(groups) < 2:
        return
    for key in ("initial_lr", "max_lr", "min_lr", "lr"):
        if key in groups[1] and key in groups[0] and groups[1][key] == groups[0][key]:
            groups[1][key] = groups[0][key] * ratio
    for attr in ("base_lrs", "max_lrs"):
        values = getattr(scheduler, attr, None)
        if isinstance(values, list) and len(values) > 1 and values[1] == values[0]:
            values[1] = values[0] * ratio
