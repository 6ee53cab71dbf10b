"""`python -m tlfinetune compare`: one row per regime, the same budget, files written."""

import csv

import pytest
from PIL import Image

from tlfinetune.compare import COLUMNS, compare, write_comparison
from tlfinetune.errors import ConfigError

# A second backbone of another family: the RegNet stand-in (test_regnet, BatchNorm included).
OTHER, OTHER_PARAMS = "test_regnet", 27_044


@pytest.mark.slow
def test_compare_covers_every_backbone_and_regime_asked(tmp_path):
    rows = compare([
        "--data.root=demo", "--data.image_size=32", "--model.weights=none",
        # Two regimes, not three: each run is a process of its own (~5 s); partial's counts are
        # test_freeze's. Two backbones x two regimes is one run more than three regimes were.
        "--backbones", f"test_vgg16,{OTHER}",
        "--regimes", "frozen,full", f"--trainer.default_root_dir={tmp_path}",
        "--trainer.max_epochs=1", "--trainer.limit_train_batches=2",
        "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false",
        "--data.num_workers=0",
    ])  # fmt: skip
    assert [(r["backbone"], r["regime"]) for r in rows] == [
        (b, r) for b in ("test_vgg16", OTHER) for r in ("frozen", "full")
    ]
    trainable = [r["trainable_params"] for r in rows]
    assert trainable[0] < trainable[1] and trainable[2] < trainable[3]
    assert trainable[3] - trainable[2] == OTHER_PARAMS  # full trains the whole backbone too
    # frozen: the whole backbone (test_vgg16 has 57,828 parameters where vgg16 has 14,714,688)
    assert rows[1]["frozen_params"] == 0 and rows[0]["frozen_params"] == 57_828
    assert rows[2]["frozen_params"] == OTHER_PARAMS and rows[3]["frozen_params"] == 0
    with open(tmp_path / "comparison.csv") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == list(COLUMNS) and len(table) == 4
    assert COLUMNS[:2] == ("backbone", "regime")
    assert f"| {OTHER} | full |" in (tmp_path / "comparison.md").read_text()
    assert (tmp_path / "compare" / OTHER / "full" / "fit.yaml").is_file()
    with Image.open(tmp_path / "comparison.png") as image:
        assert image.size[0] > 500


def test_unknown_regime_is_refused():
    with pytest.raises(ConfigError, match="frozen, partial, full"):
        compare(["--regimes=frozen,sometimes"])


def test_unknown_backbone_is_refused_before_any_training(tmp_path):
    with pytest.raises(ConfigError, match="--backbones: Unknown backbone 'vgg61'.*vgg16"):
        compare(["--backbones=test_vgg16,vgg61", f"--trainer.default_root_dir={tmp_path}"])
    assert not (tmp_path / "compare").exists()


def test_a_second_comparison_keeps_the_first(tmp_path, capsys):
    row = dict.fromkeys(COLUMNS, 1) | {"backbone": "test_vgg16", "regime": "frozen"}
    write_comparison([row], tmp_path)
    earlier = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert sorted(earlier) == ["comparison.csv", "comparison.md", "comparison.png"]
    capsys.readouterr()
    written = write_comparison([row, row | {"regime": "full"}], tmp_path)
    assert written == tmp_path / "comparison.1.csv"
    assert {name: (tmp_path / name).read_bytes() for name in earlier} == earlier
    with open(written) as f:
        assert [r["regime"] for r in csv.DictReader(f)] == ["frozen", "full"]
    assert "| full |" in (tmp_path / "comparison.1.md").read_text()
    assert (tmp_path / "comparison.1.png").is_file()
    said = capsys.readouterr().out
    assert f"Comparison written to {written}, comparison.1.md and comparison.1.png" in said
    assert "the earlier comparison files there are kept" in said
