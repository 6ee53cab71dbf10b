"""benchmarks/arithmetic.py counts a step's multiply-accumulates: a cached epoch's floor.

The counts are checked against torchvision's published ones and against VGG16's layer shapes
written out by hand, in the regimes the seed trains.
"""

import pytest
import torch
import torchvision
from arithmetic import forward_macs, step_arithmetic

from tlfinetune import TransferClassifier
from tlfinetune.freeze import regime_start, set_trainable_from


def _conv(size: int, c_in: int, c_out: int) -> int:
    return size * size * c_in * c_out * 9  # a 3x3 convolution, padding 1, per image


# VGG16's convolutions at 224 px, by block: (output size, input channels, output channels)
BLOCKS_1_TO_4 = [
    (224, 3, 64), (224, 64, 64), (112, 64, 128), (112, 128, 128),
    (56, 128, 256), (56, 256, 256), (56, 256, 256), (28, 256, 512), (28, 512, 512), (28, 512, 512),
]  # fmt: skip
BLOCK5 = _conv(14, 512, 512)  # each of its three convolutions
FC1, FC2 = 25_088 * 256, 256 * 5  # the seed's Flatten -> Dense(256) -> Dense(5)


@pytest.mark.parametrize(
    ("builder", "weights"),
    [
        (torchvision.models.vgg16, torchvision.models.VGG16_Weights.IMAGENET1K_V1),
        (torchvision.models.resnet50, torchvision.models.ResNet50_Weights.IMAGENET1K_V2),
        (  # depthwise convolutions: groups
            torchvision.models.mobilenet_v3_large,
            torchvision.models.MobileNet_V3_Large_Weights.IMAGENET1K_V2,
        ),
    ],
)
def test_forward_count_matches_torchvision_published_ops(builder, weights):
    with torch.device("meta"):
        model = builder()
    x = torch.empty(1, 3, 224, 224, device="meta")
    giga = sum(macs for _, macs in forward_macs([model], x)) / 1e9
    assert round(giga, 3) == weights.meta["_ops"]  # 15.47, 4.089 and 0.217 GMAC


@pytest.fixture(scope="module")
def seed_model():
    model = TransferClassifier(
        num_classes=5, backbone="vgg16", weights="none", image_size=224, head="flatten",
        head_hidden=256,
    )  # fmt: skip
    return model


def _regime(model: TransferClassifier, regime: str) -> None:
    set_trainable_from(model, regime_start(regime, "vgg16", None, len(model.backbone)))


def test_fine_tuning_step_is_block5_and_head_forward_and_backward(seed_model):
    _regime(seed_model, "partial")
    arithmetic = step_arithmetic(seed_model.backbone, seed_model.head, 224)

    assert arithmetic.prefix == sum(_conv(*shape) for shape in BLOCKS_1_TO_4)
    # forward 3 + weight gradients 3 + input gradients 2: block5's first input is the cache's
    assert arithmetic.rest == 8 * BLOCK5 + 3 * FC1 + 3 * FC2
    assert arithmetic.cached_share == pytest.approx(0.2104, abs=1e-4)


def test_frozen_step_is_the_head_alone_without_an_input_gradient(seed_model):
    _regime(seed_model, "frozen")
    arithmetic = step_arithmetic(seed_model.backbone, seed_model.head, 224)

    assert arithmetic.prefix == sum(_conv(*s) for s in BLOCKS_1_TO_4) + 3 * BLOCK5
    assert arithmetic.rest == 2 * FC1 + 3 * FC2
    assert arithmetic.cached_share < 0.001


def test_counting_leaves_the_model_as_it_was(seed_model):
    _regime(seed_model, "partial")
    before = {n: (p.device, p.requires_grad) for n, p in seed_model.named_parameters()}
    step_arithmetic(seed_model.backbone, seed_model.head, 224)
    assert {n: (p.device, p.requires_grad) for n, p in seed_model.named_parameters()} == before
