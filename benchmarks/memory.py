"""Peak memory of ``predict`` and ``test`` as the number of images grows (issue 14).

Generates small PNG images (one folder per class, 1,000 classes) and a 1,000-class checkpoint
with random weights, then runs ``python -m tlfinetune predict`` and ``test`` over N images, each
in a fresh process, and reports that process's peak resident memory (``VmHWM``). What grows
with N is what the run keeps per image: the requirement is that 20,000 images cost at most
150 MB more than 2,000.

    python benchmarks/memory.py --images 2000 20000 --out /tmp/memory-bench

``--pythonpath DIR`` measures another checkout of tlfinetune (e.g. the previous version).
DataLoader workers are off (``--data.num_workers 0``), so the main process holds everything.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from jsonargparse import CLI

CLASSES = 1000
SIZE = 32


def make_images(root: Path, n: int) -> Path:
    """``n`` PNGs in ``root/images_<n>/c<k>/`` (k = i mod 1,000); reused when present."""
    folder = root / f"images_{n}"
    done = folder / ".complete"
    if done.is_file():
        return folder
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(n)
    for k in range(CLASSES):
        (folder / f"c{k:04d}").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        pixels = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"c{i % CLASSES:04d}" / f"{i:06d}.png")
    done.touch()
    return folder


def make_checkpoint(root: Path, backbone: str) -> Path:
    """A Lightning checkpoint of a 1,000-class TransferClassifier with random weights."""
    path = root / f"{backbone}_{CLASSES}.ckpt"
    if path.is_file():
        return path
    import lightning.pytorch as pl

    from tlfinetune import TransferClassifier

    names = [f"c{k:04d}" for k in range(CLASSES)]
    model = TransferClassifier(
        backbone=backbone, weights="none", num_classes=CLASSES, class_names=names, image_size=SIZE
    )
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False)
    trainer.strategy.connect(model)
    trainer.save_checkpoint(path)
    return path


def measure_here(command: list[str]) -> None:
    """Run the CLI in this process, then print its peak RSS (MB) and wall time as JSON."""
    from tlfinetune.cli import main
    from tlfinetune.machine import peak_rss_mb

    sys.argv = sys.argv[:1]  # the command is given to main(), not read from the command line
    start = time.perf_counter()
    main(command)
    peak = peak_rss_mb()
    print("MEASURED " + json.dumps({"peak_mb": peak, "seconds": time.perf_counter() - start}))


def run(command: list[str], pythonpath: str | None) -> dict[str, float]:
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    proc = subprocess.run(
        [sys.executable, __file__, "--measure", json.dumps(command)],
        env=env,
        capture_output=True,
        text=True,
    )
    line = next((x for x in proc.stdout.splitlines() if x.startswith("MEASURED ")), None)
    if proc.returncode != 0 or line is None:
        raise SystemExit(f"{' '.join(command)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(line.removeprefix("MEASURED "))


def memory(
    images: list[int] = [2000, 20000],  # noqa: B006 (read by jsonargparse, never mutated)
    out: Path = Path("/tmp/tlfinetune-memory"),
    backbone: str = "vgg11",
    commands: list[Literal["predict", "test"]] = ["predict", "test"],  # noqa: B006
    pythonpath: str | None = None,
    measure: str | None = None,
) -> None:
    """Peak memory of ``predict`` and ``test`` over each number of images, in fresh processes.

    Args:
        images: Numbers of images to run each command on (``--images 2000 20000`` or
            ``--images [2000,20000]``); the growth is reported from the first to the last.
        out: Folder for the images, the checkpoint and the runs' outputs (reused).
        backbone: torchvision VGG variant of the 1,000-class checkpoint.
        commands: Commands to measure (``--commands predict test`` or ``[predict,test]``).
        pythonpath: PYTHONPATH of the tlfinetune to measure (default: this environment's).
        measure: Internal (the parent passes it to each measured process): the
            ``tlfinetune`` command line to run in this process, as a JSON list.
    """
    if measure:
        measure_here(json.loads(measure))
        return
    out.mkdir(parents=True, exist_ok=True)
    ckpt = make_checkpoint(out, backbone)
    common = ["--data.num_workers=0", "--data.batch_size=64", "--trainer.accelerator=cpu",
              "--trainer.enable_progress_bar=false"]  # fmt: skip
    rows = []
    for command in commands:
        for n in images:
            folder = make_images(out, n)
            run_dir = out / f"{command}_{n}"
            if command == "predict":
                cli = ["predict", f"--ckpt_path={ckpt}", f"--data.predict_dir={folder}"]
            else:
                cli = ["test", f"--ckpt_path={ckpt}", f"--data.root={folder}"]
            result = run([*cli, *common, f"--trainer.default_root_dir={run_dir}"], pythonpath)
            rows.append({"command": command, "images": n, **result})
            print(f"{command:8} {n:>7} images: peak RSS {result['peak_mb']:7.0f} MB, "
                  f"{result['seconds']:6.1f} s", flush=True)  # fmt: skip
    for command in commands:
        peaks = [r["peak_mb"] for r in rows if r["command"] == command]
        if len(peaks) > 1:
            print(f"{command}: {peaks[-1] - peaks[0]:+.0f} MB from {images[0]:,} to "
                  f"{images[-1]:,} images")  # fmt: skip


def _space_separated(argv: list[str], flags: tuple[str, ...]) -> list[str]:
    """``--images 2000 20000`` as ``--images=[2000,20000]``.

    The documented command gives the list flags argparse's way, one value per word; a typed
    list in jsonargparse takes one word (``[2000,20000]``), so the words up to the next flag are
    joined into it. A value that already is a list, and every other word, pass unchanged.
    """
    args: list[str] = []
    i = 0
    while i < len(argv):
        end = i + 1
        while argv[i] in flags and end < len(argv) and not argv[end].startswith("-"):
            end += 1
        values = argv[i + 1 : end]
        if values and not values[0].lstrip().startswith("["):
            args.append(f"{argv[i]}=[{','.join(values)}]")
            i = end
        else:
            args.append(argv[i])
            i += 1
    return args


def main(argv: Sequence[str] | None = None) -> None:
    """``python benchmarks/memory.py [--images 2000 20000] [--out DIR] ...``: see above.

    The flags are :func:`memory`'s typed signature, read by jsonargparse as the package's own
    command line is.
    """
    args = _space_separated(
        list(sys.argv[1:] if argv is None else argv), ("--images", "--commands")
    )
    CLI(memory, args=args, as_positional=False)


if __name__ == "__main__":
    main()
