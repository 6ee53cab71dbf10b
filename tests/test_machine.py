"""Machine facts: the fastest precision that keeps accuracy (emulated bf16 warned); workers."""

import inspect
import json
import logging
import os
import platform
import subprocess
import sys
from pathlib import Path

import memory_probe
import pytest
import torch
from lightning.pytorch.accelerators import CPUAccelerator
from test_cli import fit_args, make_folder
from tiny import TinyData, trainer

import tlfinetune.machine as machine
from tlfinetune import TransferClassifier, fastest_precision
from tlfinetune.cli import TLFinetuneCLI, main
from tlfinetune.machine import default_num_workers, peak_rss_mb


def cpu_bf16(monkeypatch, avx512_bf16: bool, amx: bool = False) -> None:
    """Pretend this x86 CPU has (or lacks) the bf16 instructions torch reports."""
    monkeypatch.setattr(machine.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)


@pytest.mark.parametrize(
    "avx512_bf16, amx, expected",
    [(True, False, "bf16-mixed"), (False, True, "bf16-mixed"), (False, False, "32-true")],
)
def test_cpu_gets_bf16_only_with_bf16_instructions(monkeypatch, avx512_bf16, amx, expected):
    cpu_bf16(monkeypatch, avx512_bf16, amx)
    assert fastest_precision("cpu") == expected


def test_a_torch_that_cannot_tell_counts_as_no_bf16(monkeypatch):
    monkeypatch.setattr(machine.platform, "machine", lambda: "x86_64")
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")
    assert not machine.native_bf16("cpu")
    assert fastest_precision("cpu") == "32-true"


def test_gpus_get_bf16_where_native_else_16_mixed(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    assert fastest_precision("cuda") == "16-mixed"  # e.g. V100, T4: fp16 tensor cores only
    native = {"including_emulation=False": None}

    def ampere(including_emulation=True):
        native["including_emulation=False"] = not including_emulation
        return True

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", ampere)
    assert fastest_precision("cuda") == "bf16-mixed"
    assert native["including_emulation=False"]  # emulated bf16 must not count
    assert fastest_precision("mps") is None  # not measured: Lightning's own default


def test_device_type_of_the_trainer_accelerator(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    if getattr(torch.backends, "mps", None) is not None:
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert machine.device_type_of("auto") == "cpu"
    assert machine.device_type_of("CPU") == "cpu"
    assert machine.device_type_of(CPUAccelerator()) == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert machine.device_type_of("auto") == "cuda"
    assert machine.device_type_of("gpu") == "cuda"


@pytest.mark.parametrize("has_bf16", [True, False])
def test_cli_picks_the_fastest_precision_when_none_is_given(
    tmp_path, monkeypatch, caplog, has_bf16
):
    cpu_bf16(monkeypatch, avx512_bf16=has_bf16)
    seen = []
    monkeypatch.setattr(TLFinetuneCLI, "after_fit", lambda self: seen.append(self.trainer))
    caplog.set_level("INFO", logger="tlfinetune")
    data = make_folder(tmp_path / "data", per_class=3)
    one_step = ("--trainer.max_epochs=1", "--trainer.limit_train_batches=1")
    main(fit_args(data, tmp_path / "auto", *one_step))
    expected = "bf16-mixed" if has_bf16 else "32-true"
    assert seen[-1].precision == expected
    assert f"Precision {expected}: the fastest that keeps accuracy on this CPU" in caplog.text
    # Given explicitly, the user's precision is kept, whatever the machine.
    main(fit_args(data, tmp_path / "given", *one_step, "--trainer.precision=32-true"))
    assert seen[-1].precision == "32-true"


@pytest.mark.parametrize("has_bf16", [True, False])
def test_bf16_on_a_cpu_that_emulates_it_is_warned(monkeypatch, caplog, has_bf16):
    cpu_bf16(monkeypatch, avx512_bf16=has_bf16)
    model = TransferClassifier(backbone="test_vgg16", weights="none", num_classes=3, image_size=32)
    t = trainer(precision="bf16-mixed", limit_train_batches=1, limit_val_batches=0)
    with caplog.at_level(logging.WARNING, logger="tlfinetune"):
        t.fit(model, TinyData(n=8))
    warned = "precision=bf16-mixed on a CPU without bf16 instructions" in caplog.text
    assert warned != has_bf16
    if warned:
        assert "--trainer.precision 32-true" in caplog.text


def test_default_num_workers(monkeypatch):
    # On a GPU every core but the training process's own: decoding is what a GPU waits for.
    for cpus, expected in ((1, 0), (2, 1), (3, 2), (16, 15), (17, 16), (128, 16)):
        monkeypatch.setattr(machine.os, "sched_getaffinity", lambda _pid, n=cpus: set(range(n)))
        assert default_num_workers() == expected
    monkeypatch.setattr(machine.os, "sched_getaffinity", lambda _pid: set(range(8)))
    assert default_num_workers(processes_per_node=4) == 1
    # Training on the CPU: only the cores its compute threads leave free.
    assert default_num_workers(compute_threads=8) == 0
    assert default_num_workers(compute_threads=16) == 0
    assert default_num_workers(compute_threads=6) == 2
    assert default_num_workers(compute_threads=2) == 6
    monkeypatch.setattr(machine.os, "sched_getaffinity", lambda _pid: set(range(64)))
    assert default_num_workers(processes_per_node=8) == 7  # 8 DDP ranks on 64 cores


def test_peak_rss_is_the_programs_own_not_its_parents():
    """compare's runs and the benchmarks' measured children are started by large processes;
    ``ru_maxrss`` survives exec and would report the parent's size."""
    block = bytearray(600 * 2**20)
    block[:: 2**12] = b"\x01" * len(block[:: 2**12])  # touch every page: it becomes resident
    code = "\n".join([
        "import platform, resource", inspect.getsource(peak_rss_mb),
        "print(peak_rss_mb(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)",
    ])  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    own, inherited = map(float, out.stdout.split())
    del block
    assert inherited > 600  # what ru_maxrss says: the parent's pages at the fork
    assert own < 100  # a bare Python


GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
HUGE_PAGES_ALWAYS = "[always]" in (
    Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    if Path("/sys/kernel/mm/transparent_hugepage/enabled").is_file()
    else ""
)
TESTS = Path(__file__).parent


def allocator_env(**env) -> dict:
    """This environment without any malloc setting of its own, with ``env`` added."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUN"))}
    clean.pop("TLFINETUNE_KEEP_FREED_MEMORY", None)
    return {**clean, **env}


def probe(**env) -> dict:
    """tests/memory_probe.py in a new Python whose environment has ``env`` added."""
    out = subprocess.run(
        [sys.executable, str(TESTS / "memory_probe.py")],
        env=allocator_env(**env),
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout)


@pytest.mark.skipif(not GLIBC, reason="glibc's allocator only")
def test_freed_memory_is_reused_without_page_faults():
    seen = probe()
    assert seen["took"]
    assert seen["kept"] < memory_probe.PAGES // 100  # measured: 0 (65,536 with glibc's defaults)
    if not HUGE_PAGES_ALWAYS:  # with huge pages everywhere even the default faults little
        assert seen["default"] > memory_probe.PAGES // 2


@pytest.mark.skipif(not GLIBC, reason="glibc's allocator only")
@pytest.mark.parametrize(
    "env",
    [
        {"TLFINETUNE_KEEP_FREED_MEMORY": "0"},
        {"MALLOC_TRIM_THRESHOLD_": "131072"},
        {"GLIBC_TUNABLES": "glibc.malloc.mmap_max=65536"},
    ],
)
def test_malloc_settings_of_the_user_are_left_alone(env):
    seen = probe(**env)
    assert not seen["took"]
    if not HUGE_PAGES_ALWAYS:
        assert seen["kept"] > memory_probe.PAGES // 2  # still a fresh mmap per large tensor


@pytest.mark.slow
@pytest.mark.skipif(not GLIBC, reason="glibc's allocator only")
def test_the_command_keeps_freed_memory(tmp_path):
    data, faults = make_folder(tmp_path / "data"), tmp_path / "faults.json"
    path = os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])
    args = fit_args(data, tmp_path / "runs", "--trainer.max_epochs=1")
    probe_args = [
        "--trainer.callbacks+=memory_probe.FreedMemoryProbe",
        f"--trainer.callbacks.path={faults}",
    ]
    subprocess.run(
        [sys.executable, "-m", "tlfinetune", *args, *probe_args],
        env=allocator_env(PYTHONPATH=path),
        cwd=tmp_path,
        capture_output=True,
        check=True,
        timeout=300,
    )
    assert json.loads(faults.read_text())["faults"] < memory_probe.PAGES // 100
