"""Backbone families: how to take a torchvision classifier apart into named units.

The freeze schedule and the feature cache see a backbone as an ``nn.Sequential``: everything
before one index is frozen (and may be served from the cache), everything from it on trains.
So each family says, in one function, how its torchvision model becomes a sequence of *units*
(the smallest parts the backbone can be split at, e.g. one ResNet bottleneck), which *stage*
each unit belongs to (the names ``unfreeze_from`` takes), which of the model's modules form
its own classifier (the ``torchvision`` head) and which stage the ``partial`` regime trains.

Stage names, per family (``python -m tlfinetune backbones NAME`` prints them with counts):

- ResNet, ResNeXt, Wide ResNet: ``stem`` (conv1, bn1, relu, maxpool), ``layer1``..``layer4``
  (torchvision's names); units ``layer4_0``.. are the residual blocks. Partial: ``layer4``.
- EfficientNet (B0-B7, V2): ``stem``, ``stage1``..``stage7`` (V2: ``stage6``) = ``features.1``..,
  the MBConv stages; ``top`` = the last 1x1 convolution. Partial: the last stage (and ``top``).
- MobileNetV3: ``stem``, ``stage1``.. = runs of inverted-residual blocks at one resolution (each
  new stage halves it), ``top`` = the last 1x1 convolution. Partial: the last stage.
- ConvNeXt: ``stem``, ``stage1``..``stage4``; a stage starts with the downsampling layer before
  its blocks (``stage2_down``). Partial: ``stage4``.
- RegNet: ``stem``, ``block1``..``block4`` (torchvision's ``trunk_output.block1``..). Partial:
  ``block4``.
- DenseNet: ``stem``, ``block1``..``block4``; ``blockN`` is ``denseblockN`` and the
  ``transitionN`` after it (a dense block cannot be split further: each layer reads all earlier
  ones); ``block4`` ends with ``norm5`` and the ReLU torchvision applies after it. Partial:
  ``block4``.
- ViT: ``stem`` (patch projection, class token, position embedding), ``encoder_layer_0``..
  ``encoder_layer_11`` (also given as the numbers 0..11), ``norm`` (the last LayerNorm, which
  hands the class token on as a ``(C, 1, 1)`` map). Partial: the last encoder layer.
- Swin: ``stem``, ``stage1``..``stage4`` (a stage starts with its patch merging,
  ``stage2_merge``), ``norm`` (LayerNorm, then channels first). Partial: ``stage4``.

Every unit keeps its torchvision module path (``layer4.1``, ``features.6.2``), also accepted by
``unfreeze_from``. A family's backbone holds the very modules of the torchvision model it was
taken from, so torchvision state dicts map onto it tensor by tensor (see
:func:`tlfinetune.backbone.key_map`).
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torchvision.models import (
    convnext,
    densenet,
    efficientnet,
    mobilenetv3,
    regnet,
    resnet,
    swin_transformer,
    vision_transformer,
)

from tlfinetune.errors import ConfigError


@dataclass(frozen=True)
class Unit:
    """One module of the backbone Sequential and the names it answers to."""

    name: str  # its name in the backbone Sequential (state-dict prefix)
    stage: str
    path: str  # torchvision module path
    module: nn.Module
    number: int | None = None  # an integer unfreeze_from may give for it (ViT encoder layers)


@dataclass(frozen=True)
class Family:
    """How one family of torchvision models becomes a backbone of named units.

    Attributes:
        name: The family's name, as ``backbones`` prints it.
        units: Takes a whole torchvision model apart, in forward order.
        head: The modules after the backbone in the torchvision model's forward (pooling,
            flatten, classifier); the last one is the layer the ``torchvision`` head replaces.
        last: The state-dict prefix of that last layer (``fc``): it is not loaded.
        partial: Takes the units, gives the stage the ``partial`` regime trains from.
        default_head: The head used when none is given.
        rename: Fixes the keys of the published weights files before they are mapped.
    """

    name: str
    units: Callable[[nn.Module], list[Unit]]
    head: Callable[[nn.Module], list[nn.Module]]
    last: str
    partial: Callable[[list[Unit]], str]
    default_head: str = "gap"
    rename: Callable[[dict[str, Any]], dict[str, Any]] = field(default=lambda raw: raw)


def _seq(**modules: nn.Module) -> nn.Sequential:
    return nn.Sequential(OrderedDict(modules))


def _stages(units: list[Unit], stage: str, path: str, blocks: nn.Module) -> None:
    for i, block in enumerate(blocks):
        units.append(Unit(f"{stage}_{i}", stage, f"{path}.{i}", block))


def _last_stage(skip: tuple[str, ...] = ("top", "norm")) -> Callable[[list[Unit]], str]:
    def partial(units: list[Unit]) -> str:
        return [u.stage for u in units if u.stage not in skip][-1]

    return partial


# --- ResNet, ResNeXt, Wide ResNet ----------------------------------------------------------------


def resnet_units(m: nn.Module) -> list[Unit]:
    """``stem``, then each residual block of ``layer1``..``layer4``."""
    stem = _seq(conv1=m.conv1, bn1=m.bn1, relu=m.relu, maxpool=m.maxpool)
    units = [Unit("stem", "stem", "conv1", stem)]
    for s in range(1, 5):
        _stages(units, f"layer{s}", f"layer{s}", getattr(m, f"layer{s}"))
    return units


RESNET = Family(
    "resnet",
    resnet_units,
    head=lambda m: [m.avgpool, nn.Flatten(1), m.fc],
    last="fc",
    partial=_last_stage(),
)


# --- EfficientNet ----------------------------------------------------------------------------


def efficientnet_units(m: nn.Module) -> list[Unit]:
    """``stem`` = features.0, ``stageN`` = the blocks of features.N, ``top`` = the last conv."""
    f = m.features
    units = [Unit("stem", "stem", "features.0", f[0])]
    for k in range(1, len(f) - 1):
        _stages(units, f"stage{k}", f"features.{k}", f[k])
    units.append(Unit("top", "top", f"features.{len(f) - 1}", f[-1]))
    return units


EFFICIENTNET = Family(
    "efficientnet",
    efficientnet_units,
    head=lambda m: [m.avgpool, nn.Flatten(1), *m.classifier],
    last="classifier.1",
    partial=_last_stage(),
)


# --- MobileNetV3 -----------------------------------------------------------------------------


def mobilenet_units(m: nn.Module) -> list[Unit]:
    """``stem``, stages = runs of blocks at one resolution (measured), ``top`` = the last conv."""
    f = m.features
    units = [Unit("stem", "stem", "features.0", f[0])]
    with torch.no_grad():  # a 64 px probe: each stride-2 block starts a new stage
        x, stage, size = f[0].eval()(torch.zeros(1, 3, 64, 64)), 0, None
        for k in range(1, len(f) - 1):
            x = f[k].eval()(x)
            if x.shape[-1] != size:
                stage, size, i = stage + 1, x.shape[-1], 0
            units.append(Unit(f"stage{stage}_{i}", f"stage{stage}", f"features.{k}", f[k]))
            i += 1
    f.train(m.training)  # the probe ran in eval mode; leave the modes as they were
    units.append(Unit("top", "top", f"features.{len(f) - 1}", f[-1]))
    return units


MOBILENET = Family(
    "mobilenet_v3",
    mobilenet_units,
    head=lambda m: [m.avgpool, nn.Flatten(1), *m.classifier],
    last="classifier.3",
    partial=_last_stage(),
)


# --- ConvNeXt --------------------------------------------------------------------------------


def convnext_units(m: nn.Module) -> list[Unit]:
    """``stem``, then ``stageN``: its downsampling layer (from stage 2) and its blocks."""
    f = m.features
    units = [Unit("stem", "stem", "features.0", f[0])]
    for s in range(1, len(f) // 2 + 1):
        if s > 1:
            units.append(Unit(f"stage{s}_down", f"stage{s}", f"features.{2 * s - 2}", f[2 * s - 2]))
        _stages(units, f"stage{s}", f"features.{2 * s - 1}", f[2 * s - 1])
    return units


CONVNEXT = Family(
    "convnext",
    convnext_units,
    head=lambda m: [m.avgpool, *m.classifier],  # LayerNorm2d, Flatten, Linear
    last="classifier.2",
    partial=_last_stage(),
)


# --- RegNet ----------------------------------------------------------------------------------


def regnet_units(m: nn.Module) -> list[Unit]:
    """``stem``, then the blocks of ``block1``..``block4`` (``trunk_output.blockN``)."""
    units = [Unit("stem", "stem", "stem", m.stem)]
    for name, stage in m.trunk_output.named_children():
        for child, block in stage.named_children():  # "block1-0", ...
            i = child.rsplit("-", 1)[-1]
            units.append(Unit(f"{name}_{i}", name, f"trunk_output.{name}.{child}", block))
    return units


REGNET = Family(
    "regnet",
    regnet_units,
    head=lambda m: [m.avgpool, nn.Flatten(1), m.fc],
    last="fc",
    partial=_last_stage(),
)


# --- DenseNet --------------------------------------------------------------------------------


def densenet_units(m: nn.Module) -> list[Unit]:
    """``stem``; ``blockN`` = denseblockN + transitionN; ``block4`` ends with norm5 and a ReLU."""
    f = m.features
    stem = _seq(conv0=f.conv0, norm0=f.norm0, relu0=f.relu0, pool0=f.pool0)
    units = [Unit("stem", "stem", "features.conv0", stem)]
    n = sum(1 for name, _ in f.named_children() if name.startswith("denseblock"))
    for k in range(1, n + 1):
        block = f"block{k}"
        units.append(
            Unit(f"denseblock{k}", block, f"features.denseblock{k}", getattr(f, f"denseblock{k}"))
        )
        if k < n:
            path = f"features.transition{k}"
            units.append(Unit(f"transition{k}", block, path, getattr(f, f"transition{k}")))
    # torchvision's forward applies F.relu after norm5; as a module it is part of the backbone.
    units.append(Unit("norm5", f"block{n}", "features.norm5", _seq(norm5=f.norm5, relu=nn.ReLU())))
    return units


_DENSE_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)


def densenet_rename(raw: dict[str, Any]) -> dict[str, Any]:
    """Rename the published DenseNet files' ``norm.1`` keys to the modules' ``norm1``.

    torchvision's own DenseNet loader does the same.
    """
    out = {}
    for key, value in raw.items():
        match = _DENSE_KEY.match(key)
        out[match.group(1) + match.group(2) if match else key] = value
    return out


DENSENET = Family(
    "densenet",
    densenet_units,
    head=lambda m: [nn.AdaptiveAvgPool2d(1), nn.Flatten(1), m.classifier],
    last="classifier",
    partial=_last_stage(),
    rename=densenet_rename,
)


# --- ViT -------------------------------------------------------------------------------------


class PatchEmbedding(nn.Module):
    """ViT's input side: patch projection, class token, position embedding, dropout.

    The position embedding is learnt for one grid of patches, so this refuses other image
    sizes rather than silently misplacing positions.
    """

    def __init__(self, vit: vision_transformer.VisionTransformer) -> None:
        super().__init__()
        self.conv_proj = vit.conv_proj
        self.class_token = vit.class_token
        self.pos_embedding = vit.encoder.pos_embedding
        self.dropout = vit.encoder.dropout
        self.image_size, self.patch_size = vit.image_size, vit.patch_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        n, _, h, w = x.shape
        if h != self.image_size or w != self.image_size:
            raise ConfigError(
                f"This ViT takes {self.image_size} px images only (got {h}x{w}): its position "
                f"embedding is learnt for a {self.image_size // self.patch_size}x"
                f"{self.image_size // self.patch_size} grid of patches. Set "
                f"--data.image_size {self.image_size}, or choose a convolutional backbone or "
                f"swin_t, which take any size."
            )
        x = self.conv_proj(x).flatten(2).transpose(1, 2)  # (N, patches, hidden)
        x = torch.cat([self.class_token.expand(n, -1, -1), x], dim=1)
        return self.dropout(x + self.pos_embedding)


class ClassToken(nn.Module):
    """Tokens ``(N, T, C)`` -> the class token as a ``(N, C, 1, 1)`` feature map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return x[:, 0, :, None, None]


def vit_units(m: nn.Module) -> list[Unit]:
    """``stem``, ``encoder_layer_N`` (also the number N), ``norm`` (LayerNorm + class token)."""
    units = [Unit("stem", "stem", "conv_proj", PatchEmbedding(m))]
    for i, layer in enumerate(m.encoder.layers):
        name = f"encoder_layer_{i}"
        units.append(Unit(name, name, f"encoder.layers.{name}", layer, number=i))
    units.append(Unit("norm", "norm", "encoder.ln", _seq(ln=m.encoder.ln, token=ClassToken())))
    return units


VIT = Family(
    "vit",
    vit_units,
    head=lambda m: [nn.Flatten(1), *m.heads],
    last="heads.head",
    partial=_last_stage(),
)


# --- Swin ------------------------------------------------------------------------------------


def swin_units(m: nn.Module) -> list[Unit]:
    """``stem``, ``stageN`` (its patch merging from stage 2, its blocks), ``norm``."""
    f = m.features
    units = [Unit("stem", "stem", "features.0", f[0])]
    for s in range(1, len(f) // 2 + 1):
        if s > 1:
            merge = Unit(f"stage{s}_merge", f"stage{s}", f"features.{2 * s - 2}", f[2 * s - 2])
            units.append(merge)
        _stages(units, f"stage{s}", f"features.{2 * s - 1}", f[2 * s - 1])
    units.append(Unit("norm", "norm", "norm", _seq(norm=m.norm, permute=m.permute)))
    return units


SWIN = Family(
    "swin",
    swin_units,
    head=lambda m: [m.avgpool, nn.Flatten(1), m.head],
    last="head",
    partial=_last_stage(),
)


# --- test-only stand-ins (tiny members of the families, no ImageNet weights) ------------------


def test_resnet(*, weights: None = None) -> nn.Module:
    """ResNet's layout (torchvision's widths, 64-512) with one basic block per stage."""
    return resnet.ResNet(resnet.BasicBlock, [1, 1, 1, 1])


def test_efficientnet(*, weights: None = None) -> nn.Module:
    """EfficientNet's layout: 3 MBConv stages of 1 block, 8-24 channels, stochastic depth."""
    cfg = efficientnet.MBConvConfig
    setting = [cfg(1, 3, 1, 8, 8, 1), cfg(4, 3, 2, 8, 16, 1), cfg(4, 5, 2, 16, 24, 1)]
    return efficientnet.EfficientNet(setting, dropout=0.2, last_channel=64)


def test_mobilenet_v3(*, weights: None = None) -> nn.Module:
    """MobileNetV3's layout: 4 inverted-residual blocks in 3 stages, 8-24 channels."""
    cfg = mobilenetv3.InvertedResidualConfig
    setting = [
        cfg(8, 3, 8, 8, True, "RE", 2, 1, 1.0),
        cfg(8, 3, 24, 16, False, "RE", 2, 1, 1.0),
        cfg(16, 3, 32, 16, True, "HS", 1, 1, 1.0),
        cfg(16, 5, 48, 24, True, "HS", 2, 1, 1.0),
    ]
    return mobilenetv3.MobileNetV3(setting, last_channel=64)


def test_convnext(*, weights: None = None) -> nn.Module:
    """ConvNeXt's layout, 4 stages of 1 block, 8-64 channels, stochastic depth 0.2."""
    cfg = convnext.CNBlockConfig
    setting = [cfg(8, 16, 1), cfg(16, 32, 1), cfg(32, 64, 1), cfg(64, None, 1)]
    return convnext.ConvNeXt(setting, stochastic_depth_prob=0.2)


def test_vit(*, weights: None = None) -> nn.Module:
    """A 2-layer ViT for 32 px images: 8 px patches, width 16, dropout 0.1."""
    return vision_transformer.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32,
        dropout=0.1,
    )  # fmt: skip


def test_swin(*, weights: None = None) -> nn.Module:
    """Swin's layout in 2 stages, width 8, window 4, stochastic depth 0.2.

    Stage 1 has two blocks: at 32 px its map is 8x8, so the second block shifts its windows
    (the roll and attention mask of Swin's every other block); stage 2 is a patch merging and
    one block. More stages would only repeat these at maps no larger than a window.
    """
    return swin_transformer.SwinTransformer(
        patch_size=[4, 4], embed_dim=8, depths=[2, 1], num_heads=[1, 1], window_size=[4, 4],
        stochastic_depth_prob=0.2,
    )  # fmt: skip


def test_regnet(*, weights: None = None) -> nn.Module:
    """RegNetY's layout, 4 stages of 1 block, 8-64 channels, squeeze-excitation."""
    params = regnet.BlockParams.from_init_params(
        depth=4, w_0=8, w_a=16.0, w_m=1.5, group_width=8, se_ratio=0.25
    )
    return regnet.RegNet(params, stem_width=8)


def test_densenet(*, weights: None = None) -> nn.Module:
    """DenseNet's layout with one layer per dense block, growth rate 4."""
    return densenet.DenseNet(growth_rate=4, block_config=(1, 1, 1, 1), num_init_features=8)
