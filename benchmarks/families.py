"""Forward speed of one model per backbone family at its weights' input size, on this machine.

The no_grad forward of the backbone (what the frozen regime's first epoch and the feature cache
pay per image), channels-last, at the precision ``fastest_precision`` picks here, batch 16,
random weights (speed does not depend on them). Prints images/s and the ratio to VGG16; README's
family table quotes the ratios.

    python benchmarks/families.py --backbones vgg16,resnet50,efficientnet_b0
"""

from __future__ import annotations

import time

import torch
from jsonargparse import CLI

from tlfinetune import backbone as bb
from tlfinetune import fastest_precision
from tlfinetune.transforms import weights_preprocessing

DEFAULT = (
    "vgg16,resnet50,efficientnet_b0,mobilenet_v3_large,convnext_tiny,regnet_y_1_6gf,"
    "densenet121,vit_b_16,swin_t"
)


def forward_images_per_second(
    name: str, batch: int, rounds: int, dtype: torch.dtype | None, size: int | None = None
) -> tuple[float, int]:
    """Median images/s of ``rounds`` no_grad forwards of ``batch`` images (after one warm-up)."""
    model = bb.build_backbone(name).eval().to(memory_format=torch.channels_last)
    size = size or weights_preprocessing(bb.get_spec(name).weights_enum).crop_size
    x = torch.rand(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    times = []
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype or torch.float32, enabled=bool(dtype)):
        for i in range(rounds + 1):
            start = time.perf_counter()
            model(x)
            if i:  # the first round warms up oneDNN's kernels
                times.append(time.perf_counter() - start)
    return batch / sorted(times)[len(times) // 2], size


def families(
    backbones: str = DEFAULT, batch: int = 16, rounds: int = 3, image_size: int | None = None
) -> None:
    """Print forward images/s per backbone and the ratio to the first one.

    Args:
        backbones: Comma-separated backbone names; the first is the reference.
        batch: Images per forward.
        rounds: Timed forwards per backbone (the median is reported).
        image_size: Side of the images; default each weights' crop size.
    """
    precision = fastest_precision("cpu")
    dtype = torch.bfloat16 if precision == "bf16-mixed" else None
    print(f"precision {precision}, batch {batch}, {torch.get_num_threads()} threads")
    reference = None
    for name in backbones.split(","):
        speed, size = forward_images_per_second(name, batch, rounds, dtype, image_size)
        reference = reference or speed
        print(f"{name:20} {size:4d} px {speed:8.1f} img/s  {speed / reference:5.2f}x")


if __name__ == "__main__":
    CLI(families)
