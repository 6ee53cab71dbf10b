"""``python -m tlfinetune backbones [NAME]``: the supported backbones, or one of them in detail.

Without a name: one line per backbone (family, parameters, ImageNet top-1 of torchvision's
DEFAULT weights, their input size, default head, the stage ``partial`` trains from), read from
the weights enums' metadata, so nothing is built or downloaded. With a name: its stages with
their units, torchvision module paths and parameter counts, and its weights' preprocessing
(read from the weights enum's ``DEFAULT.transforms()``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from jsonargparse import ArgumentParser

from tlfinetune import backbone as bb
from tlfinetune.transforms import weights_preprocessing


def backbones_parser() -> ArgumentParser:
    """The arguments of ``tlfinetune backbones``."""
    parser = ArgumentParser(
        prog="tlfinetune backbones",
        description="List the supported backbones, or describe one: its stages (the names "
        "--freeze.unfreeze_from takes) with parameter counts, its weights' preprocessing and "
        "its default head.",
    )
    parser.add_argument("name", type=str | None, nargs="?", help="a backbone, e.g. resnet50")
    return parser


def top1(name: str) -> float | None:
    """ImageNet top-1 accuracy (%) of ``name``'s DEFAULT weights, from torchvision's metadata."""
    enum = bb.get_spec(name).weights_enum
    if enum is None:
        return None
    return enum.DEFAULT.meta.get("_metrics", {}).get("ImageNet-1K", {}).get("acc@1")


def listing() -> str:
    """One line per supported backbone (test-only stand-ins left out)."""
    rows = [("backbone", "family", "params", "top-1", "input", "default head")]
    for name, spec in bb.BACKBONES.items():
        if name.startswith("test_"):
            continue
        meta = spec.weights_enum.DEFAULT.meta
        crop = weights_preprocessing(spec.weights_enum).crop_size
        rows.append(
            (
                name,
                bb.family_name(name),
                f"{meta['num_params'] / 1e6:.1f}M",
                f"{top1(name):.1f}",
                f"{crop} px",
                spec.default_head,
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return (
        "\n".join(lines)
        + "\n\nparams: the whole ImageNet model; top-1: ImageNet-1K accuracy (%) of torchvision's "
        "DEFAULT weights; input: their crop size. `python -m tlfinetune backbones NAME` shows "
        "NAME's stages, the names --freeze.unfreeze_from takes."
    )


def describe(name: str) -> str:
    """Stages with units, paths and parameter counts; weights and preprocessing; default head."""
    spec = bb.get_spec(name)
    backbone = spec.features()
    stages: dict[str, dict[str, Any]] = {}
    for layer in spec.layers:
        if spec.family is None and layer.keras_index == 0:
            continue  # VGG's input_1 is no module
        row = stages.setdefault(layer.block, {"units": [], "paths": [], "params": 0})
        row["units"].append(layer.keras_name)
        row["paths"].append(layer.path or f"features.{layer.index}")
    for i, module in enumerate(backbone):
        stages[bb.block_of(name, i)]["params"] += sum(p.numel() for p in module.parameters())
    total = sum(row["params"] for row in stages.values())
    out = [f"{name} ({bb.family_name(name)}): backbone {total:,} parameters in {len(backbone)} "]
    out[0] += "modules (Keras layers for VGG)" if spec.family is None else "units"
    out.append("")
    width = max(len("stage"), *(len(s) for s in stages)) + 2
    out.append(f"{'stage':<{width}}{'params':>11}  units (torchvision paths)")
    for stage, row in stages.items():
        units, paths = row["units"], row["paths"]
        span = units[0] if len(units) == 1 else f"{units[0]} .. {units[-1]}"
        where = paths[0] if len(paths) == 1 else f"{paths[0]} .. {paths[-1]}"
        out.append(f"{stage:<{width}}{row['params']:>11,}  {span} ({where})")
    if spec.family is None:
        also = ", a Keras layer name or index"
    else:
        also = ", an encoder layer number" if any(x.keras_index >= 0 for x in spec.layers) else ""
    out += [
        "",
        f"--freeze.unfreeze_from takes a stage, a unit, a torchvision path{also}; the partial "
        f"regime trains from {spec.partial} on.",
        f"Default head: {spec.default_head}; --model.head torchvision is the model's own "
        f"classifier with a new last layer.",
    ]
    if spec.weights_enum is None:
        out.append("Weights: none (a test-only stand-in).")
    else:
        weights = spec.weights_enum.DEFAULT
        prep = weights_preprocessing(spec.weights_enum)
        out += [
            f"Weights (imagenet): {type(weights).__name__}.{weights.name}, ImageNet top-1 "
            f"{top1(name):.1f}%, {weights.url}",
            f"Preprocessing: resize the shorter side to {prep.resize_size} px "
            f"({prep.interpolation}{', antialias' if prep.antialias else ''}), centre-crop "
            f"{prep.crop_size} px, normalise with mean {list(prep.mean)} and std "
            f"{list(prep.std)}.",
        ]
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> None:
    """``tlfinetune backbones [NAME]``."""
    args = backbones_parser().parse_args(None if argv is None else list(argv))
    print(describe(args.name) if args.name else listing())
