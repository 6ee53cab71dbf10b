"""predict never writes over what the user had; bad --prediction settings are refused clearly."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from test_cli import FAST, make_folder
from test_streaming import Files, TableModel
from tiny import saved_checkpoint, trainer

from tlfinetune import ImageDataModule, TransferClassifier
from tlfinetune import predict as predict_module
from tlfinetune.cli import main
from tlfinetune.errors import ConfigError
from tlfinetune.predict import OutputError, PredictionWriter


def predict(writer, root: Path, n: int = 6, classes: int = 3, data=None, **kwargs):
    """Predict ``n`` table images with ``writer`` into ``root``; returns the Trainer."""
    model = TableModel(torch.randn(n, classes), [f"c{i}" for i in range(classes)])
    t = pl.Trainer(
        accelerator="cpu", logger=False, callbacks=[writer], enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=root,
    )  # fmt: skip
    t.predict(model, data or Files(n), return_predictions=False, **kwargs)
    return t


def rows_of(path: Path) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_an_existing_output_is_refused_before_predicting_unless_overwrite(tmp_path):
    out = tmp_path / "mine.csv"
    out.write_text("precious")
    writer = PredictionWriter(output=str(out))
    with pytest.raises(OutputError) as err:
        predict(writer, tmp_path)
    assert str(out) in str(err.value) and "--prediction.overwrite true" in str(err.value)
    assert out.read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.csv"]  # no part file either

    predict(PredictionWriter(output=str(out), overwrite=True), tmp_path)
    assert len(rows_of(out)) == 7 and rows_of(out)[0][:3] == ["path", "label", "probability"]


def test_without_output_an_earlier_predictions_csv_is_kept_and_the_new_one_numbered(
    tmp_path, capsys
):
    (tmp_path / "predictions.csv").write_text("earlier")
    writer = PredictionWriter()
    predict(writer, tmp_path)
    assert (tmp_path / "predictions.csv").read_text() == "earlier"
    assert len(rows_of(tmp_path / "predictions.1.csv")) == 7
    said = capsys.readouterr().out
    assert f"to {tmp_path / 'predictions.1.csv'}" in said
    assert f"; the earlier predictions in {tmp_path} are kept" in said
    predict(writer, tmp_path)  # the same writer again: the next number, not its last file
    assert len(rows_of(tmp_path / "predictions.2.csv")) == 7
    assert len(rows_of(tmp_path / "predictions.1.csv")) == 7


def test_the_checkpoint_and_the_images_are_never_overwritten(tmp_path):
    # A real checkpoint of the table model, read by predict(ckpt_path=...).
    first = predict(PredictionWriter(output=str(tmp_path / "first.csv")), tmp_path)
    ckpt = tmp_path / "model.ckpt"
    first.save_checkpoint(ckpt)
    saved = ckpt.read_bytes()
    writer = PredictionWriter(output=str(ckpt), overwrite=True)
    with pytest.raises(OutputError, match="is the checkpoint being read") as err:
        predict(writer, tmp_path, ckpt_path=str(ckpt))
    assert "even with --prediction.overwrite" in str(err.value)
    assert ckpt.read_bytes() == saved

    data = Files(6)
    images = tmp_path / "images"
    images.mkdir()
    data.predict_files = [images / f"{i}.png" for i in range(6)]
    for f in data.predict_files:
        f.write_bytes(b"an image")
    writer = PredictionWriter(output=str(data.predict_files[4]), overwrite=True)
    with pytest.raises(OutputError, match="one of the images being predicted"):
        predict(writer, tmp_path, data=data)
    assert data.predict_files[4].read_bytes() == b"an image"


def test_heat_maps_replace_no_image_and_an_earlier_run_only_when_asked(tmp_path, one_thread):
    images = tmp_path / "images"
    make_folder(images, classes=("x", "y"), per_class=2, size=32)
    dm = ImageDataModule(predict_dir=images, image_size=32, batch_size=8, num_workers=0)
    model = TransferClassifier(backbone="test_vgg16", weights="none", num_classes=2, image_size=32)
    originals = {p: p.read_bytes() for p in images.rglob("*.png")}
    out = str(tmp_path / "p.csv")

    def predict_with(**kwargs):
        trainer(callbacks=[PredictionWriter(**kwargs)]).predict(model, dm, return_predictions=False)

    # The images' own folder: each heat map would replace its image. Never, whatever is asked.
    with pytest.raises(OutputError, match="over the images being predicted") as err:
        predict_with(output=out, explain=str(images), overwrite=True)
    assert str(images) in str(err.value) and "even with --prediction.overwrite" in str(err.value)
    assert {p: p.read_bytes() for p in images.rglob("*.png")} == originals

    heat = tmp_path / "heat"
    (heat / "x").mkdir(parents=True)
    (heat / "x" / "001.png").write_bytes(b"an earlier heat map")
    with pytest.raises(OutputError, match="already holds 1 of the heat maps") as err:
        predict_with(output=out, explain=str(heat))
    assert "--prediction.overwrite true" in str(err.value)
    assert (heat / "x" / "001.png").read_bytes() == b"an earlier heat map"
    assert not (tmp_path / "p.csv").exists()  # refused before predicting anything
    predict_with(output=out, explain=str(heat), overwrite=True)
    assert (heat / "x" / "001.png").read_bytes()[:4] == b"\x89PNG"
    assert len(list(heat.rglob("*.png"))) == 4

    with pytest.raises(OutputError, match="is a file"):
        predict_with(output=str(tmp_path / "q.csv"), explain=out)


@pytest.mark.parametrize("top_k", [0, -1, True, 2.5])
def test_top_k_below_one_is_refused_at_construction(top_k):
    with pytest.raises(ConfigError, match=rf"--prediction.top_k {top_k!r}: .*1 or more"):
        PredictionWriter(top_k=top_k)


def test_top_k_above_the_number_of_classes_lists_every_class_and_says_so(tmp_path, data_log):
    out = tmp_path / "p.csv"
    predict(PredictionWriter(output=str(out), top_k=7), tmp_path, classes=3)
    assert rows_of(out)[0][-2:] == ["top3", "top3_probability"]
    assert "Listing all 3 classes per image: --prediction.top_k 7" in data_log.text


def test_unwritable_outputs_are_refused_before_predicting(tmp_path, monkeypatch):
    folder = tmp_path / "a folder"
    folder.mkdir()
    with pytest.raises(OutputError, match="is a folder") as err:
        predict(PredictionWriter(output=str(folder)), tmp_path)
    assert str(folder) in str(err.value)

    (tmp_path / "blocker").write_text("a file where a folder should be")
    with pytest.raises(OutputError, match="Cannot create the folder"):
        predict(PredictionWriter(output=str(tmp_path / "blocker" / "p.csv")), tmp_path)

    # Root writes anywhere, so the permission check is what is tested: os.access says no.
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    real = os.access
    monkeypatch.setattr(
        predict_module.os, "access", lambda p, mode: Path(p) != readonly and real(p, mode)
    )
    with pytest.raises(OutputError, match="is not writable") as err:
        predict(PredictionWriter(output=str(readonly / "p.csv")), tmp_path)
    assert str(readonly) in str(err.value) and not list(readonly.iterdir())
    with pytest.raises(OutputError, match="is not writable"):  # the default file too
        predict(PredictionWriter(), readonly)


def test_a_refusal_comes_before_any_image_is_predicted(tmp_path):
    out = tmp_path / "mine.csv"
    out.write_text("precious")
    model = TableModel(torch.randn(6, 3), ["a", "b", "c"])
    calls = []
    model.register_forward_hook(lambda *args: calls.append(1))
    t = trainer(callbacks=[PredictionWriter(output=str(out))])
    with pytest.raises(OutputError):
        t.predict(model, Files(6), return_predictions=False)
    assert calls == []


def test_file_names_with_newlines_and_commas_survive_the_merge(tmp_path):
    data = Files(10, batch_size=3)
    data.predict_files[5] = Path("photos/new\nline.jpg")
    data.predict_files[6] = Path("photos/carriage\r\nreturn, comma.jpg")
    out = tmp_path / "p.csv"
    predict(PredictionWriter(output=str(out), top_k=2), tmp_path, n=10, data=data)
    rows = rows_of(out)
    assert [r[0] for r in rows[1:]] == [str(f) for f in data.predict_files]


@pytest.mark.slow
def test_predict_from_the_command_line_keeps_what_the_user_had(tmp_path, capsys, one_thread):
    data = make_folder(tmp_path / "data", classes=("a", "b"), per_class=2, size=32)
    dm = ImageDataModule(root=data, image_size=32, batch_size=8, num_workers=0, val_split=0.5)
    ckpt = tmp_path / "model.ckpt"
    saved_checkpoint(ckpt, dm)
    saved = ckpt.read_bytes()
    images = tmp_path / "new"
    make_folder(images, classes=("x",), per_class=2, size=32)
    odd = images / "x" / "new\nline.png"
    (images / "x" / "000.png").rename(odd)
    out = tmp_path / "out"
    out.mkdir()
    (out / "predictions.csv").write_text("earlier")

    args = ["predict", f"--ckpt_path={ckpt}", f"--data.predict_dir={images}",
            f"--trainer.default_root_dir={out}", *FAST]  # fmt: skip
    refused = subprocess.run(
        [sys.executable, "-m", "tlfinetune", *args, f"--prediction.output={ckpt}",
         "--prediction.overwrite=true"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert "Traceback" not in refused.stderr
    assert f"--prediction.output {ckpt} is the checkpoint being read" in refused.stderr
    assert ckpt.read_bytes() == saved

    # The rest in this process (the entry point the command runs): no second interpreter start.
    main([*args, "--prediction.top_k=9"])
    assert (out / "predictions.csv").read_text() == "earlier"
    assert f"Wrote 2 predictions to {out / 'predictions.1.csv'}" in capsys.readouterr().out
    rows = rows_of(out / "predictions.1.csv")
    assert sorted(r[0] for r in rows[1:]) == sorted([str(odd), str(images / "x" / "001.png")])
    assert rows[0][-2:] == ["top2", "top2_probability"]
    with pytest.raises(SystemExit) as stop:
        main([*args, "--prediction.top_k=0"])
    assert stop.value.code == 2
    assert "--prediction.top_k 0: " in capsys.readouterr().err
