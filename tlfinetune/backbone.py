"""Backbones: torchvision models as a stack of layers, their Keras layer names, and their weights.

The table below is data: each entry says which torchvision builder makes the model, which weights
enum holds its ImageNet weights, and how its parts are named: VGG by its Keras layer table, the
other families (ResNet, EfficientNet, MobileNetV3, ConvNeXt, RegNet, DenseNet, ViT, Swin) by one
function each in :mod:`tlfinetune.families` that takes the torchvision model apart into named
stages. Every backbone is an ``nn.Sequential``, so "train from module index k" and the feature
cache's frozen prefix mean the same thing in every family.

Keras' ``VGG16(include_top=False)`` has 19 layers; torchvision's ``vgg16().features`` has 31
modules, because torchvision keeps each ReLU as its own module::

    Keras index  Keras name      torchvision features index
    0            input_1         0   (everything trains)
    1, 2         block1_conv1,2  0, 2        3   block1_pool  4
    4, 5         block2_conv1,2  5, 7        6   block2_pool  9
    7, 8, 9      block3_conv1-3  10, 12, 14  10  block3_pool  16
    11, 12, 13   block4_conv1-3  17, 19, 21  14  block4_pool  23
    15, 16, 17   block5_conv1-3  24, 26, 28  18  block5_pool  30

So the seed's ``for layer in base_model.layers[:15]: layer.trainable = False`` is
``features[:24]`` frozen, ``features[24:]`` (block5) trainable. The ``_bn`` variants put a
BatchNorm after each conv; their table shifts accordingly and is built from the same config.

``test_vgg16`` is a test-only stand-in, as timm ships ``test_*`` models: VGG16's layout (the same
31 modules, Keras names and block slices) with 1/16 of its channels (4-8-16-32-32), about 60k
parameters instead of 15M. The test suite uses it for logic that does not depend on the real
network's size; no ImageNet weights exist for it.
"""

from __future__ import annotations

import functools
import itertools
import os
import urllib.error
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn
from torchvision import models as tv_models
from torchvision.models import vgg as tv_vgg

from tlfinetune import families as fam
from tlfinetune.errors import ConfigError, WeightsError
from tlfinetune.families import Family, Unit


@dataclass(frozen=True)
class Layer:
    """One place the backbone can be split at, and the names it answers to.

    For VGG, one Keras layer: ``keras_index`` and ``keras_name`` are Keras', ``index`` the
    torchvision ``features`` index where it starts. For the other families, one unit
    (:mod:`tlfinetune.families`): ``keras_name`` is the unit's name (``layer4_1``),
    ``keras_index`` the number ``unfreeze_from`` may give for it (ViT encoder layers) or -1,
    ``path`` its torchvision module path (``layer4.1``).
    """

    keras_index: int
    keras_name: str
    block: str
    index: int  # position in the torchvision Sequential
    path: str = ""


@dataclass(frozen=True)
class _Plan:
    """What building a family's model once tells about it."""

    layers: tuple[Layer, ...]
    keys: dict[str, str]  # backbone state-dict key -> torchvision state-dict key
    partial: str


@dataclass(frozen=True)
class BackboneSpec:
    """How to build one backbone, name its parts and map its weights.

    Attributes:
        model: The torchvision builder of the whole model (``weights=None`` gives it random).
        weights_enum: Its torchvision weights enum; None: no ImageNet weights exist.
        family: How to take the model apart (:mod:`tlfinetune.families`); None for VGG, whose
            backbone is torchvision's ``features`` named by the Keras layer table.
        cfg: VGG only: the ``torchvision.models.vgg.cfgs`` key.
        batch_norm: VGG only: the ``_bn`` variant.
    """

    model: Callable[..., nn.Module]
    weights_enum: type[torchvision.models.WeightsEnum] | None
    family: Family | None = None
    cfg: str = ""
    batch_norm: bool = False

    def features(self) -> nn.Sequential:
        """A randomly initialised backbone, as torchvision initialises it."""
        if self.family is None:
            return _vgg_features(self.cfg, self.batch_norm)
        model = self.model(weights=None)
        units = self.family.units(model)
        if "_plan" not in self.__dict__:  # the same model tells its names: no second build
            self.__dict__["_plan"] = self._plan_of(model, units)
        return nn.Sequential(OrderedDict((u.name, u.module) for u in units))

    @functools.cached_property
    def _plan(self) -> _Plan:
        if self.family is None:
            layers, _ = vgg_layers(CFGS[self.cfg], self.batch_norm)
            return _Plan(layers, {}, "block5")
        # Its random initialisation must not draw from the global generator: a seeded run must
        # not depend on whether this was computed before. (Not on the meta device: RegNet
        # computes its widths with tensors.)
        with torch.random.fork_rng(devices=[]):
            model = self.model(weights=None)
            return self._plan_of(model, self.family.units(model))

    def _plan_of(self, model: nn.Module, units: list[Unit]) -> _Plan:
        layers = tuple(
            Layer(-1 if u.number is None else u.number, u.name, u.stage, i, u.path)
            for i, u in enumerate(units)
        )
        # The backbone holds the model's own modules: the same tensor objects, other keys.
        owner = {id(t): k for k, t in model.state_dict(keep_vars=True).items()}
        staged = nn.Sequential(OrderedDict((u.name, u.module) for u in units))
        keys = {k: owner[id(t)] for k, t in staged.state_dict(keep_vars=True).items()}
        return _Plan(layers, keys, self.family.partial(units))

    @property
    def layers(self) -> tuple[Layer, ...]:
        """The places the backbone can be split at, in order."""
        return self._plan.layers

    @property
    def num_modules(self) -> int:
        """``len(backbone)``."""
        if self.family is None:
            return vgg_layers(CFGS[self.cfg], self.batch_norm)[1]
        return len(self.layers)

    @property
    def partial(self) -> str:
        """The stage the ``partial`` regime trains from (with everything after it)."""
        return self._plan.partial

    @property
    def default_head(self) -> str:
        """The head used when none is given: the seed's ``flatten`` for VGG, else ``gap``."""
        return "flatten" if self.family is None else self.family.default_head

    @property
    def stages(self) -> list[str]:
        """The stage (VGG: block) names, in order."""
        layers = self.layers[1:] if self.family is None else self.layers  # VGG: not input_1
        return list(dict.fromkeys(layer.block for layer in layers))

    def split(self, raw: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """A torchvision state dict -> (backbone tensors re-keyed, the other tensors as they are).

        The others are the classifier's (``classifier.0.weight``, ``fc.weight``), which the
        ``torchvision`` head reuses.
        """
        if self.family is None:
            inside = {k[len("features.") :]: v for k, v in raw.items() if k.startswith("features.")}
            return inside, {k: v for k, v in raw.items() if not k.startswith("features.")}
        raw = self.family.rename(raw)
        keys = self._plan.keys
        inside = {k: raw[t] for k, t in keys.items() if t in raw}
        taken = set(keys.values())
        return inside, {k: v for k, v in raw.items() if k not in taken}


def vgg_layers(cfg: list[int | str], batch_norm: bool) -> tuple[tuple[Layer, ...], int]:
    """Keras layer table of a VGG config (``torchvision.models.vgg.cfgs``) and len(features)."""
    layers = [Layer(0, "input_1", "block1", 0)]
    index, block, conv = 0, 1, 0
    for v in cfg:
        if v == "M":
            layers.append(Layer(len(layers), f"block{block}_pool", f"block{block}", index))
            index += 1
            block, conv = block + 1, 0
        else:
            conv += 1
            layers.append(Layer(len(layers), f"block{block}_conv{conv}", f"block{block}", index))
            index += 3 if batch_norm else 2  # conv (+ bn) + relu
    return tuple(layers), index


# torchvision's VGG configs, plus "D/16": "D" (VGG16) with 1/16 of the channels, for test_vgg16.
CFGS: dict[str, list[int | str]] = {
    **tv_vgg.cfgs,
    "D/16": [v if v == "M" else v // 16 for v in tv_vgg.cfgs["D"]],
}


def _vgg_features(cfg: str, batch_norm: bool) -> nn.Sequential:
    # torchvision builds the 138M-parameter classifier too; the backbone alone is 15M.
    features = tv_vgg.make_layers(CFGS[cfg], batch_norm=batch_norm)
    for m in features.modules():  # the same initialisation as torchvision.models.VGG
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return features


def _vgg(model: Callable[..., nn.Module], weights_enum: Any, cfg: str, bn: bool) -> BackboneSpec:
    return BackboneSpec(model, weights_enum, cfg=cfg, batch_norm=bn)


def _test_vgg16(*, weights: None = None) -> nn.Module:
    """test_vgg16 as a whole model: the narrow features and a VGG-shaped classifier (fc 64 wide).

    The same layout as torchvision's ``VGG.classifier`` (fc6, relu, dropout, fc7, relu, dropout,
    fc8), so the ``torchvision`` head and its weights handling work on it unchanged.
    """
    model = nn.Module()
    model.features = _vgg_features("D/16", False)
    model.classifier = nn.Sequential(
        nn.Linear(32 * 7 * 7, 64),
        nn.ReLU(True),
        nn.Dropout(),
        nn.Linear(64, 64),
        nn.ReLU(True),
        nn.Dropout(),
        nn.Linear(64, 1000),
    )
    return model


# Every family's members that tlfinetune offers; each is torchvision's builder of that name.
MEMBERS: dict[Family, tuple[str, ...]] = {
    fam.RESNET: (
        "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d",
        "resnext101_32x8d", "wide_resnet50_2", "wide_resnet101_2",
    ),
    fam.EFFICIENTNET: (
        *(f"efficientnet_b{i}" for i in range(8)), "efficientnet_v2_s", "efficientnet_v2_m",
    ),
    fam.MOBILENET: ("mobilenet_v3_small", "mobilenet_v3_large"),
    fam.CONVNEXT: ("convnext_tiny", "convnext_small", "convnext_base"),
    fam.REGNET: (
        "regnet_y_400mf", "regnet_y_800mf", "regnet_y_1_6gf", "regnet_y_3_2gf", "regnet_y_8gf",
        "regnet_x_400mf", "regnet_x_1_6gf",
    ),
    fam.DENSENET: ("densenet121", "densenet169", "densenet201"),
    fam.VIT: ("vit_b_16", "vit_b_32"),
    fam.SWIN: ("swin_t", "swin_s", "swin_b"),
}  # fmt: skip


def _member(family: Family, name: str) -> BackboneSpec:
    return BackboneSpec(
        tv_models.get_model_builder(name), tv_models.get_model_weights(name), family
    )


BACKBONES: dict[str, BackboneSpec] = {
    "vgg11": _vgg(tv_vgg.vgg11, tv_vgg.VGG11_Weights, "A", False),
    "vgg11_bn": _vgg(tv_vgg.vgg11_bn, tv_vgg.VGG11_BN_Weights, "A", True),
    "vgg13": _vgg(tv_vgg.vgg13, tv_vgg.VGG13_Weights, "B", False),
    "vgg13_bn": _vgg(tv_vgg.vgg13_bn, tv_vgg.VGG13_BN_Weights, "B", True),
    "vgg16": _vgg(tv_vgg.vgg16, tv_vgg.VGG16_Weights, "D", False),
    "vgg16_bn": _vgg(tv_vgg.vgg16_bn, tv_vgg.VGG16_BN_Weights, "D", True),
    "vgg19": _vgg(tv_vgg.vgg19, tv_vgg.VGG19_Weights, "E", False),
    "vgg19_bn": _vgg(tv_vgg.vgg19_bn, tv_vgg.VGG19_BN_Weights, "E", True),
    **{name: _member(family, name) for family, names in MEMBERS.items() for name in names},
    # test-only stand-ins: see the module docstring and tlfinetune.families
    "test_vgg16": _vgg(_test_vgg16, None, "D/16", False),
    "test_resnet": BackboneSpec(fam.test_resnet, None, fam.RESNET),
    "test_efficientnet": BackboneSpec(fam.test_efficientnet, None, fam.EFFICIENTNET),
    "test_mobilenet_v3": BackboneSpec(fam.test_mobilenet_v3, None, fam.MOBILENET),
    "test_convnext": BackboneSpec(fam.test_convnext, None, fam.CONVNEXT),
    "test_densenet": BackboneSpec(fam.test_densenet, None, fam.DENSENET),
    "test_regnet": BackboneSpec(fam.test_regnet, None, fam.REGNET),
    "test_vit": BackboneSpec(fam.test_vit, None, fam.VIT),
    "test_swin": BackboneSpec(fam.test_swin, None, fam.SWIN),
}


def get_spec(name: str) -> BackboneSpec:
    """The table entry for ``name``, or a ConfigError listing the choices."""
    try:
        return BACKBONES[name]
    except KeyError:
        choices = ", ".join(n for n in BACKBONES if not n.startswith("test_"))
        raise ConfigError(
            f"Unknown backbone {name!r}. Choose one of: {choices} (`python -m tlfinetune "
            f"backbones` describes them)."
        ) from None


def family_name(name: str) -> str:
    """The family of backbone ``name`` (``vgg``, ``resnet``, ...)."""
    family = get_spec(name).family
    return "vgg" if family is None else family.name


def build_backbone(name: str) -> nn.Sequential:
    """A randomly initialised backbone (without the model's classifier) as a Sequential."""
    return get_spec(name).features()


def build_classifier(name: str) -> nn.Module:
    """The original torchvision VGG classifier of ``name`` (for the ``torchvision`` head)."""
    return get_spec(name).model(weights=None).classifier


def resolve_unfreeze_from(name: str, spec: int | str | None) -> int:
    """Translate a stage/layer name, number or module path into a backbone module index.

    Everything at or after the returned index trains; everything before it is frozen.
    ``None`` is the backbone's ``partial`` stage (``block5`` for VGG, ``layer4`` for ResNet).

    >>> resolve_unfreeze_from("vgg16", 15), resolve_unfreeze_from("vgg16", "block5_conv1")
    (24, 24)
    """
    backbone = get_spec(name)
    if spec is None:
        spec = backbone.partial
    if isinstance(spec, str) and spec.strip().lstrip("-").isdigit():
        spec = int(spec)
    if backbone.family is not None:
        return _resolve_unit(name, backbone, spec)
    layers = backbone.layers
    path = spec.removeprefix("features.") if isinstance(spec, str) else ""
    if path.isdigit() and int(path) < backbone.num_modules:  # a torchvision path: features.24
        return int(path)
    if isinstance(spec, int):
        if 0 <= spec < len(layers):
            return layers[spec].index
        raise ConfigError(
            f"unfreeze_from={spec} is not a Keras layer index of {name}: use 0-{len(layers) - 1} "
            f"(15 is block5_conv1 in vgg16), a layer name such as 'block5_conv1', or a block name "
            f"such as 'block5'."
        )
    for layer in layers:
        if spec in (layer.keras_name, layer.block):  # a block starts at its first layer
            return layer.index
    names = ", ".join(backbone.stages)
    raise ConfigError(
        f"unfreeze_from={spec!r} names no layer of {name}. Use a block ({names}), a Keras "
        f"layer name such as 'block5_conv1' or 'block4_pool', a Keras layer index "
        f"(0-{len(layers) - 1}) or a torchvision path (features.24)."
    )


def _resolve_unit(name: str, backbone: BackboneSpec, spec: int | str) -> int:
    layers = backbone.layers
    numbers = [layer for layer in layers if layer.keras_index >= 0]
    if isinstance(spec, int):
        for layer in numbers:
            if layer.keras_index == spec:
                return layer.index
    else:
        for layer in layers:  # a stage starts at its first unit
            if spec in (layer.keras_name, layer.block, layer.path):
                return layer.index
        for layer in layers:  # a torchvision container of units (features.6, layer4)
            if layer.path.startswith(spec + "."):
                return layer.index
        inside = [layer for layer in layers if spec.startswith(layer.path + ".")]
        if inside:
            unit, after = inside[0], layers[inside[0].index + 1 : inside[0].index + 2]
            raise ConfigError(
                f"unfreeze_from={spec!r} is inside {inside[0].path} ({unit.keras_name}), and "
                f"{name} is split at whole units: use {unit.keras_name!r}"
                + (f" or the next one, {after[0].keras_name!r}." if after else ".")
            )
    number = f", an encoder layer number (0-{len(numbers) - 1})" if numbers else ""
    example = layers[-2] if len(layers) > 1 else layers[0]
    raise ConfigError(
        f"unfreeze_from={spec!r} names no part of {name}. Use a stage "
        f"({', '.join(backbone.stages)}), a unit such as {example.keras_name!r} or its "
        f"torchvision module path {example.path!r}{number}; `python -m tlfinetune backbones "
        f"{name}` lists them."
    )


def block_of(name: str, index: int) -> str:
    """The block (stage) that backbone module ``index`` belongs to."""
    layers = get_spec(name).layers
    block = layers[0].block
    for layer in layers:
        if layer.index <= index:
            block = layer.block
    return block


# --- weights -------------------------------------------------------------------------------------


def imagenet_weights(name: str) -> torchvision.models.WeightsEnum:
    """The ImageNet weights torchvision publishes for ``name`` (its enum's ``DEFAULT``)."""
    spec = get_spec(name)
    if spec.weights_enum is None:
        raise WeightsError(
            f"{name} has no ImageNet weights: it is a test-only stand-in with the layout of its "
            f'family and a fraction of its size. Pass --model.weights none (weights="none" in '
            f"Python), or a tlfinetune checkpoint or weights file made for {name}; for pretrained "
            f"weights choose a real backbone such as vgg16."
        )
    return spec.weights_enum.DEFAULT


def imagenet_cache_file(name: str) -> Path:
    """Where torchvision keeps (or would download) the ImageNet weights of ``name``."""
    url = imagenet_weights(name).url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def load_imagenet_state_dict(name: str, progress: bool = True) -> dict[str, torch.Tensor]:
    """Torchvision's own download, cache and hash check, but unpickled with ``weights_only=True``.

    torchvision's ``WeightsEnum.get_state_dict`` unpickles fully by default, so a file planted in
    the cache could run code; this is the same call with the safe unpickler.
    """
    weights = imagenet_weights(name)
    target = imagenet_cache_file(name)
    try:
        return torch.hub.load_state_dict_from_url(
            weights.url, progress=progress, check_hash=True, weights_only=True, map_location="cpu"
        )
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        if target.exists():
            raise WeightsError(
                f"The ImageNet weights for {name} at {target} could not be read ({exc}). Delete "
                f"the file and download it again from {weights.url}."
            ) from None
        raise WeightsError(
            f"The ImageNet weights for {name} are not cached and could not be downloaded "
            f"({type(exc).__name__}: {exc}). Download {weights.url} on a machine with internet "
            f"access and put it at {target} (the cache folder is {target.parent}, set by "
            f"TORCH_HOME), or pass --model.weights PATH with a torchvision-format .pth or "
            f".safetensors file or a tlfinetune checkpoint, or --model.weights none "
            f'(weights="none" in Python) to train from random initialisation.'
        ) from None
    except RuntimeError as exc:  # hash mismatch
        raise WeightsError(
            f"The ImageNet weights for {name} failed torchvision's check ({exc}). Delete {target} "
            f"and download it again."
        ) from None


def read_weights_file(path: str | Path) -> dict[str, Any]:
    """Read a ``.pth``/``.ckpt`` (safe unpickler only) or ``.safetensors`` file into a dict."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsError(
            f"Weights file {path} does not exist. Pass --model.weights with 'imagenet', 'none', "
            f"or the path of a torchvision-format .pth, a .safetensors file or a tlfinetune "
            f"checkpoint."
        )
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except (SafetensorError, OSError) as exc:
            raise WeightsError(
                f"Weights file {path} is not a readable safetensors file: {exc}"
            ) from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - the unpickler raises many types; all mean "refused"
        unsafe = "weights_only" in str(exc) or "Unsupported global" in str(exc)
        why = (
            "it holds pickled Python objects beyond tensors and plain containers, which could run "
            "code, so it was refused unread"
            if unsafe
            else f"it could not be read ({type(exc).__name__}: {str(exc).splitlines()[0]})"
        )
        raise WeightsError(
            f"Weights file {path} cannot be used: {why}. Convert it to a plain state dict or a "
            f".safetensors file."
        ) from None


def backbone_state_dict(
    raw: dict[str, Any], source: str | Path, name: str = "vgg16"
) -> dict[str, torch.Tensor]:
    """The backbone tensors of a torchvision state dict or a tlfinetune checkpoint, re-keyed."""
    if "state_dict" in raw and isinstance(raw["state_dict"], dict):  # a Lightning checkpoint
        tensors = raw["state_dict"]
        found = {k[9:]: v for k, v in tensors.items() if k.startswith("backbone.")}
        expected = "keys like backbone.0.weight"
    else:
        tensors = raw
        found = get_spec(name).split(raw)[0]
        first = next(iter(get_spec(name)._plan.keys.values()), "features.0.weight")
        expected = f"a torchvision {name} state dict (keys like {first})"
    if not found:
        some = ", ".join(list(tensors)[:4])
        raise WeightsError(
            f"Weights file {source} has no tensors of {name}'s backbone (it has e.g. {some}). "
            f"Expected {expected} or a tlfinetune checkpoint."
        )
    return found


def load_backbone_weights(
    backbone: nn.Module, name: str, state: dict[str, Any], source: str
) -> None:
    """Copy ``state`` into ``backbone``, or explain exactly which tensors do not fit."""
    own = backbone.state_dict()
    # Files saved before PyTorch 0.4.1 (torchvision's DenseNet, early ResNets) have no BatchNorm
    # step counters; BatchNorm's own loader starts them at 0.
    counters = {k: torch.zeros_like(v) for k, v in own.items() if k.endswith("num_batches_tracked")}
    state = {**{k: v for k, v in counters.items() if k not in state}, **state}
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or wrong:
        details = "; ".join(
            f"{label}: {', '.join(items[:3])}{' ...' if len(items) > 3 else ''}"
            for label, items in (("missing", missing), ("unexpected", unexpected), ("shape", wrong))
            if items
        )
        raise WeightsError(
            f"Weights from {source} do not fit backbone {name} ({details}). Choose the backbone "
            f"the file was made for with --model.backbone, or another weights file."
        )
    backbone.load_state_dict(state)


def weights_source(weights: str) -> str:
    """Normalise the ``weights`` argument: 'imagenet', 'none' or an existing file path."""
    if weights.lower() in ("imagenet", "none"):
        return weights.lower()
    return str(Path(weights).expanduser())


@dataclass(frozen=True)
class LoadedWeights:
    """What loading a backbone's weights tells the model.

    Attributes:
        origin: One line saying where the weights came from (logged, kept in checkpoints).
        classifier: The pretrained tensors outside the backbone (the classifier's), keyed as
            in the torchvision model (``"classifier.0.weight"``, ``"fc.weight"``), for the
            ``torchvision`` head; empty when the weights are random or come from a tlfinetune
            checkpoint (its head is not reused).
    """

    origin: str
    classifier: dict[str, torch.Tensor]


def load_weights(backbone: nn.Module, name: str, weights: str) -> LoadedWeights:
    """Load ``weights`` (``imagenet``, ``none`` or a file) into ``backbone``, built by ``name``.

    Raises:
        WeightsError: The weights cannot be read, or do not fit the backbone.
    """
    source = weights_source(weights)
    if source == "none":
        return LoadedWeights("none (random initialisation)", {})
    if source == "imagenet":
        raw, origin = load_imagenet_state_dict(name), f"imagenet ({imagenet_cache_file(name)})"
    else:
        raw, origin = read_weights_file(source), source
    load_backbone_weights(backbone, name, backbone_state_dict(raw, source, name), source)
    if "state_dict" in raw:  # a tlfinetune checkpoint: its head is for other classes
        return LoadedWeights(origin, {})
    return LoadedWeights(origin, get_spec(name).split(raw)[1])


def feature_shape(backbone: nn.Module, name: str, image_size: int) -> tuple[int, int, int]:
    """``(C, H, W)`` of the feature map ``backbone`` makes from ``image_size`` images.

    Measured with a zero image, as Keras derives it, rather than computed from the architecture
    (on the meta device: :func:`probe_shape`).
    """
    try:
        c, h, w = probe_shape(backbone, image_size)[1:]
    except RuntimeError:  # the image shrank to nothing inside, or the network is broken
        if smallest_image_size(backbone, image_size + 1) is None:
            raise  # no size works: not a question of size
        c = h = w = 0
    if h == 0 or w == 0:
        smallest = smallest_image_size(backbone, image_size + 1)
        need = f"at least {smallest}" if smallest is not None else "a larger image_size"
        raise ConfigError(
            f"image_size {image_size} is too small for the backbone {name}: its pooling and "
            "strided layers shrink the image until nothing is left of it. It needs "
            f"{need}; set --data.image_size (data.image_size in a YAML config) to that or "
            "more (pretrained weights work best near the size they were trained at)."
        )
    return int(c), int(h), int(w)


def _fits(module: nn.Module, image_size: int) -> bool:
    """Whether ``module`` makes a feature map of at least 1x1 from ``image_size`` images."""
    try:
        return min(probe_shape(module, image_size)[2:]) > 0
    except RuntimeError:
        return False


def smallest_image_size(module: nn.Module, start: int = 1, limit: int = 2048) -> int | None:
    """The smallest square image size from ``start`` on that ``module`` accepts, ``None`` if none.

    Doubles the size until one works, then bisects back (on the meta device, so a VGG16 takes
    some milliseconds per try). Assumes that sizes above one that works work too.
    """
    lo, hi = start - 1, max(start, 1)
    while not _fits(module, hi):
        if hi >= limit:
            return None
        lo, hi = hi, min(2 * hi, limit)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if _fits(module, mid) else (mid, hi)
    return hi


def probe_shape(module: nn.Module, image_size: int) -> torch.Size:
    """The shape of :func:`probe`'s output, found without its arithmetic.

    The module runs on the meta device (parameters and buffers swapped for meta tensors of the
    same shape, as in inference): shapes only, no numbers. A VGG16 probe at 224 px took 0.4-1 s
    of a 2-core CPU, twice per fit (the head's input, the feature cache's size). A module that
    cannot run there (an operation without a meta kernel) is probed for real.
    """
    tensors = {
        name: t.to("meta")
        for name, t in itertools.chain(module.named_parameters(), module.named_buffers())
    }
    modes = [(m, m.training) for m in module.modules()]
    try:
        with torch.no_grad():
            image = torch.zeros(1, 3, image_size, image_size, device="meta")
            return torch.func.functional_call(module.eval(), tensors, (image,)).shape
    except Exception:  # noqa: BLE001 - any failure on meta: the real probe says what is wrong
        return probe(module, image_size).shape
    finally:
        for m, training in modes:
            m.training = training


def probe(module: nn.Module, image_size: int) -> torch.Tensor:
    """``module``'s output for one zero image, run as in inference, modes left as they were.

    In training mode the probe would move BatchNorm's running statistics towards a zero image's,
    and BatchNorm refuses a batch of one 1x1 map.
    """
    modes = [(m, m.training) for m in module.modules()]
    device = next(module.parameters()).device
    try:
        with torch.no_grad():
            return module.eval()(torch.zeros(1, 3, image_size, image_size, device=device))
    finally:
        for m, training in modes:
            m.training = training
