"""The learning-rate finder: a sane suggestion, each phase's groups, and no trace left behind."""

import json
import os
import random
import subprocess
import sys
from functools import partial

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from test_cli import FAST, make_folder
from tiny import TinyData, tiny_tensors, trainer
from torch.optim.optimizer import register_optimizer_step_post_hook

from tlfinetune import FreezeSchedule, ImageDataModule, TransferClassifier
from tlfinetune.cache import FeatureCache
from tlfinetune.cli import main
from tlfinetune.lr_find import debiased, find_lr, steepest

CPU = {"accelerator": "cpu", "enable_progress_bar": False}


def test_the_suggestion_is_sane_and_each_phase_sweeps_its_own_groups(one_thread):
    # The toy: which channel is brightest, a frozen random test_vgg16 and the flatten head.
    # Known-good lr, measured by training 30 Adam steps at 1e-4 ... 3e-1 (seeds 0 and 1): 1e-2
    # (accuracy 0.96 and 1.00), 3e-2 close; at 1e-3 the loss has barely moved (0.97, 1.01).
    pl.seed_everything(0, verbose=False)
    model = TransferClassifier(backbone="test_vgg16", weights="none")
    schedule = FreezeSchedule(regime="frozen", milestones={2: "block5"}, backbone_lr_ratio=0.1)
    steps = []  # per optimizer step: {group name: (lr, parameters that train)}

    def record(optimizer, *_):
        steps.append(
            {
                g["name"]: (g["lr"], sum(p.numel() for p in g["params"] if p.requires_grad))
                for g in optimizer.param_groups
            }
        )

    # Registered before the finder's own post-hook: sees the rates each group stepped with.
    hook = register_optimizer_step_post_hook(record)
    try:
        result = find_lr(model, TinyData(n=24), schedule, num_training=40, trainer_kwargs=CPU)
    finally:
        hook.remove()

    assert [(s.phase, s.swept) for s in result.sweeps] == [
        (0, "head"),
        (1, "head"),
        (1, "backbone"),
    ]
    assert 1e-3 <= result.lr <= 1e-1, result.summary()  # within a decade of 1e-2
    assert result.ratio == pytest.approx(result.sweeps[2].suggestion / result.lr)
    flags = result.flags()
    assert "--model.optimizer.lr" in flags and "--freeze.backbone_lr_ratio" in flags

    # Phase 0 trains the head alone; phase 1 block5 and the head, the backbone at lr x 0.1;
    # then block5 alone with the head held still. Each sweep's lr grows step by step.
    block5 = sum(p.numel() for p in model.backbone[24:].parameters())
    n = [len(s.lrs) for s in result.sweeps]
    assert len(steps) == sum(n)
    phase0, joint, alone = steps[: n[0]], steps[n[0] : n[0] + n[1]], steps[n[0] + n[1] :]
    assert all(set(s) == {"head"} and s["head"][1] > 0 for s in phase0)
    assert all(s["backbone"][1] == block5 for s in joint + alone)
    assert all(s["backbone"][0] == pytest.approx(0.1 * s["head"][0]) for s in joint)
    assert all(s["head"][0] == 0 and s["backbone"][0] > 0 for s in alone)
    assert [s["head"][0] for s in phase0] == sorted(s["head"][0] for s in phase0)
    assert model.head is None  # built from the data during the sweeps, and taken away again


def test_steepest_is_taken_against_log_lr_before_the_divergence():
    lrs = list(np.logspace(-7, 0, 50))
    # Flat, then falling fastest around 1e-2 in log space, then diverging with a wobble whose
    # fall (5 -> 3) is steeper than anything before it.
    losses = [1.0 - 0.5 / (1 + np.exp(-4 * (np.log10(lr) + 2))) for lr in lrs]
    losses[-6:] = [2.0, 5.0, 4.0, 3.0, 6.0, float("nan")]
    assert 3e-3 < lrs[steepest(lrs, losses)] < 3e-2
    assert steepest(lrs[:12], losses[:12]) is None  # everything skipped
    noise = [1.8 + 0.005 * np.sin(i) for i in range(50)]  # a flat sweep: nothing to suggest
    assert steepest(lrs, noise) is None


def test_the_smoothed_loss_is_debiased_as_lightning_means_to():
    # Lightning's _LRCallback on a constant loss of 2.0: global_step already counts the batch.
    beta, avg, smoothed = 0.98, 0.0, []
    for step in range(1, 31):
        avg = beta * avg + (1 - beta) * 2.0
        smoothed.append(avg / (1 - beta ** (step + 1)))
    assert smoothed[0] == pytest.approx(1.0, abs=0.02)  # half the loss, as Lightning draws it
    assert debiased(smoothed) == pytest.approx([2.0] * 30)


def arrays_module():
    x, y = tiny_tensors(24, 32)
    vx, vy = tiny_tensors(9, 32, seed=1)
    return ImageDataModule.from_arrays(
        x.permute(0, 2, 3, 1).numpy(), y.numpy(), vx.permute(0, 2, 3, 1).numpy(), vy.numpy(),
        image_size=32, batch_size=8, augment=False, num_workers=0, seed=0,
    )  # fmt: skip


def rng_states():
    return torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()


def fit(model, data, schedule):
    cache = FeatureCache()
    trainer(max_epochs=3, callbacks=[schedule, cache]).fit(model, data)
    return {k: v.clone() for k, v in model.state_dict().items()}, cache.builds


def test_a_fit_after_lr_find_ends_as_one_without_it(monkeypatch, one_thread):
    def build():
        pl.seed_everything(0, verbose=False)
        model = TransferClassifier(
            backbone="test_vgg16", weights="none", optimizer=partial(torch.optim.Adam, lr=3e-3)
        )
        schedule = FreezeSchedule(regime="frozen", milestones={2: "block5"})
        return model, arrays_module(), schedule

    reference, builds = fit(*build())
    assert builds >= 1  # the fits are served from the feature cache

    model, data, schedule = build()
    data.setup("fit")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [p.requires_grad for p in model.parameters()]
    modes = [m.training for m in model.modules()]
    hparams, rng = dict(model.hparams), rng_states()
    steps, schedule_state = list(schedule.steps), schedule.state_dict()

    caches = []  # the sweeps run without a feature cache: none is even set up
    monkeypatch.setattr(FeatureCache, "setup", lambda *args, **kwargs: caches.append(kwargs))
    result = find_lr(model, data, schedule, num_training=15, trainer_kwargs=CPU)
    monkeypatch.undo()
    assert result.sweeps[0].lrs and not caches

    after = model.state_dict()
    assert state.keys() == after.keys()
    assert all(torch.equal(state[k], after[k]) for k in state)
    assert model.head is None and dict(model.hparams) == hparams
    assert [p.requires_grad for p in model.parameters()] == grads
    assert [m.training for m in model.modules()] == modes
    now = rng_states()
    assert torch.equal(now[0], rng[0]) and (now[1] == rng[1]).all() and now[2] == rng[2]
    assert schedule.steps == steps and schedule.state_dict() == schedule_state
    assert model._trainer is None and model.nonfinite_check_every is None

    weights, cached = fit(model, data, schedule)
    assert cached == builds  # the cache serves this fit as it served the reference
    assert weights.keys() == reference.keys()
    assert all(torch.equal(weights[k], reference[k]) for k in reference)


def test_lr_find_says_what_is_wrong_with_its_settings(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["lr_find", "--data.root=demo", "--lr_find.num_training=5"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "--lr_find.num_training 5" in err and "at least 20 steps" in err
    assert "Traceback" not in err


@pytest.mark.slow
def test_lr_find_command(tmp_path):
    data, out = make_folder(tmp_path / "data"), tmp_path / "runs"
    config = tmp_path / "fit.yaml"  # the same config file a fit takes
    config.write_text(
        f"model: {{backbone: test_vgg16, weights: none}}\n"
        f"data: {{root: {data}, image_size: 32, batch_size: 8, val_split: 0.34}}\n"
        "freeze: {regime: partial, unfreeze_from: block5}\n"
    )
    args = ["lr_find", f"--config={config}", "--lr_find.num_training=20",
            f"--trainer.default_root_dir={out}", *FAST]  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-m", "tlfinetune", *args],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    printed = done.stdout
    assert "phase 0, epoch 0 on: block5+ and head (backbone at lr x 0.1)" in printed
    assert "Suggested: --model.optimizer.lr " in printed
    # The curves and their numbers, and nothing else: no run folder, no finder checkpoint.
    assert sorted(p.name for p in out.iterdir()) == ["lr_find.json", "lr_find.png"]
    saved = json.loads((out / "lr_find.json").read_text())
    assert [(s["phase"], s["swept"]) for s in saved["sweeps"]] == [(0, "head"), (0, "backbone")]
    assert saved["lr"] == saved["sweeps"][0]["suggestion"] and len(saved["sweeps"][0]["lrs"]) == 20
    assert f"--model.optimizer.lr {saved['lr']:.2g}" in printed


def test_a_second_result_is_numbered_as_a_pair_and_keeps_the_first(tmp_path):
    from tlfinetune.lr_find import LRFindResult, Sweep, write_result

    sweep = Sweep(0, 0, 31, "head", "head", [1e-4, 1e-3, 1e-2], [1.0, 0.8, 1.5], 1e-3, 1)
    result = LRFindResult([sweep], backbone_lr_ratio=0.1)
    (tmp_path / "lr_find.json").write_text("an earlier sweep's numbers")  # its png was deleted
    assert write_result(result, tmp_path).name == "lr_find.1.png"
    assert json.loads((tmp_path / "lr_find.1.json").read_text())["lr"] == 1e-3
    assert write_result(result, tmp_path).name == "lr_find.2.png"
    assert (tmp_path / "lr_find.json").read_text() == "an earlier sweep's numbers"
    assert not (tmp_path / "lr_find.png").exists()
