"""Imbalanced classes: images per class, the class-imbalance warning, loss weights from counts.

The datamodule owns the counts (:attr:`~tlfinetune.data.ImageDataModule.class_counts`); the
model turns them into cross-entropy weights (``--model.class_weights``) and the datamodule into
a balanced sampler (``--data.sampler balanced``, :class:`~tlfinetune.sampling.BalancedSampler`).
Everything here is plain arithmetic on counts, so it is the one place that says what "balanced"
means.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

from tlfinetune.errors import ConfigError

__all__ = [
    "IMBALANCE_RATIO",
    "ClassWeights",
    "balanced_weights",
    "count_labels",
    "imbalance_warning",
    "per_class_counts_table",
    "resolve_class_weights",
]

ClassWeights = Literal["auto"] | list[float] | None
"""``--model.class_weights``: ``auto`` (inverse frequency), one float per class, or none."""

IMBALANCE_RATIO = 3.0
"""Largest over smallest training class above which the data summary warns."""

_TABLE_ROWS = 20  # classes listed one per line in the summary; beyond that, the extremes


def count_labels(labels: Sequence[int], num_classes: int) -> list[int]:
    """Images per class (label ``c`` at position ``c``); labels outside the range are ignored."""
    counts = [0] * num_classes
    for label in labels:
        if 0 <= label < num_classes:
            counts[label] += 1
    return counts


def balanced_weights(counts: Sequence[int]) -> list[float]:
    """Inverse-frequency weights ``n_samples / (n_classes * count_c)`` (Keras' ``balanced``).

    A class of average size gets 1.0, a class ten times rarer than another ten times its weight,
    so the weighted loss gives every class the same total weight. A class without images gets 0
    (it contributes no loss term anyway).
    """
    total, c = sum(counts), len(counts)
    return [total / (c * n) if n > 0 else 0.0 for n in counts]


def resolve_class_weights(
    spec: ClassWeights, num_classes: int, counts: Sequence[int] | None
) -> list[float] | None:
    """The loss weights ``--model.class_weights`` asks for, one per class, or ``None``.

    Args:
        spec: ``"auto"``, a list of floats, or ``None``.
        num_classes: Number of classes of the model.
        counts: Training images per class (needed for ``"auto"``).

    Raises:
        ConfigError: A list of the wrong length or with negative values, an unknown string, or
            ``"auto"`` without counts.
    """
    if spec is None:
        return None
    if isinstance(spec, str):
        if spec != "auto":
            raise ConfigError(
                f"--model.class_weights {spec!r}: give auto (inverse class frequency of the "
                "training images) or a list of one weight per class, e.g. [1.0, 5.0]."
            )
        if counts is None:
            raise ConfigError(
                "--model.class_weights auto needs the number of training images per class, but "
                "the datamodule does not say it (no class_counts). Use an ImageDataModule, or "
                "give the weights as a list of one float per class."
            )
        if len(counts) != num_classes:
            raise ConfigError(f"{len(counts)} class counts for a model with {num_classes} classes.")
        return balanced_weights(counts)
    weights = [float(w) for w in spec]
    if len(weights) != num_classes:
        raise ConfigError(
            f"--model.class_weights has {len(weights)} values but the model has {num_classes} "
            f"classes; give one weight per class in label order, or auto."
        )
    if any(w < 0 for w in weights) or not any(w > 0 for w in weights):
        raise ConfigError(
            f"--model.class_weights {weights}: weights must be non-negative and not all zero."
        )
    return weights


def per_class_counts_table(class_names: Sequence[str], counts: Mapping[str, Sequence[int]]) -> str:
    """Images per class and split, one line per class (``-`` where a split is absent).

    With more than 20 classes only the smallest and largest training classes are listed.
    """
    splits = list(counts)
    train = counts.get("train") or next(iter(counts.values()))
    order = list(range(len(class_names)))
    if len(order) > _TABLE_ROWS:
        by_size = sorted(order, key=lambda i: (train[i], i))
        half = _TABLE_ROWS // 2
        order = by_size[:half] + by_size[-half:]
    width = max(len(class_names[i]) for i in order) + 2
    lines = [f"  {'class':<{width}}" + "".join(f"{s:>8}" for s in splits)]
    for n, i in enumerate(order):
        if len(class_names) > _TABLE_ROWS and n == _TABLE_ROWS // 2:
            lines.append(f"  ... {len(class_names) - _TABLE_ROWS} classes in between ...")
        lines.append(f"  {class_names[i]:<{width}}" + "".join(f"{counts[s][i]:>8}" for s in splits))
    return "\n".join(lines)


def imbalance_warning(class_names: Sequence[str], train_counts: Sequence[int]) -> str | None:
    """The warning for training classes more than 3x apart in size, or ``None``."""
    present = [(n, name) for name, n in zip(class_names, train_counts, strict=True) if n > 0]
    if len(present) < 2:
        return None
    smallest, largest = min(present), max(present)
    if largest[0] <= IMBALANCE_RATIO * smallest[0]:
        return None
    return (
        f"Imbalanced classes: the largest training class, {largest[1]} ({largest[0]} images), "
        f"has {largest[0] / smallest[0]:.1f}x the images of the smallest, {smallest[1]} "
        f"({smallest[0]}). A model can then score well by favouring the large classes. "
        "--model.class_weights auto weights the loss by inverse class frequency, "
        "--data.sampler balanced draws every class equally often; the validate/test reports "
        "show per-class recall and balanced accuracy."
    )
