import contextlib
import csv
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny import TinyData, trainer

from tlfinetune import ConfigError, FreezeSchedule, ImageDataModule, TransferClassifier
from tlfinetune import export as ex
from tlfinetune.export import ExportError, export, sidecar_path
from tlfinetune.predict import PredictionWriter

README = Path(__file__).parents[1] / "README.md"

ort = pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A model after a short fit (frozen backbone, channels-last) and its checkpoint."""
    # classes, names and size from the data
    model = TransferClassifier(backbone="test_vgg16", weights="none")
    t = trainer(1, callbacks=[FreezeSchedule(regime="partial", unfreeze_from="block5")])
    t.fit(model, TinyData())
    # As confident as a trained model (one epoch leaves the logits about 0.02 apart), so that
    # 1e-4 on probabilities is a real test: Pillow's resize instead of torchvision's moves them
    # 2e-4 (README, "Deploy an exported model").
    last = [m for m in model.head.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        last.weight.mul_(30), last.bias.mul_(30)
    ckpt = tmp_path_factory.mktemp("ckpt") / "model.ckpt"
    t.save_checkpoint(ckpt)
    return model, ckpt


@pytest.fixture(scope="module")
def loaded(trained):
    _, ckpt = trained
    return TransferClassifier.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def onnx_model(loaded, tmp_path_factory):
    """The loaded checkpoint exported to ONNX once (the dynamo exporter takes seconds)."""
    return export(loaded, tmp_path_factory.mktemp("onnx") / "model.onnx")


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


def test_onnx_runs_in_onnxruntime_and_matches_the_model(loaded, onnx_model):
    result = onnx_model
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
    assert not list(result.path.parent.glob(".tlfinetune-export-*"))  # staging folder gone


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
    # What predict does before the model: VGG16's 256/224 shorter-side resize at 32 px, the crop
    prep = meta["preprocessing"]
    assert (prep["resize_size"], prep["resize_edge"], prep["crop_size"], prep["crop"]) == (
        37,
        "shorter",
        32,
        "center",
    )
    assert (prep["interpolation"], prep["antialias"]) == ("bilinear", True)
    assert prep["decode"]["jpeg_draft"] == [64, 64]  # load_rgb(path, 32): draft at 2 x 32


def readme_deployment_lines() -> str:
    """The Python block of README's "Deploy an exported model" section, as written there."""
    section = README.read_text().split("### Deploy an exported model", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def new_images(folder: Path) -> Path:
    """Images as users have them: large JPEG, rotated JPEG, odd sizes, small, grey, a subfolder."""
    rng = np.random.default_rng(0)

    def pixels(h, w, channels=3):
        coarse = rng.integers(0, 256, (h // 6 + 2, w // 6 + 2, channels), dtype=np.uint8)
        smooth = Image.fromarray(coarse.squeeze()).resize((w, h), Image.Resampling.BICUBIC)
        noise = rng.integers(-25, 25, (h, w, channels)).squeeze()
        return np.clip(np.asarray(smooth, np.int16) + noise, 0, 255).astype(np.uint8)

    folder.mkdir(parents=True)
    # both sides >= 2 * 64: predict decodes it at half scale (Image.draft)
    Image.fromarray(pixels(150, 210)).save(folder / "a_large.jpg", quality=90)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees to view
    Image.fromarray(pixels(45, 70)).save(folder / "b_rotated.jpg", exif=exif.tobytes())
    Image.fromarray(pixels(41, 50)).save(folder / "c_odd.png")  # odd crop offsets
    Image.fromarray(pixels(20, 27)).save(folder / "d_small.png")  # enlarged to 37
    Image.fromarray(pixels(60, 44, 1), "L").save(folder / "e_grey.png")
    (folder / "more").mkdir()  # predict takes subfolders too
    Image.fromarray(pixels(33, 33)).save(folder / "more" / "f_nested.png")
    return folder


def predicted_probabilities(model, images: Path, output: Path) -> dict[str, np.ndarray]:
    """``predict`` on a folder (in float32, as the exported model runs): {file name: probs}."""
    names = model.hparams.class_names
    writer = PredictionWriter(output=str(output), top_k=len(names))
    data = ImageDataModule(predict_dir=images, batch_size=8, num_workers=0)
    trainer(callbacks=[writer]).predict(model, data, return_predictions=False)
    out = {}
    with open(output) as f:
        for row in csv.DictReader(f):
            probs = np.zeros(len(names))
            for i in range(1, len(names) + 1):
                probs[names.index(row[f"top{i}"])] = float(row[f"top{i}_probability"])
            out[Path(row["path"]).name] = probs
    return out


def test_readme_deployment_lines_reproduce_predict(loaded, onnx_model, monkeypatch):
    folder = onnx_model.path.parent  # model.onnx, model.onnx.json, and new images beside them
    expected = predicted_probabilities(
        loaded, new_images(folder / "new_images"), folder / "predictions.csv"
    )
    monkeypatch.chdir(folder)
    namespace: dict = {}
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        exec(compile(readme_deployment_lines(), "README.md", "exec"), namespace)
    names = [Path(p).name for p in namespace["paths"]]
    assert sorted(names) == sorted(expected) and len(names) == 6
    got = namespace["probabilities"]
    assert got.max() > 0.5  # a model that prefers a class, as a trained one does
    for name, row in zip(names, got, strict=True):
        np.testing.assert_allclose(row, expected[name], atol=1e-4, rtol=0, err_msg=name)
    assert "new_images/a_large.jpg" in printed.getvalue()

    # The check can tell: the plain resize a new user tries first is far off predict's.
    plain = [Image.open(p).convert("RGB").resize((32, 32)) for p in namespace["paths"]]
    batch = np.stack([np.asarray(p, np.float32).transpose(2, 0, 1) / 255 for p in plain])
    (naive,) = namespace["session"].run(None, {"images": batch})
    assert np.abs(naive - got).max() > 1e-3


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
