"""How many page faults 64 MB tensors cost in this process once it settled, for the memory tests.

Run as a script it prints ``{"default": ..., "took": ..., "kept": ...}``: the faults with the
allocator as the process started, whether :func:`keep_freed_memory` took effect, and the faults
after it. As a callback (``--trainer.callbacks+=memory_probe.FreedMemoryProbe``) it writes the
faults inside a command's own process to ``path``.
"""

import json
import resource

import lightning.pytorch as pl
import torch

PAGES = 4 * 2**24 * 4 // 4096  # four float32 tensors of 2**24 elements, in 4 KB pages


def faults_of_a_64mb_tensor() -> int:
    """Page faults of allocating and filling 64 MB four times, once the allocator has settled.

    Twelve rounds first: a freed block can be stranded behind the small remainder that
    ``posix_memalign`` splits off it, while glibc's per-thread cache of small chunks still has
    room (at most 7 a size); seen for up to 5 rounds in a fresh process, then never again.
    """
    for _ in range(12):
        torch.empty(2**24).fill_(1)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(4):
        torch.empty(2**24).fill_(1)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


class FreedMemoryProbe(pl.Callback):
    def __init__(self, path: str) -> None:
        self.path = path

    def on_fit_start(self, trainer, pl_module) -> None:
        with open(self.path, "w") as f:
            json.dump({"faults": faults_of_a_64mb_tensor()}, f)


if __name__ == "__main__":
    from tlfinetune.machine import keep_freed_memory

    default = faults_of_a_64mb_tensor()
    took = keep_freed_memory()
    print(json.dumps({"default": default, "took": took, "kept": faults_of_a_64mb_tensor()}))
