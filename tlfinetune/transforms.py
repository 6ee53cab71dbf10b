"""Image transforms and the ImageNet statistics, following torchvision's VGG16 preset.

Kept apart from the datamodule so that the model can import the normalisation constants without
the data layer: the model normalises inside itself (so checkpoints and exports carry their own
normalisation), while the transforms here only resize, crop and augment uint8 images.
"""

from typing import Any

import torch
from PIL import Image
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as F

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ResizeCenterCrop",
    "eval_resize_size",
    "eval_transform",
    "train_transform",
]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
"""Per-channel mean of ImageNet RGB images in ``[0, 1]`` (torchvision's VGG preset)."""

IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
"""Per-channel standard deviation of ImageNet RGB images in ``[0, 1]``."""


def eval_resize_size(image_size: int) -> int:
    """Shorter-side resize before the centre crop: ``round(image_size * 256 / 224)``."""
    return round(image_size * 256 / 224)


class ResizeCenterCrop(torch.nn.Module):
    """Resize the shorter side (bilinear, antialiased), then centre-crop a square.

    The same pixels as ``v2.Compose([ToImage(), Resize(resize_size, antialias=True),
    CenterCrop(crop_size), ToPureTensor()])``, computed with torchvision's tensor kernels directly:
    it runs once per image in the DataLoader, where the generic ``v2`` dispatch cost about as much
    as the resize itself (80 vs 36 us per 64 px image on this project's CPU machines).

    Args:
        resize_size: Length of the shorter side after the resize.
        crop_size: Side length of the square output.
    """

    def __init__(self, resize_size: int, crop_size: int) -> None:
        super().__init__()
        self.resize_size = int(resize_size)
        self.crop_size = int(crop_size)

    def forward(self, image: torch.Tensor | Image.Image) -> torch.Tensor:
        """A uint8 CHW tensor (or PIL image) -> a plain uint8 tensor ``(C, crop, crop)``."""
        x = F.pil_to_tensor(image) if isinstance(image, Image.Image) else image
        x = x.as_subclass(torch.Tensor)  # a tv_tensors.Image comes out as a plain tensor
        x = F.resize_image(
            x, [self.resize_size], interpolation=InterpolationMode.BILINEAR, antialias=True
        )
        return F.center_crop_image(x, [self.crop_size, self.crop_size])

    def extra_repr(self) -> str:
        """The settings, shown in ``repr``; the feature cache's key includes that ``repr``."""
        return (
            f"resize_size={self.resize_size}, crop_size={self.crop_size}, "
            "interpolation=bilinear, antialias=True"
        )


def eval_transform(image_size: int) -> ResizeCenterCrop:
    """The deterministic evaluation transform, following torchvision's ``VGG16_Weights`` preset.

    Resizes the shorter side to :func:`eval_resize_size` (bilinear, antialiased) and centre-crops
    ``image_size``. Takes a uint8 CHW tensor (or a PIL image) and returns a plain uint8 tensor of
    shape ``(3, image_size, image_size)``; it does not normalise.

    Args:
        image_size: Side length of the square output.

    Returns:
        The transform.

    Example:
        >>> eval_transform(224)
        ResizeCenterCrop(resize_size=256, crop_size=224, interpolation=bilinear, antialias=True)
    """
    return ResizeCenterCrop(eval_resize_size(image_size), image_size)


def train_transform(
    image_size: int, augment: bool = True, trivial_augment: bool = False
) -> v2.Compose | ResizeCenterCrop:
    """The training transform: random resized crop and horizontal flip on uint8 tensors.

    Args:
        image_size: Side length of the square output.
        augment: ``False`` returns :func:`eval_transform` (deterministic, no augmentation).
        trivial_augment: Add ``TrivialAugmentWide`` after the flip (ignored without ``augment``).

    Returns:
        The transform; outputs plain uint8 tensors of shape ``(3, image_size, image_size)``.
    """
    if not augment:
        return eval_transform(image_size)
    steps: list[Any] = [
        v2.ToImage(),
        v2.RandomResizedCrop(image_size, antialias=True),
        v2.RandomHorizontalFlip(),
    ]
    if trivial_augment:
        steps.append(v2.TrivialAugmentWide())
    steps.append(v2.ToPureTensor())
    return v2.Compose(steps)
