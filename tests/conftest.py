"""Shared fixtures: tiny images on disk, a private demo cache, the tlfinetune log records.

The suite runs on two pytest-xdist workers (``-n 2 --dist loadgroup`` in pyproject.toml), each
process on one compute thread (``OMP_NUM_THREADS=1``, inherited by every process a test starts):
the tests' models are tiny, and a second thread per process only competes for the two cores.
Tests that start two DDP processes carry ``xdist_group("ddp")`` and so run one after another on
one worker: two of them at once put four busy-polling gloo processes on two cores (measured: the
suite took 4 min 18 s that way against 3 min 08 s). The ``slow`` tests are handed out first
(see ``pytest_collection_modifyitems``).
"""

import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

# One compute thread here and (through the environment) in every process a test starts.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

# The benchmark harness lives beside the package (benchmarks/bench.py), run as a script there;
# its tests import it as the script itself does, from its own folder.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The ``slow`` tests first, each group in its file order.

    xdist hands tests out in this order (the "ddp" group, its largest unit, goes first anyway):
    long tests started early overlap with the DDP worker's group, and the short ones fill both
    workers up to the end. In file order, a 15 s command-line test could start last and run
    alone while the other worker idled.
    """
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # stable


@pytest.fixture(scope="session", autouse=True)
def _private_demo_cache(tmp_path_factory: pytest.TempPathFactory):
    """Every test session generates the demo dataset into its own folder, never into ~/.cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TLFINETUNE_CACHE", str(tmp_path_factory.mktemp("tlfinetune-cache")))
        yield


@pytest.fixture(scope="session")
def ddp_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The DDP runs of test_distributed.py, test_cache_ddp.py and test_report.py, launched once.

    Each DDP launch starts two interpreters one after the other (~5 s of imports each); the
    three tests are in the "ddp" group, so one worker runs them and this fixture once. A failing
    run fails all three, with the worker's stderr. Returns the folder with ``milestone/``,
    ``cache/`` and ``report/`` (see tests/ddp_worker.py).
    """
    from tiny import run_worker

    out = tmp_path_factory.mktemp("ddp_runs")
    run_worker("ddp_worker.py", out)
    return out


@pytest.fixture
def make_image() -> Callable[..., Path]:
    """``make_image(path, color=(r, g, b), size=(w, h), fmt=None)`` writes a solid RGB image.

    The format follows the extension (``fmt`` overrides it); parent folders are created.
    """

    def make(
        path: Path,
        color: tuple[int, int, int] = (200, 30, 30),
        size: tuple[int, int] = (16, 12),
        fmt: str | None = None,
    ) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = np.empty((size[1], size[0], 3), np.uint8)
        pixels[...] = color
        Image.fromarray(pixels, "RGB").save(path, format=fmt)
        return path

    return make


@pytest.fixture
def data_log(caplog):
    """caplog for the tlfinetune loggers (which do not propagate to the root logger)."""
    logger = logging.getLogger("tlfinetune")
    attach = not logger.propagate  # tlfinetune/__init__ may give it its own handler
    if attach:
        logger.addHandler(caplog.handler)
    caplog.set_level(logging.INFO, logger="tlfinetune")
    yield caplog
    if attach:
        logger.removeHandler(caplog.handler)


@pytest.fixture
def one_thread():
    """One compute thread: tiny convolutions gain nothing from a second, and lose about 10x
    when the machine's cores are busy with other processes (measured on 2 shared cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
