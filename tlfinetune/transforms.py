"""Image transforms and the ImageNet statistics, following torchvision's VGG16 preset.

Kept apart from the datamodule so that the model can import the normalisation constants without
the data layer: the model normalises inside itself (so checkpoints and exports carry their own
normalisation), while the transforms here only resize, crop and augment uint8 images.
"""

from typing import Any

from torchvision.transforms import InterpolationMode, v2

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
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


def eval_transform(image_size: int) -> v2.Compose:
    """The deterministic evaluation transform, following torchvision's ``VGG16_Weights`` preset.

    Resizes the shorter side to :func:`eval_resize_size` (bilinear, antialiased) and centre-crops
    ``image_size``. Takes a uint8 CHW tensor (or a PIL image) and returns a plain uint8 tensor of
    shape ``(3, image_size, image_size)``; it does not normalise.

    Args:
        image_size: Side length of the square output.

    Returns:
        The transform.
    """
    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(
                eval_resize_size(image_size),
                interpolation=InterpolationMode.BILINEAR,
                antialias=True,
            ),
            v2.CenterCrop(image_size),
            v2.ToPureTensor(),
        ]
    )


def train_transform(
    image_size: int, augment: bool = True, trivial_augment: bool = False
) -> v2.Compose:
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
