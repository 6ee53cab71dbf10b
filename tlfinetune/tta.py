"""Test-time augmentation: predict each image and its mirror image, average the probabilities.

``--prediction.tta flip`` in ``predict``, ``validate`` and ``test``. The model's forward pass
then runs the batch and its horizontal flip as one batch of twice the size and returns the log
of the mean of the two softmax distributions. A log-probability vector is a valid logit vector
(its softmax is the averaged distribution itself), so everything downstream of the forward pass
is unchanged: ``predict`` writes the averaged probabilities, the reports' accuracy and confusion
matrix count the averaged prediction, and the logged loss is the cross-entropy of the averaged
distribution. Training, and validation inside ``fit``, never see it.

Crops (``flip_crops``, as in torchvision's ``TenCrop``) are left out on purpose: the data
pipeline resizes every image to ``image_size`` before the model sees it, so a crop could only
be enlarged back from fewer pixels; doing it well needs the loader to deliver larger images.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal, get_args

import lightning.pytorch as pl
import torch

from tlfinetune.errors import ConfigError

TTA = Literal["none", "flip"]
TTA_MODES: tuple[str, ...] = get_args(TTA)


def check_tta(tta: str) -> str:
    """``tta`` when it is a known mode, else a ConfigError naming the modes."""
    if tta not in TTA_MODES:
        raise ConfigError(f"--prediction.tta {tta!r} is not one of: {', '.join(TTA_MODES)}.")
    return tta


def views(images: torch.Tensor, tta: str) -> torch.Tensor:
    """The augmented copies of a batch ``(N, 3, H, W)``, stacked: ``(V * N, 3, H, W)``."""
    if tta == "flip":
        return torch.cat([images, images.flip(-1)])
    return images


def averaged_logits(forward: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
                    tta: str) -> torch.Tensor:  # fmt: skip
    """Log of the mean softmax over the views of ``images`` (N, C), from one forward pass.

    ``log(mean_v softmax(z_v))`` is computed as ``logsumexp_v(log_softmax(z_v)) - log V``, so a
    class one view rules out keeps a finite score when the other view gives it any probability.
    """
    if tta == "none":
        return forward(images)
    n = len(images)
    logits = forward(views(images, tta)).float()
    count = len(logits) // n
    log_probs = torch.log_softmax(logits, dim=1).view(count, n, -1)
    return torch.logsumexp(log_probs, dim=0) - math.log(count)


class TestTimeAugmentation(pl.Callback):
    """Turn test-time augmentation on for ``trainer.validate``/``test``/``predict``.

    ``--prediction.tta`` of the ``validate`` and ``test`` commands (``predict``'s is the
    :class:`~tlfinetune.predict.PredictionWriter`'s own argument). It sets the model's ``tta``
    attribute for the run and puts the old value back at its end; validation inside ``fit`` is
    left alone.

    Args:
        tta: ``none`` or ``flip`` (each image and its horizontal mirror, probabilities averaged).
    """

    __test__ = False  # not a pytest test class, whatever its name says

    def __init__(self, tta: TTA = "none") -> None:
        self.tta = check_tta(tta)
        self._before: str | None = None

    def _on(self, trainer: pl.Trainer, pl_module: Any, stage: str) -> None:
        if trainer.state.fn == stage:
            self._before = switch_tta(pl_module, self.tta)

    def _off(self, pl_module: Any) -> None:
        if self._before is not None:
            switch_tta(pl_module, self._before)
            self._before = None

    def on_validation_start(self, trainer: pl.Trainer, pl_module: Any) -> None:  # noqa: D102
        self._on(trainer, pl_module, "validate")

    def on_test_start(self, trainer: pl.Trainer, pl_module: Any) -> None:  # noqa: D102
        self._on(trainer, pl_module, "test")

    def on_predict_start(self, trainer: pl.Trainer, pl_module: Any) -> None:  # noqa: D102
        self._on(trainer, pl_module, "predict")

    def on_validation_end(self, trainer: pl.Trainer, pl_module: Any) -> None:  # noqa: D102
        self._off(pl_module)

    def on_test_end(self, trainer: pl.Trainer, pl_module: Any) -> None:  # noqa: D102
        self._off(pl_module)

    def on_predict_end(self, trainer: pl.Trainer, pl_module: Any) -> None:  # noqa: D102
        self._off(pl_module)

    def on_exception(self, trainer: pl.Trainer, pl_module: Any, exc: BaseException) -> None:  # noqa: D102
        self._off(pl_module)


def switch_tta(pl_module: Any, tta: str) -> str:
    """Set the model's test-time augmentation; returns the previous mode."""
    if not hasattr(pl_module, "tta"):
        if tta == "none":
            return "none"
        raise ConfigError(
            f"--prediction.tta {tta}: {type(pl_module).__name__} has no test-time augmentation "
            "(TransferClassifier has)."
        )
    before = pl_module.tta
    pl_module.tta = check_tta(tta)
    return before
