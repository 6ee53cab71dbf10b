import json

import numpy as np
import pytest
import torch
from tiny import TinyData, trainer

from tlfinetune import ConfigError, FreezeSchedule, TransferClassifier
from tlfinetune import export as ex
from tlfinetune.export import ExportError, export, sidecar_path

ort = pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A model after a short fit (frozen backbone, channels-last) and its checkpoint."""
    # classes, names and size from the data
    model = TransferClassifier(backbone="test_vgg16", weights="none")
    t = trainer(1, callbacks=[FreezeSchedule(regime="partial", unfreeze_from="block5")])
    t.fit(model, TinyData())
    ckpt = tmp_path_factory.mktemp("ckpt") / "model.ckpt"
    t.save_checkpoint(ckpt)
    return model, ckpt


@pytest.fixture(scope="module")
def loaded(trained):
    _, ckpt = trained
    return TransferClassifier.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True)


def reference(model, x):
    model.eval()
    with torch.no_grad():
        return torch.softmax(model(x), dim=1)


def inputs(batch):
    return torch.rand(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch))


def test_checkpoint_loads_with_weights_only(trained, loaded):
    model, _ = trained
    assert loaded.hparams.class_names == ["c0", "c1", "c2"]
    assert loaded.hparams.image_size == 32 and loaded.hparams.num_classes == 3
    for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    x = inputs(3)
    assert torch.allclose(reference(model, x), reference(loaded, x), atol=1e-6)


def test_onnx_runs_in_onnxruntime_and_matches_the_model(loaded, tmp_path):
    result = export(loaded, tmp_path / "model.onnx")
    assert result.format == "onnx" and "dynamo=True" in result.exporter  # not the legacy path
    assert result.metadata["opset"] >= 18
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    (inp,), (out,) = session.get_inputs(), session.get_outputs()
    assert (inp.name, out.name) == ("images", "probabilities")
    assert isinstance(inp.shape[0], str) and inp.shape[1:] == [3, 32, 32]  # dynamic batch
    for batch in (1, 3):
        x = inputs(batch)
        (probs,) = session.run(None, {"images": x.numpy()})
        assert probs.shape == (batch, 3)
        np.testing.assert_allclose(probs, reference(loaded, x).numpy(), atol=1e-4)
        np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert not list(tmp_path.glob(".tlfinetune-export-*"))  # the staging folder is gone


def test_pt2_loads_back_and_matches_the_model(trained, tmp_path):
    model, _ = trained  # straight after fit: frozen prefix, channels-last, train mode
    state = (model.training, model.hparams.channels_last, model.frozen_prefix())
    result = export(model, tmp_path / "model.pt2")
    assert (model.training, model.hparams.channels_last, model.frozen_prefix()) == state
    program = torch.export.load(result.path).module()
    for batch in (1, 3):
        x = inputs(batch)
        probs = program(x)
        assert probs.shape == (batch, 3)
        assert torch.allclose(probs, reference(model, x), atol=1e-4)


def test_sidecar_describes_the_model(loaded, tmp_path):
    out = tmp_path / "sub" / "m.pt2"  # missing folders are created
    result = export(loaded, out, "pt2", check=False)
    assert result.sidecar == sidecar_path(out) == tmp_path / "sub" / "m.pt2.json"
    meta = json.loads(result.sidecar.read_text())
    assert meta == result.metadata
    assert meta["file"] == "m.pt2" and meta["format"] == "pt2"
    assert meta["class_names"] == ["c0", "c1", "c2"] and meta["num_classes"] == 3
    assert meta["input_size"] == [3, 32, 32] and meta["input"]["shape"] == ["N", 3, 32, 32]
    assert meta["value_range"] == [0.0, 1.0] and meta["input"]["dtype"] == "float32"
    assert meta["normalization"]["mean"] == [0.485, 0.456, 0.406]
    assert meta["normalization"]["std"] == [0.229, 0.224, 0.225]
    assert meta["normalization"]["applied_inside_model"] is True
    assert meta["backbone"] == "test_vgg16"
    assert meta["output"]["shape"] == ["N", 3] and "probabilities" in meta["output"]["meaning"]


def test_refuses_to_overwrite_unless_asked(loaded, tmp_path):
    out = tmp_path / "model.pt2"
    out.write_bytes(b"precious")
    with pytest.raises(ExportError, match="overwrite"):
        export(loaded, out, check=False)
    assert out.read_bytes() == b"precious" and not sidecar_path(out).exists()
    export(loaded, out, overwrite=True, check=False)
    assert torch.export.load(out) is not None
    out.unlink()
    with pytest.raises(ExportError, match="model.pt2.json already exists"):
        export(loaded, out, check=False)  # the sidecar alone is protected too


def test_legacy_onnx_exporter_is_the_fallback(loaded, tmp_path, monkeypatch):
    monkeypatch.setattr(ex, "_installed", lambda name: name != "onnxscript")
    result = export(loaded, tmp_path / "legacy.onnx")  # its parity check runs batch 1 and 3
    assert "legacy" in result.exporter and result.metadata["opset"] == ex.LEGACY_OPSET


@pytest.mark.parametrize(
    "output, kwargs, error, words",
    [
        ("model.onnx", {"format": "tflite"}, ConfigError, ["'tflite'", "onnx, pt2"]),
        ("model.keras", {}, ConfigError, ["model.keras", "onnx, pt2"]),
        ("blocker/model.pt2", {}, ExportError, ["Cannot create the output folder"]),
    ],
)
def test_bad_requests_are_reported(loaded, tmp_path, output, kwargs, error, words):
    (tmp_path / "blocker").write_text("a file where a folder should be")
    with pytest.raises(error) as err:
        export(loaded, tmp_path / output, **kwargs)
    for w in words:
        assert w in str(err.value)


def test_missing_onnx_names_the_extra(loaded, tmp_path, monkeypatch):
    monkeypatch.setattr(ex, "_installed", lambda name: False)
    with pytest.raises(ExportError, match=r"tlfinetune\[export\]"):
        export(loaded, tmp_path / "model.onnx")
    assert not (tmp_path / "model.onnx").exists()


def test_command_line_exports_a_checkpoint(trained, capsys):
    _, ckpt = trained
    ex.main(["--ckpt_path", str(ckpt), "--format", "pt2", "--no_check"])
    out = ckpt.with_suffix(".pt2")
    assert out.is_file() and sidecar_path(out).is_file()
    assert str(out) in capsys.readouterr().out
    with pytest.raises(ConfigError, match="no such checkpoint"):
        ex.main(["--ckpt_path", str(ckpt.with_name("missing.ckpt"))])


def test_command_line_flags_parse_as_documented():
    parser = ex.export_parser()
    args = parser.parse_args(["--ckpt_path", "a.ckpt", "--no_check", "--overwrite"])
    assert (args.check, args.overwrite, args.format, args.output) == (False, True, None, None)
    args = parser.parse_args(["--ckpt_path", "a.ckpt", "--format", "pt2", "--output", "m.pt2"])
    assert (args.check, args.overwrite, args.format, str(args.output)) == (
        True,
        False,
        "pt2",
        "m.pt2",
    )
    with pytest.raises(SystemExit):
        parser.parse_args(["--ckpt_path", "a.ckpt", "--format", "tflite"])
