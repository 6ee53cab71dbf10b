"""What this machine offers training: the fastest precision, the cores for loaders, its memory.

One place for the facts about the hardware that settings default from.

Precision: bf16-mixed is not faster everywhere. Measured with VGG16's no_grad forward (64 px,
batch 32, channels-last): on a CPU with AVX-512 bf16 it ran ~1.9x the speed of 32-true, while on
an AVX2-only AMD EPYC with no bf16 instructions it ran 6.4 img/s against 47.8 for 32-true (7.5x
slower: oneDNN emulates bf16 there). On GPUs with native bf16 (Ampere and later) bf16-mixed
runs on the same tensor cores as 16-mixed without the GradScaler, whose ``found_inf`` check
reads a value back from the GPU at every optimizer step; older GPUs get 16-mixed.
``benchmarks/precision.md`` shows bf16-mixed reaching the accuracy of 32-true on VGG16.

Cores: DataLoader workers get the cores that training itself leaves free
(:func:`default_num_workers`).

Memory: the command line keeps the memory freed tensors give back for the next ones
(:func:`keep_freed_memory`): at 224 px that made the frozen VGG16 forward 1.7x faster.

Disk: tlfinetune's own cache folder (the demo dataset, scan records of read-only data) is
:func:`cache_root`.

    >>> fastest_precision("cpu") in ("bf16-mixed", "32-true")
    True
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "cache_root",
    "peak_rss_mb",
    "compute_threads",
    "cpus",
    "default_num_workers",
    "device_type_of",
    "emulated_bf16_warning",
    "fastest_precision",
    "keep_freed_memory",
    "native_bf16",
]


def native_bf16(device_type: str) -> bool:
    """Whether ``device_type`` (``cpu`` or ``cuda``) computes in bf16 in hardware.

    On x86 CPUs that means AVX-512 bf16 or AMX; on Arm CPUs the bf16 extension. A torch that
    cannot tell counts as no: 32-true is never the slow choice.
    """
    try:
        if device_type == "cuda":
            return torch.cuda.is_available() and torch.cuda.is_bf16_supported(
                including_emulation=False
            )
        if device_type == "cpu":
            if platform.machine().lower() in ("x86_64", "amd64", "i386", "i686"):
                return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError, TypeError):
        pass
    return False


def fastest_precision(device_type: str) -> str | None:
    """The fastest Lightning precision that keeps accuracy on this machine's ``device_type``.

    ``bf16-mixed`` where the hardware has bf16; otherwise ``32-true`` on a CPU and ``16-mixed``
    on a CUDA GPU. ``None`` (Lightning's own default) for other accelerators, which were not
    measured.

    Example, for a notebook::

        trainer = pl.Trainer(accelerator="cpu", precision=fastest_precision("cpu"))
    """
    if device_type not in ("cpu", "cuda"):
        return None
    if native_bf16(device_type):
        return "bf16-mixed"
    return "16-mixed" if device_type == "cuda" else "32-true"


def device_type_of(accelerator: Any) -> str:
    """The torch device type a Trainer's ``accelerator`` argument will train on."""
    if not isinstance(accelerator, str):
        name = type(accelerator).__name__.lower()
        return "cuda" if "cuda" in name else "cpu" if "cpu" in name else name
    name = accelerator.lower()
    if name in ("auto", "gpu"):
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return "mps"
        if torch.cuda.is_available():
            return "cuda"
        return "cpu" if name == "auto" else "gpu"
    return name


def emulated_bf16_warning(precision: Any, device_type: str) -> str | None:
    """A warning when bf16 was asked for on a CPU that would only emulate it, else ``None``."""
    if device_type != "cpu" or "bf16" not in str(precision) or native_bf16("cpu"):
        return None
    return (
        f"precision={precision} on a CPU without bf16 instructions (no AVX-512 bf16 or AMX): "
        f"oneDNN emulates bf16 there, which ran VGG16 about 7x slower than 32-true on an AVX2 "
        f"machine. Use --trainer.precision 32-true, or leave it unset to let tlfinetune pick "
        f"the fastest precision for this machine."
    )


# --- cores -----------------------------------------------------------------------------------


def cpus() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS, Windows
        return os.cpu_count() or 1


def compute_threads(device_type: str | None) -> int:
    """Cores a training process keeps busy itself: torch's threads on the CPU, else one."""
    return torch.get_num_threads() if device_type == "cpu" else 1


def default_num_workers(processes_per_node: int = 1, compute_threads: int = 1) -> int:
    """DataLoader workers suited to this machine: the cores each training process leaves free.

    ``min(16, cpus // processes_per_node - compute_threads)``, at least 0. Training on a GPU
    needs about one core per process for itself (``compute_threads=1``: ``cpus - 1``), and a GPU
    outruns JPEG decoding, so every free core is worth a worker (the cap of 16, as fastai's,
    keeps huge hosts from forking a hundred). Training on the CPU keeps
    ``torch.get_num_threads()`` cores busy with its own compute; a worker on top of them can
    only run by pre-empting a compute thread, so it hides no decoding and adds its start-up
    (PyTorch's CPU tuning guide warns against that oversubscription).

    Args:
        processes_per_node: Training processes sharing the machine's cores (DDP ranks).
        compute_threads: Cores each training process keeps busy itself.

    Returns:
        The number of worker processes per DataLoader.
    """
    per_process = cpus() // max(1, processes_per_node)
    return max(0, min(16, per_process - max(1, compute_threads)))


# --- memory ----------------------------------------------------------------------------------

# glibc's mallopt parameters (malloc.h) and the environment variables that set them
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_GLIBC_MALLOC_ENV = (
    "MALLOC_MMAP_MAX_",
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TRIM_THRESHOLD_",
    "MALLOC_TOP_PAD_",
)
_OTHER_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")


def keep_freed_memory() -> bool:
    """Have the C allocator keep the memory that freed tensors return, for the next tensors.

    By default glibc serves every allocation above 32 MB with a fresh ``mmap`` and unmaps it on
    ``free``, so each large tensor costs a page fault per 4 KB page and the kernel's zeroing of
    it, every time. At 224 px VGG16's early activations are 205 MB per batch of 32: on a 2-core
    Xeon with AMX the frozen VGG16 forward (bf16, fused) ran at 43-45 img/s with glibc's defaults
    and 75 img/s with freed memory kept, and the seed's job's first epoch took 4.0 s instead of
    6.4 s; partial-regime steps at 224 px ran 1.4x faster. The price is memory: what is freed
    stays with the process, and a heap fragments where separate mappings did not (a freed block
    can sit behind a small chunk still in use), so peak resident memory grows: 1.55 -> 1.9-2.0 GB
    on the seed's job, 1.2 -> 2.1 GB in partial steps, level from the fifth step on. This is what
    PyTorch's CPU tuning guide gets from preloading jemalloc or tcmalloc, done with the allocator
    that is already loaded.

    ``python -m tlfinetune`` calls it as it starts; a notebook or script can call it once, at the
    top. It changes the allocator of the whole process, so tlfinetune's library code never calls
    it on its own.

    Returns:
        Whether it took effect: False off glibc (macOS, Windows, musl), under an allocator
        preloaded in ``LD_PRELOAD`` (jemalloc, tcmalloc, mimalloc), and where glibc's malloc
        settings were set in the environment (``MALLOC_MMAP_MAX_``, ``MALLOC_TRIM_THRESHOLD_``,
        ... or ``glibc.malloc.*`` in ``GLIBC_TUNABLES``): those are left as they were set.
        ``TLFINETUNE_KEEP_FREED_MEMORY=0`` in the environment keeps glibc's defaults.
    """
    if os.environ.get("TLFINETUNE_KEEP_FREED_MEMORY", "").strip().lower() in ("0", "false", "no"):
        return False
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    if any(name in os.environ for name in _GLIBC_MALLOC_ENV):
        return False
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    if any(name in os.environ.get("LD_PRELOAD", "") for name in _OTHER_ALLOCATORS):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # pragma: no cover - a glibc without mallopt
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # No mmap'd chunks: large blocks come from the heap and go back to it. And never trim the
    # heap's top below 2 GB free: trimming is unmapping by another name.
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


def cache_root() -> Path:
    """The folder under which tlfinetune caches (the demo dataset, scan records of read-only data).

    ``$TLFINETUNE_CACHE`` if set, else ``$XDG_CACHE_HOME/tlfinetune``, else
    ``~/.cache/tlfinetune``.
    """
    env = os.environ.get("TLFINETUNE_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "tlfinetune"


def peak_rss_mb() -> float:
    """Peak resident memory of this program, in MiB.

    Linux's ``VmHWM``, not ``ru_maxrss``: ``ru_maxrss`` survives ``exec``, so a process started
    by a large parent (``compare``'s runs, a benchmark's measured child) reports at least the
    parent's size. ``ru_maxrss`` where ``/proc`` is missing (macOS: bytes; Linux: KiB).
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if platform.system() == "Darwin" else peak / 1024
