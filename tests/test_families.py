"""Backbone families beyond VGG: stage names, freezing, the cache, weights, export, the command.

One model per family, the smallest torchvision offers (ConvNeXt, RegNet, DenseNet, ViT and Swin: a
tiny member built with torchvision's own constructors, registered as ``test_*``), at 32 px. Export
uses tiny ResNet, EfficientNet and MobileNetV3 members too (``EXPORTED``): tracing costs per
operation.
"""

import csv
import os
import re
import subprocess
import sys
import urllib.error

import pytest
import torch
import torchvision
from tiny import TinyData, tiny_tensors, trainer
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.dropout import _DropoutNd
from torch.utils.data import DataLoader, TensorDataset
from torchvision.ops import StochasticDepth

from tlfinetune import (
    ConfigError,
    FreezeSchedule,
    ImageDataModule,
    TransferClassifier,
    fastest_precision,
)
from tlfinetune import backbone as bb
from tlfinetune.cache import FeatureCache
from tlfinetune.errors import WeightsError
from tlfinetune.freeze import regime_start, set_trainable_from
from tlfinetune.predict import PredictionWriter
from tlfinetune.report import EvaluationReport

# Tiny convolutions at 32 px: one compute thread (see conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")

# One member per family; the stage (Swin: the unit with shifted windows) a test unfreezes from
# besides the default partial one.
FAMILIES = {
    "resnet18": "layer3",
    "efficientnet_b0": "stage6",
    "mobilenet_v3_small": "stage3",
    "test_convnext": "stage3",
    "test_regnet": "block3",
    "test_densenet": "block3",
    "test_vit": "encoder_layer_0",
    "test_swin": "stage1_1",
}


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def step(model, x, y):
    """One SGD step of everything that trains, in training mode (BN, dropout, stochastic depth)."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.5)
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def stochastic_or_bn(module):
    return [m for m in module.modules() if isinstance(m, _BatchNorm | _DropoutNd | StochasticDepth)]


@pytest.mark.parametrize("name", FAMILIES)
def test_exactly_the_trainable_units_change_and_frozen_ones_run_as_in_inference(name):
    torch.manual_seed(0)
    model = TransferClassifier(backbone=name, weights="none", num_classes=3, image_size=32)
    x, y = tiny_tensors(n=4, size=32)
    spec, n = bb.get_spec(name), len(model.backbone)
    unit_index = {layer.keras_name: layer.index for layer in spec.layers}
    starts = {
        "frozen": regime_start("frozen", name, None, n),
        "partial": regime_start("partial", name, None, n),
        FAMILIES[name]: bb.resolve_unfreeze_from(name, FAMILIES[name]),
    }
    assert starts["frozen"] == n and 0 < starts[FAMILIES[name]] < starts["partial"] < n
    assert regime_start("full", name, None, n) == 0
    assert spec.layers[starts["partial"]].block == spec.partial  # the last stage trains
    for regime, k in starts.items():
        set_trainable_from(model, k)
        model.train()
        frozen, trains = model.backbone[:k], model.backbone[k:]
        # Frozen BN, dropout and stochastic depth behave as in inference; the rest trains.
        assert not any(m.training for m in stochastic_or_bn(frozen)), regime
        assert all(m.training for m in stochastic_or_bn(trains)), regime
        inputs = model.normalize(x[:2])
        with torch.no_grad():
            seen = frozen(inputs)
            frozen.eval()
            torch.testing.assert_close(seen, frozen(inputs), rtol=0, atol=0, msg=regime)
        before, head = snapshot(model.backbone), snapshot(model.head)
        step(model, x, y)
        after = model.backbone.state_dict()
        changed = {key.split(".")[0] for key in before if not torch.equal(before[key], after[key])}
        # Frozen units stay bit-identical (BN running statistics included); every trainable
        # unit with parameters moves.
        assert all(unit_index[unit] >= k for unit in changed), (regime, changed)
        expected = {u for u, i in unit_index.items() if i >= k and _has_params(model.backbone[i])}
        assert expected <= changed, (regime, expected - changed)
        assert any(not torch.equal(v, model.head.state_dict()[key]) for key, v in head.items())


def _has_params(module):
    return any(True for _ in module.parameters())


def test_stage_names_paths_and_numbers_resolve_and_bad_ones_list_the_valid_ones():
    r = bb.resolve_unfreeze_from
    assert r("resnet18", "layer4") == r("resnet18", "layer4_0") == r("resnet18", "layer4.0") == 7
    assert r("resnet18", None) == 7 and r("resnet18", "stem") == r("resnet18", "conv1") == 0
    assert r("test_vit", 1) == r("test_vit", "1") == r("test_vit", "encoder_layer_1") == 2
    assert r("test_vit", "encoder.layers") == 1  # a torchvision container: its first unit
    assert r("vgg16", None) == r("vgg16", "block5") == r("vgg16", "features.24") == 24
    with pytest.raises(ConfigError) as err:
        FreezeSchedule(regime="partial", unfreeze_from="block5").resolve("resnet18", 9)
    assert "stem, layer1, layer2, layer3, layer4" in str(err.value)
    assert "backbones resnet18" in str(err.value)
    with pytest.raises(ConfigError, match="inside layer4.1 .*'layer4_1'"):
        r("resnet18", "layer4.1.conv2")
    with pytest.raises(ConfigError, match="stem, layer1"):
        r("resnet18", 3)  # numbers are ViT encoder layers (and VGG's Keras indices) only
    with pytest.raises(ConfigError, match=r"encoder layer number \(0-1\)"):
        r("test_vit", 7)
    with pytest.raises(ConfigError, match="milestone 2"):  # later milestones unfreeze more
        FreezeSchedule(milestones={1: "layer3", 2: "layer4"}).resolve("resnet18", 9)


def test_naming_a_backbones_parts_draws_no_random_numbers():
    """A seeded run must not depend on whether the stage table was computed before."""
    fresh = bb.BackboneSpec(bb.fam.test_convnext, None, bb.fam.CONVNEXT)  # table not cached
    torch.manual_seed(0)
    assert fresh.partial == "stage4"
    drawn = torch.rand(1)
    torch.manual_seed(0)
    assert torch.equal(drawn, torch.rand(1))


def test_vit_refuses_another_image_size_and_swin_takes_it():
    with pytest.raises(ConfigError, match="32 px images only .*--data.image_size 32"):
        TransferClassifier(backbone="test_vit", weights="none", num_classes=2, image_size=64)
    model = TransferClassifier(backbone="test_swin", weights="none", num_classes=2, image_size=48)
    assert model(torch.zeros(2, 3, 48, 48, dtype=torch.uint8)).shape == (2, 2)
    assert model.hparams.head == "gap"  # the family's default head, recorded


def cache_data():
    x, y = tiny_tensors(n=24, size=32)
    images = x.permute(0, 2, 3, 1).contiguous()
    return ImageDataModule.from_arrays(
        images[:16], y[:16], images[16:], y[16:], image_size=32, batch_size=8, augment=False, seed=3
    )


# One tiny stand-in per family (same family table entries; ~1 s to fit), with the stage a
# test unfreezes from besides the default partial one: the cache and export tests.
STAND_INS = {
    "test_resnet": "layer3",
    "test_efficientnet": "stage2",
    "test_mobilenet_v3": "stage2",
    **{name: stage for name, stage in FAMILIES.items() if name.startswith("test_")},
}


@pytest.mark.parametrize("name", STAND_INS)
def test_feature_cache_equals_training_through_the_images(name, monkeypatch):
    """Every family, with a milestone that rebuilds the cache for an earlier stage. ConvNeXt:
    stochastic depth in the cached prefix; RegNet, ResNet, EfficientNet, MobileNet, DenseNet:
    BatchNorm (its 0-d step counters in the cache key); ViT: tokens (N, T, C) in the cache;
    Swin: channels-last (N, H, W, C) maps."""
    # A seeded run reseeds every batch, so stochastic depth in the trainable part draws the
    # same numbers whether the batch came from the images or from the cache.
    monkeypatch.setenv("PL_GLOBAL_SEED", "0")

    def fit(cache):
        torch.manual_seed(0)
        model = TransferClassifier(backbone=name, weights="none", feature_cache=cache)
        store = FeatureCache()
        earlier = {"test_convnext": "stage2", "test_regnet": "block2"}.get(name, STAND_INS[name])
        schedule = FreezeSchedule(regime="partial", milestones={2: earlier}, backbone_lr_ratio=1.0)
        if name == "test_vit":
            schedule = FreezeSchedule(regime="partial", unfreeze_from=1, backbone_lr_ratio=1.0)
        trainer(3, callbacks=[schedule, store]).fit(model, cache_data())
        return model, store

    (cached, store), (plain, _) = fit(True), fit(False)
    assert store.builds >= 2
    for (key, a), b in zip(cached.state_dict().items(), plain.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.parametrize("name", ["test_regnet", "test_vit"])
def test_test_report_and_predict_in_automatic_precision_and_channels_last(name, tmp_path):
    """RegNet: BatchNorm and channels-last convolutions; ViT: tokens, attention, no Grad-CAM
    (the report leaves its heat maps out and says why)."""
    torch.manual_seed(0)
    model = TransferClassifier(backbone=name, weights="none", num_classes=3, image_size=32)
    assert model.hparams.channels_last  # the default
    data = TinyData(n=6, batch_size=4)
    with torch.no_grad():
        expected = torch.softmax(model.eval()(data.x), dim=1)  # float32
    before = snapshot(model)
    precision = fastest_precision("cpu")  # what the command line picks when none is given
    report = EvaluationReport(dirpath=str(tmp_path / "report"), verbose=False)
    writer = PredictionWriter(output=str(tmp_path / "predictions.csv"), top_k=3)
    t = trainer(callbacks=[report, writer], precision=precision)
    t.test(model, data)
    t.predict(model, DataLoader(TensorDataset(data.x, torch.arange(6)), batch_size=4))
    with open(tmp_path / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    got = torch.zeros(6, 3)
    for row in rows:
        for k in (1, 2, 3):  # class names c0, c1, c2
            got[int(row["path"]), int(row[f"top{k}"][1:])] = float(row[f"top{k}_probability"])
    # bf16 where the CPU has it: about 3 significant digits through the network
    tolerance = 1e-5 if precision == "32-true" else 2e-2
    torch.testing.assert_close(got, expected, rtol=0, atol=tolerance)
    metrics = report.metrics[0]
    assert metrics["num_samples"] == 6 and (tmp_path / "report" / "mistakes.png").is_file()
    correct = (got.argmax(dim=1) == data.y[:6]).float().mean().item()
    assert metrics["accuracy"] == pytest.approx(correct)
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())  # BatchNorm statistics too


def tv_state(name, seed):
    torch.manual_seed(seed)
    return bb.get_spec(name).model(weights=None).eval()


def test_imagenet_weights_come_from_torchvisions_cache_and_fill_the_torchvision_head(
    tmp_path, monkeypatch
):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    weights = torchvision.models.MobileNet_V3_Small_Weights.DEFAULT
    target = tmp_path / "hub" / "checkpoints" / os.path.basename(weights.url)

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no internet")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(WeightsError) as err:
        TransferClassifier(backbone="mobilenet_v3_small", weights="imagenet")
    assert str(target) in str(err.value) and weights.url in str(err.value)

    reference = tv_state("mobilenet_v3_small", seed=3)
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.save(reference.state_dict(), target)
    model = TransferClassifier(
        backbone="mobilenet_v3_small",
        weights="imagenet",
        num_classes=3,
        image_size=32,
        head="torchvision",
        channels_last=False,
    ).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.backbone(x), reference.features(x), rtol=0, atol=0)
    linear = reference.classifier[0]  # pretrained and kept; the last layer is new
    assert torch.equal(model.head[2].weight, linear.weight)
    assert model.head[-1].out_features == 3 and "imagenet" in model.weights_info


def test_densenet_files_with_torchvisions_old_key_names_load(tmp_path):
    reference = tv_state("test_densenet", seed=1)
    old = {
        re.sub(r"(denselayer\d+\.(?:norm|relu|conv))([12])\.", r"\1.\2.", k): v
        for k, v in reference.state_dict().items()
        if not k.endswith("num_batches_tracked")  # as in torchvision's published file
    }
    assert any(".norm.1." in k for k in old)
    torch.save(old, tmp_path / "densenet.pth")
    model = TransferClassifier(
        backbone="test_densenet", weights=str(tmp_path / "densenet.pth"), channels_last=False
    ).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        expected = torch.relu(reference.features(x))
        torch.testing.assert_close(model.backbone(x), expected, rtol=0, atol=0)


# One tiny member per family, through each format a user can get: ONNX by the default
# (torch.export-based) exporter, the .pt2 round trip, and the legacy TorchScript-based ONNX
# exporter (the fallback without onnxscript, which also runs export's own parity check at batch
# 1 and 3). About 36 CPU seconds in all (ONNX 2.3-4.6 s a family); VGG: tests/test_export.py.
@pytest.mark.parametrize("fmt", ["onnx", "pt2", "legacy"])
@pytest.mark.parametrize("name", STAND_INS)
def test_export_of_every_family_matches_the_model(name, fmt, tmp_path, monkeypatch):
    from tlfinetune import export as ex

    torch.manual_seed(0)
    model = TransferClassifier(backbone=name, weights="none", num_classes=3, image_size=32)
    set_trainable_from(model, bb.resolve_unfreeze_from(name, None))
    model.train()  # as after a fit: frozen prefix in eval mode, the rest in training mode
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        expected = torch.softmax(model.eval()(x), dim=1)
    model.train()
    if fmt == "legacy":
        monkeypatch.setattr(ex, "_installed", lambda package: package != "onnxscript")
    suffix = "onnx" if fmt == "legacy" else fmt
    # compared here, more tightly (the legacy export also runs its own check)
    result = ex.export(model, tmp_path / f"m.{suffix}", check=fmt == "legacy")
    assert ("legacy" in result.exporter) == (fmt == "legacy")
    if suffix == "onnx":
        import onnxruntime as ort  # a test dependency: its absence must fail, not skip

        session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
        (probs,) = session.run(None, {"images": x.numpy()})
        probs = torch.from_numpy(probs)
    else:
        probs = torch.export.load(result.path).module()(x)
    torch.testing.assert_close(probs, expected, rtol=0, atol=1e-5)
    assert result.metadata["backbone"] == name


@pytest.mark.slow
def test_backbones_command_lists_and_describes(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "tlfinetune", "backbones", "resnet50"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    text = out.stdout
    for stage, params in (("stem", "9,536"), ("layer4", "14,964,736")):
        assert re.search(rf"^{stage}\s+{params}\s", text, re.M), text
    assert "resize the shorter side to 232 px (bilinear" in text and "centre-crop 224 px" in text
    assert "[0.485, 0.456, 0.406]" in text and "[0.229, 0.224, 0.225]" in text
    assert "Default head: gap" in text and "trains from layer4" in text
    assert "IMAGENET1K_V2" in text and "80.9%" in text
    from tlfinetune.backbones import listing

    rows = {line.split()[0]: line.split() for line in listing().splitlines()[1:] if line}
    assert rows["vgg16"][1:] == ["vgg", "138.4M", "71.6", "224", "px", "flatten"]
    assert rows["efficientnet_b3"][4] == "300" and "test_vit" not in rows
