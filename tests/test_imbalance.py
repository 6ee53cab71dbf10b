"""Imbalanced classes: counts and warning, class weights in the loss, balanced sampling, reports."""

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tiny import tiny_tensors, trainer
from torchmetrics.functional.classification import multiclass_recall

from tlfinetune import ImageDataModule, TransferClassifier
from tlfinetune.balance import balanced_weights, resolve_class_weights
from tlfinetune.cache import FeatureCache
from tlfinetune.errors import ConfigError
from tlfinetune.report import EvaluationReport
from tlfinetune.sampling import BalancedSampler

BIG, SMALL = 40, 4  # 10:1


def imbalanced(big=BIG, small=SMALL, sampler="random", seed=0, **kw):
    """Two classes, 'big' and 'small', in arrays; val split off 20% of each."""
    x, _ = tiny_tensors(n=big + small, size=32, num_classes=2, seed=seed)
    y = torch.tensor([0] * big + [1] * small)
    x[:, 0] = torch.where(y[:, None, None] == 0, 40, 200).to(torch.uint8)  # learnable
    kwargs = {"image_size": 32, "batch_size": 8, "num_workers": 0, "augment": False, **kw}
    return ImageDataModule.from_arrays(
        x.permute(0, 2, 3, 1), y, class_names=["big", "small"], sampler=sampler, **kwargs
    )


def test_weights_from_counts_are_keras_balanced():
    # n_samples / (n_classes * count_c): sklearn's compute_class_weight("balanced").
    assert balanced_weights([30, 10, 5]) == pytest.approx([0.5, 1.5, 3.0])
    assert balanced_weights([40, 4]) == pytest.approx([44 / 80, 44 / 8])
    assert resolve_class_weights("auto", 3, [30, 10, 5]) == pytest.approx([0.5, 1.5, 3.0])
    assert resolve_class_weights([1, 2.5], 2, None) == [1.0, 2.5]
    assert resolve_class_weights(None, 2, [1, 1]) is None
    with pytest.raises(ConfigError, match="has 2 values but the model has 3 classes"):
        resolve_class_weights([1.0, 2.0], 3, None)
    with pytest.raises(ConfigError, match="auto needs the number of training images"):
        resolve_class_weights("auto", 2, None)
    with pytest.raises(ConfigError, match="give auto"):
        resolve_class_weights("balanced", 2, [1, 1])
    with pytest.raises(ConfigError, match="has 2 values but the model has 3 classes"):
        TransferClassifier(
            num_classes=3, image_size=32, backbone="test_vgg16", weights="none",
            class_weights=[1.0, 2.0],
        )  # fmt: skip


def test_class_weights_weight_the_loss():
    model = TransferClassifier(
        num_classes=3, image_size=32, backbone="test_vgg16", weights="none",
        class_weights=[1.0, 2.0, 5.0], feature_cache=False,
    )  # fmt: skip
    x, y = tiny_tensors(n=6, size=32, num_classes=3)
    model.log = model.log_dict = lambda *args, **kwargs: None  # no Trainer to log to
    logits = model(x)
    loss = model._shared_step((x, y), model.train_metrics, "train")
    weighted = F.cross_entropy(logits, y, weight=torch.tensor([1.0, 2.0, 5.0]))
    torch.testing.assert_close(loss, weighted)
    assert not torch.allclose(loss, F.cross_entropy(logits, y))
    assert "class_weight" in model.state_dict()  # saved with every checkpoint
    plain = TransferClassifier(num_classes=3, image_size=32, backbone="test_vgg16", weights="none")
    assert "class_weight" not in plain.state_dict()  # checkpoints without weights unchanged


def test_summary_lists_counts_and_warns_above_3x(data_log):
    dm = imbalanced()
    dm.class_names  # noqa: B018 - reading them indexes the data and logs the summary
    text = data_log.text
    assert "Images per class" in text
    assert "big" in text and " 32 " in text and "8" in text  # train 32, val 8 (of 40)
    warnings = [r.getMessage() for r in data_log.records if r.levelname == "WARNING"]
    (warning,) = [w for w in warnings if "Imbalanced classes" in w]
    assert "big (32 images)" in warning and "small (3)" in warning and "10.7x" in warning
    assert "--model.class_weights auto" in warning and "--data.sampler balanced" in warning
    assert dm.class_counts == [32, 3]
    data_log.clear()
    imbalanced(big=15, small=5).class_names  # noqa: B018 - 12 vs 4 training images: exactly 3x
    assert "Images per class" in data_log.text and "Imbalanced" not in data_log.text


def test_balanced_sampler_draws_classes_equally_by_seed_and_epoch():
    labels = [0] * 1000 + [1] * 100
    sampler = BalancedSampler(labels, seed=3)
    sampler.set_epoch(2)
    drawn = list(sampler)
    assert len(drawn) == len(sampler) == 1100
    share = np.mean([labels[i] for i in drawn])
    assert 0.45 < share < 0.55  # 1 in 11 without balancing
    used = BalancedSampler(labels, seed=3)
    for epoch in range(2):
        used.set_epoch(epoch)
        list(used)
    used.set_epoch(2)
    assert list(used) == drawn == sampler.order(2)  # the same (seed, epoch): the same draws
    assert sampler.order(3) != drawn and BalancedSampler(labels, seed=4).order(2) != drawn


def _fake_trainer(epoch, batches=0):
    progress = SimpleNamespace(current=SimpleNamespace(processed=epoch))
    batch_progress = SimpleNamespace(current=SimpleNamespace(processed=batches))
    return SimpleNamespace(
        fit_loop=SimpleNamespace(
            epoch_progress=progress,
            epoch_loop=SimpleNamespace(batch_progress=batch_progress),
        ),
        current_epoch=epoch,
        num_devices=1,
        strategy=SimpleNamespace(root_device=torch.device("cpu")),
        callbacks=[],
        log_dir=None,
        default_root_dir=".",
        is_global_zero=True,
    )


def test_balanced_loader_follows_the_epoch_and_resumes_mid_epoch():
    dm = imbalanced(sampler="balanced", seed=1)
    dm.trainer = _fake_trainer(epoch=3)
    loader = dm.train_dataloader()
    assert isinstance(loader.sampler, BalancedSampler) and loader.sampler.epoch == 3
    labels = dm._ensure_index().splits["train"].labels
    whole = torch.cat([y for _, y in loader]).tolist()
    assert whole == [labels[i] for i in BalancedSampler(labels, dm.seed).order(3)]
    assert 0.3 < np.mean(whole) < 0.7  # 3 of 35 training images are 'small'
    # A checkpoint taken after 2 batches of epoch 3: the resumed loader gives the rest.
    state = {"epoch": 3, "batches": 2}
    resumed = imbalanced(sampler="balanced", seed=1)
    resumed.trainer = _fake_trainer(epoch=3, batches=2)
    again = resumed.train_dataloader()
    again.load_state_dict(state)
    assert torch.cat([y for _, y in again]).tolist() == whole[2 * 8 :]


def _fit(dm, tmp_path, **model_kw):
    pl.seed_everything(0)
    model = TransferClassifier(backbone="test_vgg16", weights="none", **model_kw)
    fit = trainer(max_epochs=1, default_root_dir=tmp_path)
    fit.fit(model, dm)
    return model, fit


def test_auto_weights_are_saved_and_restored_for_validate(tmp_path, data_log, one_thread):
    dm = imbalanced(sampler="balanced")
    model, fit = _fit(dm, tmp_path, class_weights="auto")
    expected = torch.tensor(balanced_weights([32, 3]))
    torch.testing.assert_close(model.class_weight, expected)
    cache = FeatureCache.find(fit)
    assert cache is not None and cache.builds == 0
    assert "Feature cache off: data.sampler balanced" in data_log.text
    ckpt = tmp_path / "m.ckpt"
    fit.save_checkpoint(ckpt)
    loaded = TransferClassifier.load_from_checkpoint(ckpt, weights_only=True)
    torch.testing.assert_close(loaded.class_weight, expected)
    # Other weights chosen at load time win over the checkpoint's, and none means none.
    chosen = TransferClassifier.load_from_checkpoint(ckpt, weights_only=True, class_weights=[2, 1])
    torch.testing.assert_close(chosen.class_weight, torch.tensor([2.0, 1.0]))
    plain = TransferClassifier.load_from_checkpoint(ckpt, weights_only=True, class_weights=None)
    assert not hasattr(plain, "class_weight")
    only_predict = ImageDataModule(predict_dir=tmp_path)
    assert getattr(only_predict, "class_counts", None) is None  # no training data to count
    # Validating on other data (balanced here) keeps the loss the checkpoint trained with.
    other = imbalanced(big=20, small=20)
    fresh = TransferClassifier(backbone="test_vgg16", weights="none", class_weights="auto")
    trainer().validate(fresh, other, ckpt_path=ckpt, verbose=False)
    torch.testing.assert_close(fresh.class_weight, expected)


def test_report_shows_per_class_recall_and_balanced_accuracy(tmp_path, capsys, one_thread):
    dm = imbalanced()
    model = TransferClassifier(
        backbone="test_vgg16", weights="none", num_classes=2, image_size=32,
        class_names=["big", "small"], feature_cache=False,
    )  # fmt: skip
    with torch.no_grad():  # a head that always says 'big': accuracy high, balanced accuracy 0.5
        model.head[-1].weight.zero_()
        model.head[-1].bias.copy_(torch.tensor([1.0, 0.0]))
    report = EvaluationReport(dirpath=str(tmp_path))
    out = trainer(callbacks=[report]).validate(model, dm, verbose=False)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["accuracy"] == pytest.approx(8 / 9)
    assert saved["balanced_accuracy"] == pytest.approx(0.5)
    assert saved["per_class"]["big"]["recall"] == 1.0 and saved["per_class"]["small"]["recall"] == 0
    assert out[0]["val/balanced_acc"] == pytest.approx(0.5)
    printed = capsys.readouterr().out
    assert "balanced acc.   0.5000" in printed and "recall" in printed
    probs = torch.tensor([[0.9, 0.1]] * 9)
    y = torch.tensor([0] * 8 + [1])
    assert saved["balanced_accuracy"] == pytest.approx(
        multiclass_recall(probs, y, 2, average="macro").item()
    )


@pytest.mark.slow
def test_cli_fit_with_class_weights_balanced_sampler_and_early_stopping(tmp_path):
    """One `python -m tlfinetune fit` with all three: what the user sees and what is saved."""
    from test_cli import FAST, make_folder

    data = make_folder(tmp_path / "data", classes=("ants", "bees"), per_class=3)
    make_folder(tmp_path / "more", classes=("ants",), per_class=27)
    for i, image in enumerate(sorted((tmp_path / "more" / "ants").iterdir())):
        image.rename(data / "ants" / f"more{i:03d}.png")  # 30 ants, 3 bees
    out = tmp_path / "runs"
    args = [
        "fit", f"--data.root={data}", "--data.image_size=32", "--data.batch_size=8",
        "--data.val_split=0.34", "--data.augment=false", "--model.backbone=test_vgg16",
        "--model.weights=none",
        f"--trainer.default_root_dir={out}", "--trainer.max_epochs=5",
        "--freeze.milestones={2: block5}",
        # lr 0: val/loss never improves, so when it stops is known exactly
        "--model.optimizer=Adam", "--model.optimizer.lr=0",
        "--model.class_weights", "auto", "--data.sampler", "balanced",
        "--early_stopping.patience", "1", *FAST,
    ]  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-m", "tlfinetune", *args],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},  # tiny convolutions: see one_thread
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    said = proc.stdout + proc.stderr
    assert "Images per class" in said and "ants" in said
    assert "(auto, inverse frequency of the training images): ants 0.55, bees 5.5" in said
    assert "Feature cache off: data.sampler balanced" in said
    # Patience 1 ran out after epoch 0 (withdrawn: the milestone at epoch 2 was ahead) and
    # after epoch 2, the milestone's own epoch: the run stops there, not at max_epochs.
    assert "the freeze schedule unfreezes more at epoch 2: training goes on" in said
    assert "Stopped early after epoch 2" in said and "best checkpoint: " in said
    version = out / "version_0"
    header = (version / "metrics.csv").read_text().splitlines()[0]
    assert "val/balanced_acc" in header
    last = torch.load(version / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["epoch"] == 2  # written at the end of epoch 2, the last one trained (not 4)
    assert last["hyper_parameters"]["class_weights"] == "auto"
    torch.testing.assert_close(last["state_dict"]["class_weight"], torch.tensor([22 / 40, 22 / 4]))
    assert any(key.startswith("ScheduleEarlyStopping") for key in last["callbacks"])
