"""Where a cached step of the seed's fine-tuning goes at 224 px, kernel by kernel (issue 18).

In the ``partial`` regime (block5 and the head train) later epochs start from the feature
cache's block-4 output, bf16 (32, 512, 14, 14) at 224 px: a step is block5's three
convolutions with their ReLUs and the last max-pool, the seed's Flatten head, the loss, their
backward, and fused Adam over the 13.5 M trainable parameters. This measures, in one process
(medians over ``--steps``, bf16 autocast, channels-last, as ``TransferClassifier`` runs it):

- each of block5's convolutions alone: forward, backward for the weights only (the first one:
  its input is cached and needs no gradient), backward for data and weights (the other two);
- the whole step, and its forward and forward + backward alone;
- with ``--profile``, ``torch.profiler``'s operators over five steps;
- the step's arithmetic (``arithmetic.py``) and the share of an uncached step it is at least.

The sum of the convolutions' kernels is what no implementation of this step avoids; the
benchmark README compares it with the whole step and with the uncached epoch.

    python benchmarks/partial_step.py --steps 15
"""

from __future__ import annotations

import torch
from arithmetic import step_arithmetic
from cached_step import median_ms
from jsonargparse import CLI

from tlfinetune import TransferClassifier
from tlfinetune.machine import keep_freed_memory

BATCH, CLASSES = 32, 5
START = 24  # block5_conv1: the seed's layers[15:] (benchmarks/README: Keras layers)


def _convolutions(
    block5: torch.nn.Sequential, x: torch.Tensor, steps: int
) -> list[tuple[str, float, float]]:
    """(what, forward ms, backward ms) of each convolution alone, on the input it sees in a step."""
    rows = []
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        h = x
        for i, layer in enumerate(block5):
            if isinstance(layer, torch.nn.Conv2d):
                w = layer.weight.to(torch.bfloat16)
                grad = torch.randn_like(layer(h))
                first = i == 0  # its input comes from the cache: no gradient for it

                def backward(h=h, w=w, grad=grad, first=first, layer=layer) -> None:
                    torch.ops.aten.convolution_backward(
                        grad, h, w, [layer.out_channels], list(layer.stride),
                        list(layer.padding), list(layer.dilation), False, [0, 0], 1,
                        [not first, True, True],
                    )  # fmt: skip

                what = f"conv {START + i}, backward for {'weights' if first else 'data + weights'}"
                forward_ms = median_ms(lambda layer=layer, h=h: layer(h), steps)
                rows.append((what, forward_ms, median_ms(backward, steps)))
            h = layer(h)
    return rows


def main(steps: int = 15, profile: bool = True) -> None:
    """Print the kernels of block5, the step, and with ``profile`` the operators of five steps.

    Args:
        steps: steps per median.
        profile: also print torch.profiler's table over five whole steps.
    """
    torch.manual_seed(0)
    model = TransferClassifier(
        num_classes=CLASSES, backbone="vgg16", weights="none", image_size=224, head="flatten",
        head_hidden=256, feature_cache=False,
    )  # fmt: skip
    model.backbone[:START].requires_grad_(False)  # the partial regime
    arithmetic = step_arithmetic(model.backbone, model.head, 224)
    block5 = model.backbone[START:].to(memory_format=torch.channels_last)
    head = model.head
    params = [*block5.parameters(), *head.parameters()]
    optimizer = torch.optim.Adam(params, lr=1e-4, fused=True)
    x = torch.randn(BATCH, 512, 14, 14).to(torch.bfloat16)
    x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, CLASSES, (BATCH,))

    def loss() -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return torch.nn.functional.cross_entropy(head(block5(x)).float(), y)

    def forward() -> None:
        with torch.no_grad():
            loss()

    def forward_backward() -> None:
        loss().backward()
        optimizer.zero_grad(set_to_none=True)

    def step() -> None:
        loss().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; block5 + head from the "
          f"cached block-4 output {tuple(x.shape)} bf16, batch {BATCH}:")  # fmt: skip
    kernels = 0.0
    for what, forward_ms, backward_ms in _convolutions(block5, x, steps):
        print(f"  {what:40s} forward {forward_ms:5.1f} ms, backward {backward_ms:5.1f} ms")
        kernels += forward_ms + backward_ms
    whole = median_ms(step, steps)
    print(f"  forward alone (no graph)      {median_ms(forward, steps):6.1f} ms")
    print(f"  forward + backward            {median_ms(forward_backward, steps):6.1f} ms")
    print(f"  whole step (+ fused Adam)     {whole:6.1f} ms   {BATCH / whole * 1000:.0f} img/s")
    print(
        f"  block5's convolution kernels  {kernels:6.1f} ms   ({kernels / whole:.0%} of the step)"
    )
    print(
        f"  arithmetic: {arithmetic.rest * BATCH / 1e9:.1f} GMAC a step, "
        f"{arithmetic.rest * BATCH / whole / 1e9:.2f} TMAC/s; an uncached step adds "
        f"{arithmetic.prefix * BATCH / 1e9:.1f} GMAC of frozen forward, so a cached step is at "
        f"least {arithmetic.cached_share:.1%} of it"
    )
    if profile:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(5):
                step()
        print("\nFive steps, operators by self CPU time:")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14))


if __name__ == "__main__":
    keep_freed_memory()  # as tlfinetune's command runs
    CLI(main, as_positional=False)
