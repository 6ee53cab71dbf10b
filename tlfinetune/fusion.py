"""The backbone's layers without autograd, each Conv2d + ReLU pair as one oneDNN kernel on CPU.

A frozen VGG runs its 13 convolutions without a graph in every first epoch, every validation
and every prediction. Run one module at a time, each ReLU reads and writes the convolution's
whole output again: a fifth of the forward at 224 px in bf16 on a CPU. oneDNN applies the ReLU
inside the convolution kernel instead (a "post-op", what ``torch.compile`` does on CPU), and the
result is bit for bit the same, because rounding commutes with ``max(0, x)``: the convolution
accumulates in fp32 either way, and bf16(max(0, acc)) == max(0, bf16(acc)).

:func:`run` is ``layers(x)`` with that one change. It fuses a pair only where nothing else
could tell the difference (see :func:`_fusable`), and otherwise calls the modules as usual, so
forward hooks (the feature cache's among them) still fire on every module that has one.

>>> import torch
>>> from torch import nn
>>> layers = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
>>> x = torch.randn(2, 3, 16, 16)
>>> with torch.no_grad():
...     torch.equal(run(layers, x), layers(x))
True
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["run"]


def _supported() -> bool:
    return (
        torch.backends.mkldnn.is_available()
        and torch.backends.mkldnn.enabled
        and hasattr(torch.ops.mkldnn, "_convolution_pointwise")
    )


def _compute_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype the convolution computes in here, or None where fusion is not proven exact.

    Under CPU autocast a convolution runs in autocast's dtype (Lightning's ``bf16-mixed``);
    without it, in the input's. fp16 autocast and float64 keep the modules' own path.
    """
    if torch.is_autocast_enabled("cpu"):
        dtype = torch.get_autocast_dtype("cpu")
        return dtype if dtype == torch.bfloat16 else None
    return x.dtype if x.dtype in (torch.float32, torch.bfloat16) else None


def _hooked(module: nn.Module) -> bool:
    # nn.Module keeps its hooks in these dicts; a hooked module must run as itself.
    return bool(module._forward_hooks or module._forward_pre_hooks)


def _fusable(conv: nn.Module, relu: nn.Module, dtype: torch.dtype) -> bool:
    return (
        type(conv) is nn.Conv2d  # a subclass may change forward
        and type(relu) is nn.ReLU
        and conv.padding_mode == "zeros"
        and not isinstance(conv.padding, str)
        and conv.weight.device.type == "cpu"
        # without autocast the weights must already be in the input's dtype, as conv2d demands
        and (torch.is_autocast_enabled("cpu") or conv.weight.dtype == dtype)
        and not _hooked(conv)
        and not _hooked(relu)
    )


def _tracing() -> bool:
    # Export (torch.export, the legacy ONNX tracer) must record the standard operators.
    return torch.jit.is_tracing() or torch.compiler.is_compiling()


def run(layers: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """``layers(x)``, with each fusable Conv2d + ReLU pair as one oneDNN convolution.

    Fuses only when no gradient is recorded, on CPU, in fp32 or bf16 (bf16-mixed autocast
    included), outside tracing and export, with no global module hooks; otherwise this is
    exactly ``layers(x)``.
    """
    dtype = _compute_dtype(x) if isinstance(x, torch.Tensor) else None
    if (
        dtype is None
        or torch.is_grad_enabled()
        or x.device.type != "cpu"
        or x.dim() != 4
        or _tracing()
        or not _supported()
        or nn.modules.module._global_forward_hooks
        or nn.modules.module._global_forward_pre_hooks
        or layers._forward_hooks
        or layers._forward_pre_hooks
    ):
        return layers(x)
    modules = list(layers)
    i = 0
    while i < len(modules):
        conv = modules[i]
        relu = modules[i + 1] if i + 1 < len(modules) else None
        if relu is not None and _fusable(conv, relu, dtype):
            bias = None if conv.bias is None else conv.bias.to(dtype)
            x = torch.ops.mkldnn._convolution_pointwise(
                x.to(dtype), conv.weight.to(dtype), bias,
                conv.padding, conv.stride, conv.dilation, conv.groups,
                "relu", [], "",
            )  # fmt: skip
            i += 2
        else:
            x = conv(x)
            i += 1
    return x
