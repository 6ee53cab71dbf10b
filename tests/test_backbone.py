"""Backbone table, weights loading (torchvision format, safetensors, checkpoints), unsafe files.

The real VGG16 where its architecture is the point (the Keras table against torchvision's
modules, torchvision-format weights, head sizes); test_vgg16, its narrow stand-in, elsewhere.
"""

import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision
from tiny import TinyData, trainer

from tlfinetune import ConfigError, TransferClassifier, WeightsError
from tlfinetune.backbone import BACKBONES, build_backbone, resolve_unfreeze_from


def features_state_dict(seed=0, name="vgg16"):
    """A torchvision-format VGG state dict without classifier keys (the file is ~60 MB)."""
    torch.manual_seed(seed)
    model = getattr(torchvision.models, name)()
    return {k: v for k, v in model.state_dict().items() if k.startswith("features.")}, model


def test_keras_layer_table_matches_torchvision_features():
    vgg16 = BACKBONES["vgg16"]
    assert vgg16.num_modules == len(torchvision.models.vgg16().features) == 31
    names = [layer.keras_name for layer in vgg16.layers]
    assert len(names) == 19 and names[15] == "block5_conv1" and names[14] == "block4_pool"
    assert resolve_unfreeze_from("vgg16", 15) == resolve_unfreeze_from("vgg16", "block5") == 24
    assert resolve_unfreeze_from("vgg16", "block4_pool") == 23
    assert resolve_unfreeze_from("vgg16", 0) == 0
    bn = torchvision.models.vgg16_bn().features
    index = resolve_unfreeze_from("vgg16_bn", "block5_conv1")
    assert isinstance(bn[index], torch.nn.Conv2d) and bn[index].in_channels == 512
    assert all(isinstance(bn[i], torch.nn.MaxPool2d) for i in range(index) if i == index - 1)


def test_the_test_stand_in_has_vgg16s_layout_and_no_imagenet_weights():
    real, tiny = BACKBONES["vgg16"], BACKBONES["test_vgg16"]
    assert tiny.layers == real.layers and tiny.num_modules == real.num_modules
    features, reference = build_backbone("test_vgg16"), torchvision.models.vgg16().features
    assert [type(m) for m in features] == [type(m) for m in reference]
    assert sum(p.numel() for p in features.parameters()) < 100_000
    with pytest.raises(WeightsError) as err:
        TransferClassifier(backbone="test_vgg16", weights="imagenet")
    assert "test_vgg16" in str(err.value) and "--model.weights none" in str(err.value)


@pytest.mark.parametrize("size, expected", [(32, 512), (64, 2048), (224, 25088)])
def test_head_in_features_follow_image_size(size, expected):
    model = TransferClassifier(num_classes=4, weights="none", image_size=size)
    assert model.head[1].in_features == expected
    assert model(torch.zeros(2, 3, size, size, dtype=torch.uint8)).shape == (2, 4)


@pytest.mark.parametrize("head", ["gap", "torchvision"])
def test_other_heads(head):
    model = TransferClassifier(
        backbone="test_vgg16", num_classes=5, weights="none", image_size=32, head=head
    )
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 5)


def test_head_from_a_factory():
    def factory(in_features, num_classes):
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(in_features, num_classes))

    model = TransferClassifier(
        backbone="test_vgg16", num_classes=2, weights="none", image_size=64, head=factory
    )
    assert model.head[1].in_features == 32 * 2 * 2  # test_vgg16's (C, H, W) at 64 px


def test_unknown_backbone_lists_choices():
    with pytest.raises(ConfigError, match="vgg16_bn"):
        TransferClassifier(backbone="resnet9000", weights="none")


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_torchvision_format_file_round_trips(tmp_path, fmt):
    state, reference = features_state_dict()
    path = tmp_path / f"vgg16-features.{fmt}"
    if fmt == "pth":
        torch.save(state, path)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, path)
    model = TransferClassifier(num_classes=3, weights=str(path), image_size=32).eval()
    x = torch.rand(2, 3, 32, 32)
    expected = reference.features(model.normalize(x).contiguous())
    torch.testing.assert_close(model.features(model.normalize(x)), expected, rtol=1e-5, atol=1e-5)


def test_pickle_payload_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    path = tmp_path / "evil.pth"
    torch.save({"features.0.weight": Payload()}, path)
    with pytest.raises(WeightsError) as err:
        TransferClassifier(backbone="test_vgg16", num_classes=3, weights=str(path), image_size=32)
    assert "evil.pth" in str(err.value) and "refused" in str(err.value)
    assert not marker.exists()


def test_missing_and_mismatched_files_are_named(tmp_path):
    with pytest.raises(WeightsError, match="nope.pth"):
        TransferClassifier(weights=str(tmp_path / "nope.pth"))
    state, _ = features_state_dict(name="vgg11")
    path = tmp_path / "vgg11.pth"
    torch.save(state, path)
    with pytest.raises(WeightsError) as err:
        TransferClassifier(backbone="vgg16", weights=str(path))
    assert "vgg11.pth" in str(err.value) and "vgg16" in str(err.value)
    torch.save({"something.else": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(WeightsError, match="features"):
        TransferClassifier(weights=str(tmp_path / "other.pth"))


def test_imagenet_offline_says_where_the_file_goes(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no internet")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(WeightsError) as err:
        TransferClassifier(weights="imagenet")
    text = str(err.value)
    assert "vgg16-397923af.pth" in text
    assert str(tmp_path / "hub" / "checkpoints") in text
    assert "--model.weights none" in text


def test_imagenet_from_torchvision_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    state, reference = features_state_dict(seed=3)
    torch.save(state, cache / "vgg16-397923af.pth")
    model = TransferClassifier(num_classes=2, weights="imagenet", image_size=32)
    torch.testing.assert_close(model.backbone[0].weight, reference.features[0].weight)
    assert "imagenet" in model.weights_info


def test_checkpoint_as_weights_transfers_backbone_only(tmp_path):
    source = TransferClassifier(backbone="test_vgg16", weights="none", num_classes=3, image_size=32)
    t = trainer(1, callbacks=[])
    t.fit(source, TinyData())
    ckpt = tmp_path / "run.ckpt"
    t.save_checkpoint(ckpt)
    target = TransferClassifier(
        backbone="test_vgg16", weights=str(ckpt), num_classes=5, image_size=32
    )
    for a, b in zip(
        source.backbone.state_dict().values(), target.backbone.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b)
    assert target.head[-1].out_features == 5


def test_load_from_checkpoint_gives_identical_predictions(tmp_path):
    model = TransferClassifier(backbone="test_vgg16", weights="none")
    t = trainer(1)
    t.fit(model, TinyData())
    path = tmp_path / "model.ckpt"
    t.save_checkpoint(path)
    loaded = TransferClassifier.load_from_checkpoint(path, map_location="cpu", weights_only=True)
    x = TinyData().x[:5]
    model.eval(), loaded.eval()
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    assert loaded.hparams.class_names == ["c0", "c1", "c2"]
    assert loaded.hparams.weights == "none" and loaded.hparams.backbone == "test_vgg16"


@pytest.mark.parametrize("channels_last", [True, False])
def test_normalisation_is_the_weights_preset(channels_last):
    """uint8 or [0, 1] float in; (x - ImageNet mean) / std out, as torchvision's preset does."""
    model = TransferClassifier(
        backbone="test_vgg16",
        num_classes=2,
        weights="none",
        image_size=32,
        channels_last=channels_last,
    )
    x = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    preset = torchvision.models.VGG16_Weights.IMAGENET1K_V1.transforms()
    mean, std = (
        torch.tensor(preset.mean).view(1, 3, 1, 1),
        torch.tensor(preset.std).view(1, 3, 1, 1),
    )
    expected = (x.float() / 255 - mean) / std
    torch.testing.assert_close(model.normalize(x), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(model.normalize(x.float() / 255), expected, rtol=0, atol=1e-6)
    assert model.normalize(x).is_contiguous(memory_format=torch.channels_last) == channels_last
