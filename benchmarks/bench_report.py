"""The markdown report of a ``python benchmarks/bench.py`` run.

The header (setting, machine, no_grad forward bound, decode speed), the table of rows and the
notes, built from what :func:`bench.bench` collected. Kept apart from the
measurements so that the report's layout can change without touching how anything is measured.
"""

from __future__ import annotations

import contextlib
import os
import platform
from pathlib import Path
from typing import Any

import torch
from bench_measure import Result

__all__ = ["markdown"]


def _fmt(x: float | None, digits: int = 1) -> str:
    if x is None or x != x:  # None or NaN
        return "-"
    return f"{x:,.{digits}f}"


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}×" if a == a and b == b and b > 0 else "-"


def markdown(results: dict[str, Any]) -> str:
    """The report: a header with the setting, the bound and decode lines, and the table."""
    cfg, bound, decode = results["config"], results["bound"], results["decode"]
    cuda = cfg["device"].startswith("cuda")
    rows: list[Result] = results["_rows"]
    cl_all = bound.get("channels_last_all") or [bound["channels_last"]]
    torch_rows = {r.regime: r for r in rows if r.setup == "plain PyTorch"}
    lines = [
        f"## tlfinetune bench: {cfg['backbone']}, {cfg['image_size']} px, "
        f"batch {cfg['batch_size']}, {cfg['precision']}, {cfg['device']}",
        "",
        f"Command: `{results['command']}`",
        "",
        f"- Machine: {results['machine']}",
        f"- Data: {cfg['data']}; augment off; {cfg['train_images']} training images, "
        f"{cfg['epochs']} epochs; DataLoader workers: {cfg['num_workers']}",
        f"- no_grad forward bound ({cfg['backbone']} backbone alone, one fixed batch, same "
        f"precision and batch size; best of {len(cl_all)} measurements: before the first row and "
        f"after each): "
        f"**{_fmt(bound['channels_last'])} img/s** channels-last (range {_fmt(min(cl_all))}"
        f"-{_fmt(max(cl_all))}); NCHW {_fmt(bound['nchw'])} img/s",
        f"- Decode + transform alone (no model): {_fmt(decode['in_process'], 0)} img/s in the main "
        f"process; {_fmt(decode['loader'], 0)} img/s through the training DataLoader "
        f"({_fmt(decode['loader_first'], 0)} img/s on its first pass, worker start-up included)",
        "",
    ]
    memory = "peak RSS MB (start)"
    head = [
        "setup",
        "regime",
        "first epoch img/s",
        "later epochs img/s",
        "later ÷ first epoch time",
        "arithmetic floor",
        "first ÷ bound",
        "later ÷ bound",
        "bound img/s",
        "vs plain PyTorch (first / later)",
        "feature cache",
        memory,
    ]
    if cuda:
        head.append("peak CUDA MB")
    head += ["total s", "load"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        b = r.bound if r.bound == r.bound else bound["channels_last"]  # older results: no row bound
        peer = torch_rows.get(r.regime)
        vs = "-"
        if peer is not None and r is not peer and r.setup.startswith("tlfinetune"):
            vs = f"{_ratio(r.first_ips, peer.first_ips)} / {_ratio(r.later_ips, peer.later_ips)}"
        later_share = r.first_ips / r.later_ips if r.later_ips == r.later_ips else float("nan")
        cells = [
            r.setup + (f" ({r.note})" if r.note else ""),
            r.regime,
            _fmt(r.first_ips),
            _fmt(r.later_ips),
            "-" if later_share != later_share else f"{100 * later_share:.1f} %",
            "-" if r.floor != r.floor else f"{100 * r.floor:.1f} %",
            _ratio(r.first_ips, b),
            _ratio(r.later_ips, b),
            _fmt(b),
            vs,
            r.cache_state,
            f"{_fmt(r.peak_rss_mb, 0)} ({_fmt(r.rss_start_mb, 0)})",
        ]
        if cuda:
            cells.append(_fmt(r.peak_cuda_mb, 0))
        cells += [_fmt(r.total_s), _fmt(r.load, 2)]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [""] + [f"- {note}" for note in results["notes"]]
    return "\n".join(lines) + "\n"


def _machine(device: torch.device) -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS, Windows
        cores = os.cpu_count() or 1
    parts = [f"{cpu}, {cores} CPU cores, torch threads {torch.get_num_threads()}"]
    if device.type == "cuda":
        parts.append(torch.cuda.get_device_name(device))
    import lightning

    parts.append(
        f"Python {platform.python_version()}, torch {torch.__version__}, "
        f"lightning {lightning.__version__}"
    )
    return "; ".join(parts)


def publish(report: str, output: str | None) -> None:
    """Print ``report``; also write it to ``output`` (its folder made) when one is given."""
    print(report)
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(report, encoding="utf-8")
