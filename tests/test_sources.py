"""Folder and CSV sources: layouts, class order, splits and the errors that name the culprit."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from datafiles import colour, dm_kwargs, fail_listing, file_set, first_pixel, tree, write_csv

from tlfinetune.data import ImageDataModule
from tlfinetune.errors import DataError, TLFinetuneError


def test_folder_with_train_val_test(tmp_path):
    tree(tmp_path, {"train/cat": 3, "train/dog": 2, "val/cat": 1, "val/dog": 2, "test/dog": 1})
    dm = ImageDataModule(root=str(tmp_path), **dm_kwargs())
    assert dm.class_names == ["cat", "dog"] and dm.num_classes == 2
    assert dm.class_to_idx == {"cat": 0, "dog": 1}
    dm.setup("fit")
    assert len(dm.train_dataset) == 5 and len(dm.val_dataset) == 3
    assert dm.train_dataset.labels == [0, 0, 0, 1, 1]
    assert all("/train/" in p.as_posix() for p in dm.train_dataset.files)
    assert all("/val/" in p.as_posix() for p in dm.val_dataset.files)
    x, y = next(iter(dm.train_dataloader()))
    assert x.dtype == torch.uint8 and x.shape == (4, 3, 8, 8) and y.dtype == torch.int64
    assert dm.test_dataset is None
    dm.setup("test")
    assert [p.name for p in dm.test_dataset.files] == ["img000.png"]
    assert dm.test_dataset.labels == [1]
    assert len(list(dm.test_dataloader())) == 1


def test_train_folder_without_val_is_split_and_valid_alias(tmp_path):
    tree(tmp_path / "a", {"train/x": 5, "train/y": 5})
    dm = ImageDataModule(root=tmp_path / "a", val_split=0.4, **dm_kwargs())
    dm.setup("fit")
    assert (len(dm.train_dataset), len(dm.val_dataset)) == (6, 4)
    tree(tmp_path / "b", {"train/x": 2, "train/y": 2, "valid/x": 1})
    dm = ImageDataModule(root=tmp_path / "b", **dm_kwargs())
    dm.setup("fit")
    assert len(dm.val_dataset) == 1 and dm.val_dataset.labels == [0]


def test_single_folder_split_is_stratified_deterministic_and_leak_free(tmp_path):
    tree(tmp_path, {"a": 10, "b": 20, "c": 5})
    splits = {}
    for seed in (0, 0, 1):
        dm = ImageDataModule(root=tmp_path, seed=seed, val_split=0.2, **dm_kwargs())
        dm.setup("fit")
        train, val = file_set(dm.train_dataset), file_set(dm.val_dataset)
        assert not train & val
        assert len(train | val) == 35
        counts = np.bincount(dm.val_dataset.labels, minlength=3).tolist()
        assert counts == [2, 4, 1]
        assert np.bincount(dm.train_dataset.labels).tolist() == [8, 16, 4]
        splits.setdefault(seed, []).append(val)
    assert splits[0][0] == splits[0][1]
    assert splits[0][0] != splits[1][0]


def test_recursion_hidden_folders_and_non_image_files(tmp_path, make_image):
    tree(tmp_path, {"train/cat": 2, "train/dog": 2, "val/cat": 1, "val/dog": 1})
    make_image(tmp_path / "train" / "cat" / "indoor" / "deep" / "more.png")
    make_image(tmp_path / "train" / ".ipynb_checkpoints" / "x.png")
    make_image(tmp_path / "train" / "cat" / ".ipynb_checkpoints" / "copy.png")
    make_image(tmp_path / ".git" / "y.png")
    (tmp_path / "train" / "dog" / "notes.txt").write_text("not an image")
    (tmp_path / "train" / "dog" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (tmp_path / "train" / "dog" / "labels.json").write_text("{}")
    dm = ImageDataModule(root=tmp_path, **dm_kwargs())
    assert dm.class_names == ["cat", "dog"]
    dm.setup("fit")
    names = sorted(p.relative_to(tmp_path).as_posix() for p in dm.train_dataset.files)
    assert names == [
        "train/cat/img000.png",
        "train/cat/img001.png",
        "train/cat/indoor/deep/more.png",
        "train/dog/img000.png",
        "train/dog/img001.png",
    ]


def test_class_order_is_sorted_folder_names(tmp_path):
    tree(tmp_path, {"b": 2, "A": 2, "a10": 2, "a2": 2})
    assert ImageDataModule(root=tmp_path, **dm_kwargs()).class_names == ["A", "a10", "a2", "b"]


def test_class_names_need_no_image_decoding(tmp_path):
    tree(tmp_path, {"a": 2, "b": 2})
    (tmp_path / "a" / "broken.jpg").write_bytes(b"nope")
    dm = ImageDataModule(root=tmp_path, **dm_kwargs())
    assert dm.num_classes == 2  # available before setup; the bad file is found by setup
    with pytest.raises(DataError, match="broken.jpg"):
        dm.setup("fit")


def test_missing_root(tmp_path):
    with pytest.raises(DataError, match="nowhere") as exc:
        _ = ImageDataModule(root=tmp_path / "nowhere", **dm_kwargs()).num_classes
    assert isinstance(exc.value, TLFinetuneError)
    with pytest.raises(DataError, match="data.root"):
        _ = ImageDataModule(**dm_kwargs()).class_names


def test_root_that_is_a_file(tmp_path, make_image):
    path = make_image(tmp_path / "one.png")
    with pytest.raises(DataError, match="one.png.*not a folder"):
        _ = ImageDataModule(root=path).class_names


def test_root_without_class_folders(tmp_path, make_image):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty.*no class folders"):
        _ = ImageDataModule(root=tmp_path / "empty").class_names
    make_image(tmp_path / "loose" / "a.png")
    (tmp_path / "loose" / ".ipynb_checkpoints").mkdir()
    with pytest.raises(DataError, match="loose.*1 images directly"):
        _ = ImageDataModule(root=tmp_path / "loose").class_names


def test_root_with_class_folders_but_no_images(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "readme.txt").write_text("x")
    with pytest.raises(DataError, match=f"{tmp_path}.*no images"):
        _ = ImageDataModule(root=tmp_path).class_names


def test_class_folder_without_images_is_named(tmp_path):
    tree(tmp_path, {"train/a": 2, "train/b": 2})
    (tmp_path / "train" / "ghost").mkdir()
    (tmp_path / "train" / "ghost" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match=r"train/ghost has no images"):
        _ = ImageDataModule(root=tmp_path).class_names


def test_val_and_test_classes_must_exist_in_train(tmp_path):
    tree(tmp_path, {"train/a": 2, "train/b": 2, "val/a": 1, "val/zebra": 1})
    with pytest.raises(DataError, match=r"val/zebra"):
        _ = ImageDataModule(root=tmp_path).class_names
    tree(tmp_path / "t", {"train/a": 2, "train/b": 2, "test/b": 1, "test/yak": 1})
    with pytest.raises(DataError, match=r"test/yak"):
        _ = ImageDataModule(root=tmp_path / "t").class_names


def test_single_class_is_an_error(tmp_path):
    tree(tmp_path, {"only": 4})
    with pytest.raises(DataError, match="single class"):
        _ = ImageDataModule(root=tmp_path).class_names


def test_csv_sources(tmp_path, make_image):
    for i in range(4):
        make_image(tmp_path / "imgs" / f"c{i}.png", colour(0, i))
        make_image(tmp_path / "imgs" / f"d{i}.png", colour(1, i))
    absolute = make_image(tmp_path / "elsewhere" / "abs.png")
    train = write_csv(
        tmp_path / "train.csv",
        [(f"imgs/c{i}.png", "cat") for i in range(3)]
        + [(f"imgs/d{i}.png", "dog") for i in range(3)]
        + [(str(absolute), "dog")],
    )
    val = write_csv(tmp_path / "val.csv", [("imgs/c3.png", "cat"), ("imgs/d3.png", "dog")])
    test = write_csv(tmp_path / "test.csv", [("imgs/d3.png", "dog")])
    dm = ImageDataModule(train_csv=train, val_csv=val, test_csv=test, **dm_kwargs())
    assert dm.class_names == ["cat", "dog"]
    dm.setup("fit")
    dm.setup("test")
    assert len(dm.train_dataset) == 7 and dm.train_dataset.labels.count(1) == 4
    assert [p.name for p in dm.val_dataset.files] == ["c3.png", "d3.png"]
    assert dm.val_dataset.labels == [0, 1] and dm.test_dataset.labels == [1]
    x, y = dm.val_dataset[0]
    assert first_pixel(x) == colour(0, 3)


def test_csv_without_val_is_split_and_numeric_labels_sort_numerically(tmp_path, make_image):
    rows = []
    for label in ("2", "10"):
        for i in range(5):
            make_image(tmp_path / label / f"{i}.png")
            rows.append((f"{label}/{i}.png", label))
    train = write_csv(tmp_path / "train.csv", rows)
    dm = ImageDataModule(train_csv=train, val_split=0.2, **dm_kwargs())
    assert dm.class_names == ["2", "10"]
    dm.setup("fit")
    assert len(dm.val_dataset) == 2 and sorted(dm.val_dataset.labels) == [0, 1]


def test_csv_missing_file_names_csv_and_row(tmp_path, make_image):
    for name in "abcdef":
        make_image(tmp_path / f"{name}.png")
    train = write_csv(
        tmp_path / "train.csv",
        [("a.png", "x"), ("missing.png", "x"), ("b.png", "x"), ("c.png", "x")]
        + [("d.png", "y"), ("e.png", "y"), ("f.png", "y")],
    )
    dm = ImageDataModule(train_csv=train, val_split=0.01, **dm_kwargs())
    with pytest.raises(DataError, match=r"train\.csv row 2 \(line 3\).*missing\.png"):
        dm.setup("fit")
    dm = ImageDataModule(
        train_csv=train, val_split=0.01, skip_bad_images=True, bad_images_log=tmp_path / "bad"
    )
    dm.setup("fit")
    assert dm.bad_images == [tmp_path / "missing.png"]


def test_csv_unknown_label_names_csv_and_row(tmp_path, make_image):
    for n in "abcd":
        make_image(tmp_path / f"{n}.png")
    train = write_csv(tmp_path / "train.csv", [("a.png", "x"), ("b.png", "y")])
    val = write_csv(tmp_path / "val.csv", [("c.png", "x"), ("d.png", "zebra")])
    with pytest.raises(DataError, match=r"val\.csv row 2 \(line 3\).*'zebra'"):
        _ = ImageDataModule(train_csv=train, val_csv=val).class_names


def test_csv_format_errors(tmp_path, make_image):
    make_image(tmp_path / "a.png")
    no_header = tmp_path / "nohead.csv"
    no_header.write_text("a.png,x\na.png,y\n")
    with pytest.raises(DataError, match=r"nohead\.csv.*path,label"):
        _ = ImageDataModule(train_csv=no_header).class_names
    with pytest.raises(DataError, match=r"absent\.csv"):
        _ = ImageDataModule(train_csv=tmp_path / "absent.csv").class_names
    empty_label = write_csv(tmp_path / "e.csv", [("a.png", "x"), ("a.png", " ")])
    with pytest.raises(DataError, match=r"e\.csv row 2 .*empty label"):
        _ = ImageDataModule(train_csv=empty_label).class_names
    with pytest.raises(DataError, match="choose one"):
        ImageDataModule(root=tmp_path, train_csv=empty_label)
    with pytest.raises(DataError, match="train_csv"):
        ImageDataModule(val_csv=empty_label)


def test_folders_that_cannot_be_read_say_so(tmp_path, monkeypatch):
    tree(tmp_path, {"a": 2, "b": 2, "c": 2})
    fail_listing(monkeypatch, tmp_path / "c")  # a chmod 000 class folder (root ignores chmod)
    with pytest.raises(DataError, match=r"Cannot read the folder .*/c \(Permission denied") as e:
        _ = ImageDataModule(root=tmp_path, **dm_kwargs()).class_names
    assert "has no images" not in str(e.value)
    monkeypatch.undo()
    fail_listing(monkeypatch, tmp_path)
    with pytest.raises(DataError, match=r"Cannot list the data folder .*chmod u\+rx"):
        _ = ImageDataModule(root=tmp_path, **dm_kwargs()).class_names


def test_a_file_link_loop_is_a_bad_image_in_folders_and_csv_files(tmp_path, make_image):
    tree(tmp_path, {"a": 3, "b": 3})
    (tmp_path / "a" / "self2.png").symlink_to("self1")
    (tmp_path / "a" / "self1").symlink_to("self2.png")
    with pytest.raises(DataError, match=r"a/self2\.png cannot be opened.*leads back to itself"):
        ImageDataModule(root=tmp_path, val_split=0.01, **dm_kwargs()).setup("fit")
    bad = tmp_path / "bad.txt"
    dm = ImageDataModule(
        root=tmp_path, val_split=0.01, skip_bad_images=True, bad_images_log=bad, **dm_kwargs()
    )
    dm.setup("fit")
    assert dm.bad_images == [tmp_path / "a" / "self2.png"]
    assert len(dm.train_dataset) + len(dm.val_dataset) == 6
    rows = [("a/img000.png", "x"), ("a/self2.png", "x"), ("b/img000.png", "y")]
    train = write_csv(tmp_path / "train.csv", rows + [("b/img001.png", "y")])
    with pytest.raises(DataError, match=r"train\.csv row 2 .*self2\.png cannot be opened"):
        ImageDataModule(train_csv=train, val_split=0.01, **dm_kwargs()).setup("fit")


@pytest.mark.slow
def test_the_command_line_stops_at_a_folder_link_loop(tmp_path):
    """A link back to the data folder made fit count b's images as a's (and two of them hung)."""
    data = tree(tmp_path / "data", {"a": 3, "b": 3})
    (data / "a" / "loop").symlink_to("..")
    proc = subprocess.run(
        [sys.executable, "-m", "tlfinetune", "fit", f"--data.root={data}",
         "--data.image_size=32", "--model.backbone=test_vgg16", "--model.weights=none",
         "--data.skip_bad_images=true",  # a loop is no bad image: skipping does not hide it
         f"--trainer.default_root_dir={tmp_path / 'runs'}", "--trainer.max_epochs=1"],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert f"symbolic link {data}/a/loop points to '..'" in proc.stderr
    assert f"rm {data}/a/loop" in proc.stderr
    assert not (tmp_path / "runs" / "version_0" / "checkpoints").exists()
