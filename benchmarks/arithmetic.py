"""The arithmetic of a training step, counted, so that a cached epoch's time has a floor to meet.

A feature cache skips the frozen prefix of the backbone (``backbone[:start]``); what still runs
is the rest of the backbone and the head, forward and backward. How far below an uncached epoch
a cached one can go is fixed by how much of the step's arithmetic that prefix is. This counts
multiply-accumulates (MACs) of the convolutions and linear layers, the work that dominates
these networks (the counting of torchvision's ``weights.meta["_ops"]``):

- a frozen layer before the first trainable one: its forward;
- every later layer: its forward, its weight gradient when its weight trains, and its input
  gradient when some layer before it trains (the first trainable layer's input needs none).

The result is a ratio of arithmetic, not a time: kernels of different shapes run at different
speeds (on the Xeon with AMX, bf16, block5's weight gradient runs at about half its forward's
rate), so a measured ratio sits above this floor. Attention's own matrix products, in
``nn.MultiheadAttention``, are not counted: for ViT the floor is approximate.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["StepArithmetic", "step_arithmetic"]


def _layer_macs(layer: nn.Module, out: torch.Tensor) -> int:
    """Forward MACs of one image through a convolution or linear layer, from its output."""
    per_image = out.numel() // out.shape[0]
    if isinstance(layer, nn.modules.conv._ConvNd):
        return per_image * layer.in_channels // layer.groups * math.prod(layer.kernel_size)
    return per_image * layer.in_features  # nn.Linear


def forward_macs(modules: list[nn.Module], x: torch.Tensor) -> list[tuple[nn.Module, int]]:
    """(layer, forward MACs per image) of each convolution and linear layer, in forward order.

    Runs ``modules`` one after another on ``x`` (on the meta device, so nothing is computed);
    a layer called twice is listed twice.
    """
    seen: list[tuple[nn.Module, int]] = []

    def hook(layer: nn.Module, _args: object, out: torch.Tensor) -> None:
        seen.append((layer, _layer_macs(layer, out)))

    handles = [
        layer.register_forward_hook(hook)
        for module in modules
        for layer in module.modules()
        if isinstance(layer, nn.modules.conv._ConvNd | nn.Linear)
    ]
    try:
        with torch.no_grad():
            for module in modules:
                x = module(x)
    finally:
        for handle in handles:
            handle.remove()
    return seen


@dataclass(frozen=True)
class StepArithmetic:
    """MACs per image of one training step, split where a feature cache would start."""

    prefix: int  # forward of the frozen backbone[:start], what a cache skips
    rest: int  # forward + backward of backbone[start:] and the head

    @property
    def cached_share(self) -> float:
        """A cached step's arithmetic over an uncached one's: the floor of their time ratio."""
        return self.rest / (self.prefix + self.rest)


def step_arithmetic(backbone: nn.Sequential, head: nn.Module, image_size: int) -> StepArithmetic:
    """Count a training step of ``head(backbone(x))`` with the layers' current ``requires_grad``.

    ``start`` is the first child of ``backbone`` with a trainable parameter, as the feature cache
    (``tlfinetune.cache``) picks it. Example, the seed's fine-tuning (block5 and the head train,
    VGG16 at 224 px): the step's rest is 20.9 % of its arithmetic.
    """
    children = list(backbone)
    start = next(
        (i for i, c in enumerate(children) if any(p.requires_grad for p in c.parameters())),
        len(children),
    )
    trains = {id(p) for p in [*backbone.parameters(), *head.parameters()] if p.requires_grad}
    modules = [copy.deepcopy(m).to("meta") for m in (backbone[:start], backbone[start:], head)]
    for original, clone in zip((backbone[:start], backbone[start:], head), modules, strict=True):
        for p, q in zip(original.parameters(), clone.parameters(), strict=True):
            q.requires_grad_(id(p) in trains)
    x = torch.empty(1, 3, image_size, image_size, device="meta")
    layers = forward_macs(modules, x)
    in_prefix = {id(m) for m in modules[0].modules()}
    prefix = sum(macs for layer, macs in layers if id(layer) in in_prefix)
    rest, upstream_trains = 0, False
    for layer, macs in layers:
        if id(layer) in in_prefix:
            continue
        weight_trains = layer.weight.requires_grad
        rest += macs * (1 + weight_trains + upstream_trains)
        upstream_trains = upstream_trains or any(p.requires_grad for p in layer.parameters())
    return StepArithmetic(prefix, rest)
