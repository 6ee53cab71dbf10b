"""Mixup and CutMix: training batches whose images and labels are blends of two images.

torchvision's ``v2.MixUp`` / ``v2.CutMix`` do the blending, batch by batch, as timm's
``--mixup`` / ``--cutmix``: each image is mixed with its neighbour in the batch, by a weight
``lam ~ Beta(alpha, alpha)`` (Mixup: a weighted sum of the pixels; CutMix: a box of the neighbour
pasted in, ``lam`` being the area kept), and the label becomes the same blend of the two one-hot
labels. ``mixup_cutmix`` picks one of the two per batch with equal odds.

The draws depend only on ``(seed, epoch, batch index)``, never on global random state, as the
training order does (:mod:`tlfinetune.sampling`): a run resumed mid-epoch mixes its batches as
an uninterrupted one does.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from torch import Tensor
from torchvision.transforms import v2

__all__ = ["BatchMix", "MixMode"]

MixMode = Literal["none", "mixup", "cutmix", "mixup_cutmix"]


class BatchMix:
    """Mix a batch of images and integer labels into blended images and soft labels.

    Args:
        mode: ``mixup``, ``cutmix`` or ``mixup_cutmix`` (one of the two per batch).
        num_classes: length of the soft label rows.
        mixup_alpha: Beta distribution parameter of Mixup's weight (timm's default 0.8).
        cutmix_alpha: Beta distribution parameter of CutMix's box area (timm's default 1.0).
        seed: seed of the draws, with the epoch and batch index.
    """

    def __init__(
        self,
        mode: MixMode,
        num_classes: int,
        mixup_alpha: float = 0.8,
        cutmix_alpha: float = 1.0,
        seed: int = 0,
    ) -> None:
        choices = {
            "mixup": [v2.MixUp(alpha=mixup_alpha, num_classes=num_classes)],
            "cutmix": [v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes)],
        }
        choices["mixup_cutmix"] = choices["mixup"] + choices["cutmix"]
        self.transforms = choices[mode]
        self.seed = int(seed)

    def __call__(self, images: Tensor, labels: Tensor, epoch: int, batch_idx: int) -> tuple:
        """``(images, labels)`` -> ``(float images in [0, 1], soft labels (N, num_classes))``.

        uint8 images become floats in ``[0, 1]`` (a blend of two uint8 images is not one);
        the model normalises both alike.
        """
        x = images.float() / 255 if images.dtype == torch.uint8 else images.float()
        parts = [self.seed & 0xFFFFFFFF, abs(self.seed) >> 32, int(epoch), int(batch_idx)]
        seed = int(np.random.SeedSequence(parts).generate_state(1)[0])
        # torchvision draws from the global CPU generator: borrow it, seeded, and give it back.
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            choice = int(torch.randint(len(self.transforms), ()))
            return self.transforms[choice](x, labels)
