"""Transforms: the VGG evaluation preset without normalisation, and training augmentation."""

import json

import pytest
import torch
import torchvision
from datafiles import dm_kwargs, tree
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from tlfinetune.data import ImageDataModule
from tlfinetune.errors import ConfigError
from tlfinetune.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    VGG16_PREPROCESSING,
    Preprocessing,
    eval_resize_size,
    eval_transform,
    train_transform,
    weights_preprocessing,
)


def test_preset_constants():
    assert IMAGENET_MEAN == (0.485, 0.456, 0.406)
    assert IMAGENET_STD == (0.229, 0.224, 0.225)


def test_eval_transform_is_vgg_preset_without_normalisation():
    x = torch.randint(
        0, 256, (3, 60, 90), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    out = eval_transform(32)(x)
    assert type(out) is torch.Tensor and out.dtype == torch.uint8 and out.shape == (3, 32, 32)
    expected = TF.center_crop(TF.resize(x, 37, antialias=True), 32)  # round(32 * 256 / 224)
    assert torch.equal(out, expected)
    assert eval_transform(224).resize_size == 256 and eval_transform(224).crop_size == 224


@pytest.mark.parametrize("shape", [(3, 60, 90), (3, 90, 60), (3, 20, 30), (3, 64, 64), (1, 50, 40)])
def test_eval_transform_gives_the_pixels_of_torchvisions_v2_pipeline(shape):
    # ResizeCenterCrop calls torchvision's kernels directly for speed; it must not change a pixel
    # against the v2 pipeline it replaces, for tensors, tv_tensors and PIL images alike.
    x = torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    reference = v2.Compose(
        [v2.ToImage(), v2.Resize(37, antialias=True), v2.CenterCrop(32), v2.ToPureTensor()]
    )
    out = eval_transform(32)(x)
    assert type(out) is torch.Tensor and torch.equal(out, reference(x))
    assert torch.equal(eval_transform(32)(tv_tensors.Image(x)), out)
    if shape[0] == 3:
        pil = TF.to_pil_image(x)
        assert torch.equal(eval_transform(32)(pil), reference(pil))


def test_train_transform_without_augment_equals_eval():
    x = torch.randint(
        0, 256, (3, 40, 50), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)
    )
    plain = train_transform(24, augment=False)
    assert torch.equal(plain(x), eval_transform(24)(x))
    assert torch.equal(plain(x), plain(x))
    torch.manual_seed(0)
    augmented = train_transform(24, augment=True)
    outs = [augmented(x) for _ in range(4)]
    assert all(o.shape == (3, 24, 24) and o.dtype == torch.uint8 for o in outs)
    assert any(not torch.equal(outs[0], o) for o in outs[1:])
    kinds = [type(t) for t in train_transform(24, True, trivial_augment=True).transforms]
    assert v2.RandomResizedCrop in kinds and v2.RandomHorizontalFlip in kinds
    assert v2.TrivialAugmentWide in kinds
    assert v2.TrivialAugmentWide not in [type(t) for t in augmented.transforms]


def test_datamodule_train_images_equal_eval_images_without_augment(tmp_path):
    tree(tmp_path, {"a": 3, "b": 3})
    dm = ImageDataModule(root=tmp_path, **dm_kwargs(image_size=16))
    dm.setup("fit")
    x, label = dm.train_dataset[0]
    path = dm.train_dataset.files[0]
    reference = eval_transform(16)(TF.pil_to_tensor(Image.open(path).convert("RGB")))
    assert torch.equal(x, reference) and isinstance(label, int)


@pytest.mark.parametrize(
    "weights, expected",
    [
        (None, (224, 256, "bilinear")),  # no ImageNet weights (test_vgg16): VGG16's preset
        (torchvision.models.VGG16_Weights, (224, 256, "bilinear")),
        (torchvision.models.ResNet50_Weights, (224, 232, "bilinear")),  # DEFAULT is V2
        (torchvision.models.EfficientNet_B3_Weights, (300, 320, "bicubic")),
        (torchvision.models.ViT_B_16_Weights, (224, 256, "bilinear")),
    ],
)
def test_preset_is_read_from_the_weights_transforms(weights, expected):
    preset = weights_preprocessing(weights)
    assert (preset.crop_size, preset.resize_size, preset.interpolation) == expected
    assert preset.antialias is True
    assert (preset.mean, preset.std) == (IMAGENET_MEAN, IMAGENET_STD)
    if weights is not None:  # the same numbers as torchvision's own transforms object
        tv = weights.DEFAULT.transforms()
        assert [preset.crop_size, preset.resize_size] == tv.crop_size + tv.resize_size
        assert preset.interpolation == tv.interpolation.value
    assert Preprocessing.from_value(preset.as_dict()) == preset  # what a checkpoint stores
    json.dumps(preset.as_dict())  # plain values


def test_vgg_preset_keeps_todays_resize_at_every_size():
    # round(size * 256 / 224), as eval_transform always computed it
    for size in (8, 16, 32, 64, 100, 150, 224, 299):
        assert VGG16_PREPROCESSING.at(size).resize_size == round(size * 256 / 224)
        assert eval_transform(size).resize_size == eval_resize_size(size)
    assert VGG16_PREPROCESSING.at(224) is VGG16_PREPROCESSING


def test_eval_transform_follows_another_presets_ratio_and_interpolation():
    b3 = weights_preprocessing(torchvision.models.EfficientNet_B3_Weights)
    transform = eval_transform(32, b3)
    assert (transform.resize_size, transform.crop_size) == (34, 32)  # round(32 * 320 / 300)
    x = torch.randint(
        0, 256, (3, 60, 90), dtype=torch.uint8, generator=torch.Generator().manual_seed(3)
    )
    reference = v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(34, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
            v2.CenterCrop(32),
            v2.ToPureTensor(),
        ]
    )
    assert torch.equal(transform(x), reference(x))
    assert not torch.equal(transform(x), eval_transform(32)(x))  # VGG's bilinear 37 differs
    kinds = {type(t): t for t in train_transform(32, True, preprocessing=b3).transforms}
    assert kinds[v2.RandomResizedCrop].interpolation == v2.InterpolationMode.BICUBIC


@pytest.mark.parametrize(
    "value, words",
    [
        ({"crop_size": 32}, ["exactly", "resize_size"]),
        ({**VGG16_PREPROCESSING.as_dict(), "interpolation": "lanczos"}, ["'lanczos'", "bicubic"]),
        ({**VGG16_PREPROCESSING.as_dict(), "mean": [0.5, 0.5]}, ["three values"]),
        ({**VGG16_PREPROCESSING.as_dict(), "crop_size": 0}, ["positive"]),
    ],
)
def test_bad_preset_is_refused_clearly(value, words):
    with pytest.raises(ConfigError) as err:
        Preprocessing.from_value(value)
    assert all(w in str(err.value) for w in words)
