"""Image transforms and the weights' preprocessing presets (resize, crop, interpolation, mean/std).

Kept apart from the datamodule so that the model can import the presets without the data layer:
the model normalises inside itself (so checkpoints and exports carry their own normalisation),
while the transforms here only resize, crop and augment uint8 images.

A backbone's preset is data, :class:`Preprocessing`, read from its torchvision weights enum
(``Weights.DEFAULT.transforms()``) by :func:`weights_preprocessing`. The model owns it (it
stores it in its hyperparameters, so a checkpoint carries it); the datamodule reads it from the
model it serves. VGG16's preset (256 -> 224, bilinear, antialiased, ImageNet mean/std) is also
the preset of backbones without ImageNet weights (test-only stand-ins).
"""

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
import torchvision
from PIL import Image
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as F

from tlfinetune.errors import ConfigError

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "VGG16_PREPROCESSING",
    "Preprocessing",
    "ResizeCenterCrop",
    "eval_resize_size",
    "eval_transform",
    "train_transform",
    "weights_preprocessing",
]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
"""Per-channel mean of ImageNet RGB images in ``[0, 1]`` (torchvision's VGG preset)."""

IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
"""Per-channel standard deviation of ImageNet RGB images in ``[0, 1]``."""

Interpolation = Literal["nearest", "nearest-exact", "bilinear", "bicubic"]
"""The interpolations torchvision's tensor resize supports (``InterpolationMode`` values)."""


@dataclass(frozen=True)
class Preprocessing:
    """What a backbone's weights expect of an image, as torchvision's ``ImageClassification``.

    Evaluation resizes the shorter side to ``resize_size`` (``interpolation``, ``antialias``),
    centre-crops ``crop_size`` x ``crop_size``, scales to ``[0, 1]`` and normalises with
    ``mean``/``std``. The normalisation runs inside the model; the rest in the data.

    Args:
        crop_size: Side of the square the model sees (the weights' input size).
        resize_size: Shorter side after the resize, before the centre crop.
        interpolation: ``bilinear``, ``bicubic``, ``nearest`` or ``nearest-exact``.
        antialias: Low-pass filter when shrinking (as PIL does).
        mean: Per-channel mean of RGB values in ``[0, 1]``.
        std: Per-channel standard deviation of RGB values in ``[0, 1]``.
    """

    crop_size: int
    resize_size: int
    interpolation: Interpolation
    antialias: bool
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __post_init__(self) -> None:
        # Lists from YAML or a checkpoint become tuples: the preset stays hashable and comparable.
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        if self.crop_size < 1 or self.resize_size < 1:
            raise ConfigError(
                f"preprocessing: crop_size and resize_size must be positive, got "
                f"{self.crop_size} and {self.resize_size}."
            )
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ConfigError(
                f"preprocessing: mean and std need three values (R, G, B), std positive; got "
                f"mean={list(self.mean)}, std={list(self.std)}."
            )
        if self.interpolation not in Interpolation.__args__:
            raise ConfigError(
                f"preprocessing: interpolation {self.interpolation!r} is not one of "
                f"{', '.join(Interpolation.__args__)}."
            )

    @classmethod
    def from_value(cls, value: "Preprocessing | Mapping[str, Any]") -> "Preprocessing":
        """A preset from itself or from its :meth:`as_dict` (a checkpoint's, a YAML mapping)."""
        if isinstance(value, Preprocessing):
            return value
        keys = {"crop_size", "resize_size", "interpolation", "antialias", "mean", "std"}
        if not isinstance(value, Mapping) or set(value) != keys:
            raise ConfigError(
                f"preprocessing must give exactly {', '.join(sorted(keys))}; got {value!r}."
            )
        return cls(**value)

    def as_dict(self) -> dict[str, Any]:
        """Plain values (lists, not tuples): for hyperparameters, checkpoints and JSON."""
        out = asdict(self)
        out["mean"], out["std"] = list(self.mean), list(self.std)
        return out

    def at(self, image_size: int) -> "Preprocessing":
        """The same preset at another crop size; the resize keeps the weights' ratio.

        ``resize_size`` becomes ``round(image_size * resize_size / crop_size)``: VGG16's
        256/224 gives 37 at 32 px, as :func:`eval_resize_size` always did.
        """
        image_size = int(image_size)
        if image_size == self.crop_size:
            return self
        resize = round(image_size * self.resize_size / self.crop_size)
        return Preprocessing(
            image_size, resize, self.interpolation, self.antialias, self.mean, self.std
        )

    @property
    def mode(self) -> InterpolationMode:
        """``interpolation`` as torchvision's enum."""
        return InterpolationMode(self.interpolation)


VGG16_PREPROCESSING = Preprocessing(224, 256, "bilinear", True, IMAGENET_MEAN, IMAGENET_STD)
"""torchvision's ``VGG16_Weights`` preset; also the preset of backbones without weights."""


def weights_preprocessing(
    weights_enum: type[torchvision.models.WeightsEnum] | None,
) -> Preprocessing:
    """The preset of a torchvision weights enum's ``DEFAULT`` weights (``transforms()``).

    Args:
        weights_enum: e.g. ``torchvision.models.ResNet50_Weights``; ``None`` (a backbone
            without ImageNet weights) gives :data:`VGG16_PREPROCESSING`.

    Returns:
        The preset: ResNet50 (V2 weights) 232 -> 224 bilinear, EfficientNet-B3 320 -> 300
        bicubic, ViT-B/16 256 -> 224 bilinear, ...

    Example:
        >>> weights_preprocessing(torchvision.models.VGG16_Weights) == VGG16_PREPROCESSING
        True
    """
    if weights_enum is None:
        return VGG16_PREPROCESSING
    preset = weights_enum.DEFAULT.transforms()
    try:
        (crop,), (resize,) = preset.crop_size, preset.resize_size
        interpolation = InterpolationMode(preset.interpolation).value
        return Preprocessing(
            int(crop),
            int(resize),
            interpolation,
            bool(preset.antialias),
            tuple(preset.mean),
            tuple(preset.std),
        )
    except (AttributeError, TypeError, ValueError) as err:
        raise ConfigError(
            f"{weights_enum.__name__}.DEFAULT.transforms() is not an image classification "
            f"preset (crop_size, resize_size, interpolation, mean, std): {err}."
        ) from err


def eval_resize_size(image_size: int) -> int:
    """VGG16's shorter-side resize before the centre crop: ``round(image_size * 256 / 224)``."""
    return VGG16_PREPROCESSING.at(image_size).resize_size


class ResizeCenterCrop(torch.nn.Module):
    """Resize the shorter side (bilinear, antialiased by default), then centre-crop a square.

    The same pixels as ``v2.Compose([ToImage(), Resize(resize_size, interpolation,
    antialias=antialias), CenterCrop(crop_size), ToPureTensor()])``, computed with torchvision's
    tensor kernels directly: it runs once per image in the DataLoader, where the generic ``v2``
    dispatch cost about as much as the resize itself (80 vs 36 us per 64 px image on this
    project's CPU machines).

    Args:
        resize_size: Length of the shorter side after the resize.
        crop_size: Side length of the square output.
        interpolation: ``bilinear``, ``bicubic``, ``nearest`` or ``nearest-exact``.
        antialias: Low-pass filter when shrinking.
    """

    def __init__(
        self,
        resize_size: int,
        crop_size: int,
        interpolation: Interpolation = "bilinear",
        antialias: bool = True,
    ) -> None:
        super().__init__()
        self.resize_size = int(resize_size)
        self.crop_size = int(crop_size)
        self.interpolation = InterpolationMode(interpolation)
        self.antialias = bool(antialias)

    def forward(self, image: torch.Tensor | Image.Image) -> torch.Tensor:
        """A uint8 CHW tensor (or PIL image) -> a plain uint8 tensor ``(C, crop, crop)``."""
        x = F.pil_to_tensor(image) if isinstance(image, Image.Image) else image
        x = x.as_subclass(torch.Tensor)  # a tv_tensors.Image comes out as a plain tensor
        x = F.resize_image(
            x, [self.resize_size], interpolation=self.interpolation, antialias=self.antialias
        )
        return F.center_crop_image(x, [self.crop_size, self.crop_size])

    def extra_repr(self) -> str:
        """The settings, shown in ``repr``; the feature cache's key includes that ``repr``."""
        return (
            f"resize_size={self.resize_size}, crop_size={self.crop_size}, "
            f"interpolation={self.interpolation.value}, antialias={self.antialias}"
        )


def eval_transform(image_size: int, preprocessing: Preprocessing | None = None) -> ResizeCenterCrop:
    """The deterministic evaluation transform of a preset (VGG16's by default) at ``image_size``.

    Resizes the shorter side to the preset's resize size scaled to ``image_size``
    (:meth:`Preprocessing.at`) with its interpolation and antialiasing, and centre-crops
    ``image_size``. Takes a uint8 CHW tensor (or a PIL image) and returns a plain uint8 tensor of
    shape ``(3, image_size, image_size)``; it does not normalise.

    Args:
        image_size: Side length of the square output.
        preprocessing: The weights' preset; :data:`VGG16_PREPROCESSING` when left out.

    Returns:
        The transform.

    Example:
        >>> eval_transform(224)
        ResizeCenterCrop(resize_size=256, crop_size=224, interpolation=bilinear, antialias=True)
    """
    p = (preprocessing or VGG16_PREPROCESSING).at(image_size)
    return ResizeCenterCrop(p.resize_size, p.crop_size, p.interpolation, p.antialias)


def train_transform(
    image_size: int,
    augment: bool = True,
    trivial_augment: bool = False,
    preprocessing: Preprocessing | None = None,
) -> v2.Compose | ResizeCenterCrop:
    """The training transform: random resized crop and horizontal flip on uint8 tensors.

    Args:
        image_size: Side length of the square output.
        augment: ``False`` returns :func:`eval_transform` (deterministic, no augmentation).
        trivial_augment: Add ``TrivialAugmentWide`` after the flip (ignored without ``augment``).
        preprocessing: The weights' preset, for its interpolation and antialiasing;
            :data:`VGG16_PREPROCESSING` when left out.

    Returns:
        The transform; outputs plain uint8 tensors of shape ``(3, image_size, image_size)``.
    """
    preset = preprocessing or VGG16_PREPROCESSING
    if not augment:
        return eval_transform(image_size, preset)
    steps: list[Any] = [
        v2.ToImage(),
        v2.RandomResizedCrop(image_size, interpolation=preset.mode, antialias=preset.antialias),
        v2.RandomHorizontalFlip(),
    ]
    if trivial_augment:
        steps.append(v2.TrivialAugmentWide())
    steps.append(v2.ToPureTensor())
    return v2.Compose(steps)
