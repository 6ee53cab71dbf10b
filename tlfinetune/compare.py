"""``python -m tlfinetune compare``: train each regime under the same budget and compare them.

The seed leaves the choice between transfer learning and fine-tuning to "experimentation and
evaluation". This runs that experiment on the user's own data: the same fit (config, epochs,
data, seed) once per regime, each in its own process (so peak memory is its own), and writes
``comparison.csv``, ``comparison.md`` and ``comparison.png`` under ``trainer.default_root_dir``
with trainable parameters, seconds per epoch, peak memory, best validation accuracy and loss.

Example:
    python -m tlfinetune compare --config configs/quickstart.yaml --regimes frozen,partial,full
"""

from __future__ import annotations

import csv
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import yaml

from tlfinetune.errors import ConfigError
from tlfinetune.freeze import count_parameters

REGIMES = ("frozen", "partial", "full")
COLUMNS = (
    "regime",
    "trainable_params",
    "frozen_params",
    "epochs",
    "seconds_per_epoch",
    "peak_memory_mb",
    "best_val_acc",
    "best_val_loss",
)


class RegimeStats(pl.Callback):
    """Measures one fit for the comparison and writes the numbers to ``output`` (JSON).

    Args:
        output: JSON file that receives the measurements.
        regime: name of the regime being measured.
    """

    def __init__(self, output: str, regime: str) -> None:
        self.output, self.regime = output, regime
        self._epoch_start = 0.0
        self.seconds: list[float] = []
        self.val: list[tuple[float, float]] = []

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: Any) -> None:  # noqa: D102
        self._epoch_start = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: Any) -> None:  # noqa: D102
        self.seconds.append(time.perf_counter() - self._epoch_start)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: Any) -> None:  # noqa: D102
        m = trainer.callback_metrics
        if not trainer.sanity_checking and "val/acc" in m:
            self.val.append((float(m["val/acc"]), float(m["val/loss"])))

    def on_fit_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        """Write the row for this regime (rank 0 only)."""
        if not trainer.is_global_zero:
            return
        trainable, frozen = count_parameters(pl_module)
        if torch.cuda.is_available() and pl_module.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(pl_module.device) / 2**20
        else:  # ru_maxrss is in KiB on Linux: the whole process, Python and torch included
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        row = {
            "regime": self.regime,
            "trainable_params": trainable,
            "frozen_params": frozen,
            "epochs": len(self.seconds),
            "seconds_per_epoch": round(sum(self.seconds) / max(len(self.seconds), 1), 2),
            "peak_memory_mb": round(peak, 1),
            "best_val_acc": round(max((a for a, _ in self.val), default=float("nan")), 4),
            "best_val_loss": round(min((v for _, v in self.val), default=float("nan")), 4),
        }
        Path(self.output).write_text(json.dumps(row))


def _root_dir(args: list[str]) -> Path:
    """``trainer.default_root_dir`` as the fit would resolve it: flags after config files."""
    root: str | None = None
    for i, arg in enumerate(args):
        key, _, value = arg.partition("=")
        if not value and i + 1 < len(args):
            value = args[i + 1]
        if key in ("--config", "-c") and Path(value).is_file():
            config = yaml.safe_load(Path(value).read_text()) or {}
            root = (config.get("trainer") or {}).get("default_root_dir", root)
        elif key == "--trainer.default_root_dir":
            root = value
    return Path(root or "runs")


def _split_regimes(argv: list[str]) -> tuple[list[str], list[str]]:
    regimes, rest, i = list(REGIMES), [], 0
    while i < len(argv):
        key, eq, value = argv[i].partition("=")
        if key == "--regimes":
            if not eq:
                i += 1
                value = argv[i] if i < len(argv) else ""
            regimes = [r.strip() for r in value.split(",") if r.strip()]
        else:
            rest.append(argv[i])
        i += 1
    bad = [r for r in regimes if r not in REGIMES]
    if bad or not regimes:
        raise ConfigError(f"--regimes {','.join(regimes)}: choose from {', '.join(REGIMES)}.")
    return regimes, rest


def compare(argv: list[str]) -> list[dict[str, Any]]:
    """Run one fit per regime with the same arguments; return and write the comparison."""
    regimes, fit_args = _split_regimes(argv)
    root = _root_dir(fit_args)
    rows = []
    for regime in regimes:
        out = root / "compare" / regime
        out.mkdir(parents=True, exist_ok=True)
        stats = out / "stats.json"
        stats.unlink(missing_ok=True)
        callback = {
            "class_path": "tlfinetune.compare.RegimeStats",
            "init_args": {"output": str(stats), "regime": regime},
        }
        cmd = [
            sys.executable, "-m", "tlfinetune", "fit", *fit_args,
            f"--freeze.regime={regime}",
            "--freeze.milestones=null",  # each regime as itself, no schedule between them
            f"--trainer.default_root_dir={out}",
            f"--trainer.callbacks+={json.dumps(callback)}",
        ]  # fmt: skip
        print(f"compare: training regime {regime} ...", flush=True)
        done = subprocess.run(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        if done.returncode != 0 or not stats.is_file():
            raise ConfigError(
                f"compare: the {regime} run failed (exit {done.returncode}); its output is "
                f"above and its folder is {out}."
            )
        rows.append(json.loads(stats.read_text()))
    write_comparison(rows, root)
    return rows


def write_comparison(rows: list[dict[str, Any]], root: Path) -> None:
    """``comparison.csv``, ``comparison.md`` and ``comparison.png`` under ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "comparison.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += [
        "| "
        + " | ".join(f"{r[c]:,}" if isinstance(r[c], int) else str(r[c]) for c in COLUMNS)
        + " |"
        for r in rows
    ]  # noqa: E501
    (root / "comparison.md").write_text("\n".join(lines) + "\n")
    plot_comparison(rows).savefig(root / "comparison.png", dpi=100)
    print("\n".join(lines))
    print(f"\nComparison written to {root / 'comparison.csv'}, .md and .png")


def plot_comparison(rows: list[dict[str, Any]]) -> Any:
    """Bars per regime: best val accuracy, seconds per epoch, trainable parameters."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 3.4), layout="constrained")
    names = [r["regime"] for r in rows]
    panels = [
        ("best_val_acc", "best val accuracy"),
        ("seconds_per_epoch", "seconds per epoch"),
        ("trainable_params", "trainable parameters"),
        ("peak_memory_mb", "peak memory (MB)"),
    ]
    for ax, (key, title) in zip(fig.subplots(1, len(panels)), panels, strict=True):
        values = [r[key] for r in rows]
        bars = ax.bar(names, values, color=["#4c72b0", "#dd8452", "#55a868"][: len(rows)])
        ax.bar_label(bars, labels=[f"{v:,.3g}" for v in values], fontsize=8)
        ax.set_title(title, fontsize=10)
    return fig


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``python -m tlfinetune compare``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return
    compare(argv)
