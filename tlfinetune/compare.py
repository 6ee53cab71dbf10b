"""``python -m tlfinetune compare``: train each regime under the same budget and compare them.

The seed leaves the choice between transfer learning and fine-tuning to "experimentation and
evaluation". This runs that experiment on the user's own data: the same fit (config, epochs,
data, seed) once per backbone and regime, each in its own process (so peak memory is its own),
and writes ``comparison.csv``, ``comparison.md`` and ``comparison.png`` under
``trainer.default_root_dir`` (numbered ``comparison.1.csv``... when an earlier comparison is
there, which is kept) with trainable parameters, seconds per epoch, peak memory, best
validation accuracy and loss. Each backbone prepares images with its own weights' preset (and
takes its crop size as image size unless ``--data.image_size`` sets one for all).

Example:
    python -m tlfinetune compare --config configs/quickstart.yaml --regimes frozen,partial,full
    python -m tlfinetune compare --config configs/quickstart.yaml --backbones vgg16,resnet50
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from jsonargparse import Namespace
from lightning.pytorch.cli import LightningArgumentParser

from tlfinetune import backbone as bb
from tlfinetune.cli import TLFinetuneCLI, prog_name
from tlfinetune.errors import ConfigError
from tlfinetune.freeze import REGIMES, count_parameters
from tlfinetune.machine import peak_rss_mb
from tlfinetune.runs import free_number, numbered

COLUMNS = (
    "backbone",
    "regime",
    "trainable_params",
    "frozen_params",
    "epochs",
    "seconds_per_epoch",
    "peak_memory_mb",
    "best_val_acc",
    "best_val_loss",
)
COMPARISON_FILES = ("comparison.csv", "comparison.md", "comparison.png")


class RegimeStats(pl.Callback):
    """Measures one fit for the comparison and writes the numbers to ``output`` (JSON).

    Args:
        output: JSON file that receives the measurements.
        regime: name of the regime being measured.
        backbone: name of the backbone being measured.
    """

    def __init__(self, output: str, regime: str, backbone: str = "") -> None:
        self.output, self.regime, self.backbone = output, regime, backbone
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
        else:  # the whole process, Python and torch included
            peak = peak_rss_mb()
        row = {
            "backbone": self.backbone or pl_module.hparams.get("backbone", ""),
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


class _FitArguments(TLFinetuneCLI):
    """The ``fit`` command's own parser, used to read compare's arguments without training.

    So ``--config`` files, flags after them and every fit setting are validated and resolved
    exactly as ``fit`` does, and ``--regimes`` sits beside them.
    """

    def __init__(self, args: list[str]) -> None:
        with warnings.catch_warnings():  # args given while sys.argv holds compare's own: meant
            warnings.filterwarnings("ignore", message=".*args parameter is intended.*")
            super().__init__(args=args, run=False)

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:  # noqa: D102
        kwargs.update(prog=f"{prog_name()} compare", description=__doc__.split("\n\n")[1])
        return super().init_parser(**kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:  # noqa: D102
        super().add_arguments_to_parser(parser)
        parser.add_argument(
            "--regimes",
            type=str,
            default=",".join(REGIMES),
            help=f"Regimes to train and compare, comma-separated, from {','.join(REGIMES)}.",
        )
        parser.add_argument(
            "--backbones",
            type=str | None,
            default=None,
            help="Backbones to train and compare, comma-separated (each with every regime); "
            "default: --model.backbone alone.",
        )

    def instantiate_classes(self) -> None:
        """Nothing to build here: each regime trains in a process of its own."""


def parse_arguments(
    argv: list[str],
) -> tuple[list[str], list[str], Namespace, LightningArgumentParser]:
    """The backbones and regimes to train and the fit configuration they share."""
    cli = _FitArguments(argv)
    config = cli.config.clone()
    regimes = [r.strip() for r in config.pop("regimes").split(",") if r.strip()]
    bad = [r for r in regimes if r not in REGIMES]
    if bad or not regimes:
        raise ConfigError(f"--regimes {','.join(regimes)}: choose from {', '.join(REGIMES)}.")
    given = config.pop("backbones")
    backbones = [b.strip() for b in (given or config.model.backbone).split(",") if b.strip()]
    if not backbones:
        raise ConfigError(f"--backbones {given!r}: name at least one backbone.")
    for name in backbones:  # before any training: a typo must not cost the runs before it
        try:
            bb.get_spec(name)
        except ConfigError as err:
            raise ConfigError(f"--backbones: {err}") from None
    return backbones, regimes, config, cli.parser


def compare(argv: list[str]) -> list[dict[str, Any]]:
    """Run one fit per backbone and regime with the same arguments; write the comparison."""
    backbones, regimes, config, parser = parse_arguments(argv)
    root = Path(config.trainer.default_root_dir or "runs")
    rows = []
    for backbone, regime in [(b, r) for b in backbones for r in regimes]:
        rows.append(_train(config, parser, root, backbone, regime, several=len(backbones) > 1))
    write_comparison(rows, root)
    return rows


def _train(
    config: Namespace,
    parser: LightningArgumentParser,
    root: Path,
    backbone: str,
    regime: str,
    several: bool,
) -> dict[str, Any]:
    """One fit in its own process; its row of the comparison."""
    # compare/<regime> with one backbone, as before; compare/<backbone>/<regime> with several
    out = root / "compare" / backbone / regime if several else root / "compare" / regime
    out.mkdir(parents=True, exist_ok=True)
    stats = out / "stats.json"
    stats.unlink(missing_ok=True)
    run = config.clone()
    run.model.backbone = backbone
    run.freeze.regime = regime
    run.freeze.milestones = None  # each regime as itself, no schedule between them
    run.trainer.default_root_dir = str(out)
    fit_config = out / "fit.yaml"
    with warnings.catch_warnings():  # skip_none, Lightning's spelling, is renamed in 4.49
        warnings.simplefilter("ignore", DeprecationWarning)
        fit_config.write_text(parser.dump(run, skip_none=False))  # None can be a choice
    callback = {
        "class_path": "tlfinetune.compare.RegimeStats",
        "init_args": {"output": str(stats), "regime": regime, "backbone": backbone},
    }
    cmd = [
        sys.executable, "-m", "tlfinetune", "fit", f"--config={fit_config}",
        f"--trainer.callbacks+={json.dumps(callback)}",
    ]  # fmt: skip
    what = f"{backbone}, regime {regime}" if several else f"regime {regime}"
    print(f"compare: training {what} ...", flush=True)
    done = subprocess.run(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if done.returncode != 0 or not stats.is_file():
        raise ConfigError(
            f"compare: the {what} run failed (exit {done.returncode}); its output is "
            f"above and its folder is {out}."
        )
    return json.loads(stats.read_text())


def write_comparison(rows: list[dict[str, Any]], root: Path) -> Path:
    """``comparison.csv``, ``comparison.md`` and ``comparison.png`` under ``root``.

    An earlier comparison there is kept: the new files are numbered, all three with the same
    number (``comparison.1.csv``, ``comparison.1.md``, ``comparison.1.png``).

    Returns:
        The CSV file written.
    """
    root.mkdir(parents=True, exist_ok=True)
    number = free_number([root], COMPARISON_FILES)
    csv_path, md_path, png_path = (root / numbered(n, number) for n in COMPARISON_FILES)
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    table = comparison_markdown(rows)
    md_path.write_text(table)
    plot_comparison(rows).savefig(png_path, dpi=100)
    print(table, end="")
    kept = "; the earlier comparison files there are kept" if number else ""
    print(f"\nComparison written to {csv_path}, {md_path.name} and {png_path.name}{kept}")
    return csv_path


def comparison_markdown(rows: list[dict[str, Any]]) -> str:
    """The rows as a Markdown table (``comparison.md``), one line per run, integers with commas."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += [
        "| "
        + " | ".join(f"{r[c]:,}" if isinstance(r[c], int) else str(r[c]) for c in COLUMNS)
        + " |"
        for r in rows
    ]
    return "\n".join(lines) + "\n"


def plot_comparison(rows: list[dict[str, Any]]) -> Any:
    """Bars per run (backbone and regime): best val accuracy, seconds per epoch, parameters."""
    from matplotlib.figure import Figure

    several = len({r.get("backbone") for r in rows}) > 1
    fig = Figure(figsize=(max(11.0, 2.4 * len(rows)), 3.4), layout="constrained")
    names = [f"{r['backbone']}\n{r['regime']}" if several else r["regime"] for r in rows]
    colours = {"frozen": "#4c72b0", "partial": "#dd8452", "full": "#55a868"}
    panels = [
        ("best_val_acc", "best val accuracy"),
        ("seconds_per_epoch", "seconds per epoch"),
        ("trainable_params", "trainable parameters"),
        ("peak_memory_mb", "peak memory (MB)"),
    ]
    for ax, (key, title) in zip(fig.subplots(1, len(panels)), panels, strict=True):
        values = [r[key] for r in rows]
        bars = ax.bar(names, values, color=[colours.get(r["regime"], "#8172b3") for r in rows])
        ax.bar_label(bars, labels=[f"{v:,.3g}" for v in values], fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.tick_params(axis="x", labelsize=7 if several else 9)
    return fig


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``python -m tlfinetune compare``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    compare(argv or ["--help"])
