"""Transforms: the VGG evaluation preset without normalisation, and training augmentation."""

import pytest
import torch
from datafiles import dm_kwargs, tree
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from tlfinetune.data import ImageDataModule
from tlfinetune.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transform, train_transform


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
