"""The header scan: bad images named in one error before training, or skipped and listed."""

import logging
import os
import stat
from types import SimpleNamespace

import pytest
from datafiles import dm_kwargs, file_set, tree, truncated_jpeg_bytes
from PIL import Image

from tlfinetune.data import ImageDataModule
from tlfinetune.errors import DataError
from tlfinetune.machine import cache_root


def test_corrupt_and_truncated_images_are_named_before_training(tmp_path):
    tree(tmp_path, {"a": 3, "b": 3})
    (tmp_path / "a" / "garbage.png").write_bytes(b"\x89PNG but not really")
    dm = ImageDataModule(root=tmp_path, **dm_kwargs())
    with pytest.raises(DataError, match="garbage.png"):
        dm.setup("fit")
    (tmp_path / "a" / "garbage.png").unlink()
    (tmp_path / "b" / "cut.jpg").write_bytes(truncated_jpeg_bytes())
    with pytest.raises(DataError, match="cut.jpg.*truncated"):
        ImageDataModule(root=tmp_path, **dm_kwargs()).setup("fit")


def test_several_bad_images_in_one_message(tmp_path):
    tree(tmp_path, {"a": 3, "b": 3})
    for name in ("x1.jpg", "x2.jpg", "x3.jpg"):
        (tmp_path / "a" / name).write_bytes(b"junk")
    with pytest.raises(DataError) as exc:
        ImageDataModule(root=tmp_path, val_split=0.01, **dm_kwargs()).setup("fit")
    message = str(exc.value)
    assert "3 of the" in message and all(n in message for n in ("x1.jpg", "x2.jpg", "x3.jpg"))
    assert "\n" not in message and "train without" not in message  # predict shows it too
    assert "--data.skip_bad_images true" in message and "skip_bad_images: true" in message


def test_unreadable_format_is_reported_not_dropped(tmp_path):
    tree(tmp_path, {"a": 3, "b": 3})
    (tmp_path / "a" / "phone.heic").write_bytes(b"\0\0\0\x18ftypheic" + b"\0" * 64)
    with pytest.raises(DataError, match=r"phone\.heic.*pillow-heif"):
        ImageDataModule(root=tmp_path, val_split=0.01, **dm_kwargs()).setup("fit")


def test_decompression_bomb_names_file_and_setting(tmp_path):
    tree(tmp_path, {"a": 3, "b": 3})
    Image.new("RGB", (100, 100)).save(tmp_path / "b" / "huge.png")
    dm = ImageDataModule(root=tmp_path, max_image_pixels=5000, val_split=0.01, **dm_kwargs())
    with pytest.raises(DataError, match=r"huge\.png.*max_image_pixels"):
        dm.setup("fit")
    dm = ImageDataModule(root=tmp_path, max_image_pixels=None, val_split=0.01, **dm_kwargs())
    dm.setup("fit")
    assert any(p.name == "huge.png" for p in dm.train_dataset.files)


def test_skip_bad_images_skips_lists_and_warns(tmp_path, data_log):
    data = tree(tmp_path / "data", {"a": 4, "b": 4})
    bad = [data / "a" / "bad.jpg", data / "b" / "phone.heic", data / "b" / "cut.jpg"]
    bad[0].write_bytes(b"junk")
    bad[1].write_bytes(b"\0" * 40)
    bad[2].write_bytes(truncated_jpeg_bytes())
    log_file = tmp_path / "run" / "bad_images.txt"
    log_file.parent.mkdir()
    log_file.write_text("stale line from an earlier run\n")
    dm = ImageDataModule(
        root=data, skip_bad_images=True, bad_images_log=log_file, val_split=0.25, **dm_kwargs()
    )
    dm.setup("fit")
    kept = file_set(dm.train_dataset) | file_set(dm.val_dataset)
    assert len(kept) == 8 and not kept & set(bad)
    assert sorted(dm.bad_images) == sorted(bad)
    assert sorted(log_file.read_text().splitlines()) == sorted(str(p) for p in bad)
    warnings = [r.getMessage() for r in data_log.records if r.levelno == logging.WARNING]
    assert any("Skipped" in w and str(log_file) in w for w in warnings)
    total_skipped = sum(int(w.split()[1]) for w in warnings if w.startswith("Skipped"))
    assert total_skipped == 3


def test_skipping_counts_the_split_that_lost_them_and_recounts_the_classes(tmp_path, data_log):
    """The audit saw "Skipped 2 of the 8 images of folder d" for a folder of 10, and a
    per-class table that still counted the skipped files."""
    data = tree(tmp_path / "d", {"a": 5, "b": 5})
    (data / "a" / "img004.png").write_bytes(b"junk")
    with pytest.raises(DataError, match="img004.png") as exc:  # the one bad image, unskipped
        ImageDataModule(root=data, val_split=0.2, **dm_kwargs()).setup("fit")
    assert "--data.skip_bad_images true" in str(exc.value)
    assert "skip_bad_images: true under data:" in str(exc.value)
    data_log.clear()
    dm = ImageDataModule(
        root=data, val_split=0.2, skip_bad_images=True, bad_images_log=tmp_path / "bad.txt",
        **dm_kwargs(),
    )  # fmt: skip
    dm.setup("fit")
    (warning,) = [r.getMessage() for r in data_log.records if r.levelno == logging.WARNING]
    in_train = len(dm.train_dataset) == 7  # of 8 (else val lost it); the seed decides which
    part = "training" if in_train else "validation"
    assert f"of the {8 if in_train else 2} images of folder {data} ({part} part" in warning
    assert "set skip_bad_images" not in warning  # it is on
    tables = [r.getMessage() for r in data_log.records if "Images per class" in r.getMessage()]
    assert "after leaving out 1 unusable image:" in tables[-1]
    row_a = next(line.split() for line in tables[-1].splitlines() if line.split()[0] == "a")
    assert [int(n) for n in row_a[1:]] == ([3, 1] if in_train else [4, 0])


def test_skip_bad_images_default_list_location_without_trainer(tmp_path, monkeypatch):
    data = tree(tmp_path / "data", {"a": 3, "b": 3})
    (data / "a" / "bad.png").write_bytes(b"junk")
    monkeypatch.chdir(tmp_path)
    dm = ImageDataModule(root=data, skip_bad_images=True, val_split=0.01, **dm_kwargs())
    dm.setup("fit")
    assert (tmp_path / "bad_images.txt").read_text().split() == [str(data / "a" / "bad.png")]


def test_skip_bad_images_list_goes_to_the_trainer_log_dir(tmp_path):
    data = tree(tmp_path / "data", {"a": 3, "b": 3})
    (data / "a" / "bad.png").write_bytes(b"junk")
    dm = ImageDataModule(root=data, skip_bad_images=True, val_split=0.01, **dm_kwargs())
    dm.trainer = SimpleNamespace(
        log_dir=str(tmp_path / "runs" / "version_3"), default_root_dir="x", is_global_zero=True
    )
    dm.setup("fit")
    assert (tmp_path / "runs" / "version_3" / "bad_images.txt").is_file()


def test_all_images_of_a_class_bad_with_skip(tmp_path):
    data = tree(tmp_path, {"a": 3})
    (data / "b").mkdir()
    (data / "b" / "bad.png").write_bytes(b"junk")
    (data / "b" / "bad2.png").write_bytes(b"junk")
    dm = ImageDataModule(root=data, skip_bad_images=True, bad_images_log=tmp_path / "l.txt")
    with pytest.raises(DataError, match="no class b"):
        dm.setup("fit")


# --- the scan record: a second run of the same folder skips unchanged files ----------------------


@pytest.fixture
def probes(monkeypatch):
    """Record kept from the first file on; the list of files the scan actually probed."""
    from tlfinetune import scan

    monkeypatch.setattr(scan, "_RECORD_FROM", 1)
    probed = []
    real = scan.probe_image

    def probe(path, limit):
        probed.append(path.name)
        return real(path, limit)

    monkeypatch.setattr(scan, "probe_image", probe)
    return probed


def fit_setup(root, **kwargs):
    dm = ImageDataModule(root=root, val_split=0.25, **dm_kwargs(**kwargs))
    dm.setup("fit")
    return dm


def test_a_second_scan_checks_only_new_and_changed_files(tmp_path, probes, data_log):
    data = tree(tmp_path / "data", {"a": 4, "b": 4})
    fit_setup(data)
    assert len(probes) == 8 and (data / ".tlfinetune-scan.tsv").is_file()
    probes.clear()
    fit_setup(data)
    assert probes == []
    assert "8 of 8 files unchanged" in data_log.text
    Image.new("RGB", (20, 20), (9, 9, 9)).save(data / "a" / "img001.png")  # changed
    Image.new("RGB", (20, 20), (9, 9, 9)).save(data / "b" / "new.png")  # new
    probes.clear()
    dm = fit_setup(data)
    assert sorted(probes) == ["img001.png", "new.png"]
    assert len(dm.train_dataset) + len(dm.val_dataset) == 9
    probes.clear()
    fit_setup(data)
    assert probes == []  # the rescanned files were recorded in turn


def test_a_recorded_file_that_went_bad_is_caught(tmp_path, probes):
    data = tree(tmp_path / "data", {"a": 4, "b": 4})
    fit_setup(data)
    (data / "b" / "img002.png").write_bytes(b"\x89PNG but not really")
    with pytest.raises(DataError, match="img002.png"):
        fit_setup(data)
    with pytest.raises(DataError, match="img002.png"):  # bad files are never recorded good
        fit_setup(data)


def test_a_record_made_under_another_pixel_limit_is_not_used(tmp_path, probes):
    data = tree(tmp_path / "data", {"a": 4, "b": 4})
    fit_setup(data, max_image_pixels=None)
    probes.clear()
    with pytest.raises(DataError, match="max_image_pixels"):
        fit_setup(data, max_image_pixels=100)  # every image is 120 pixels
    assert len(probes) == 8


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_the_record_gets_the_mode_of_any_new_file(tmp_path, probes, umask):
    data = tree(tmp_path / "data", {"a": 2, "b": 2})
    old = os.umask(umask)
    try:
        fit_setup(data)
    finally:
        os.umask(old)
    assert stat.S_IMODE((data / ".tlfinetune-scan.tsv").stat().st_mode) == 0o666 & ~umask
    assert [p.name for p in data.iterdir() if p.name.startswith(".")] == [".tlfinetune-scan.tsv"]


def test_read_only_data_keeps_its_record_in_the_cache_folder(tmp_path, probes, monkeypatch):
    from tlfinetune import scan

    data = tree(tmp_path / "data", {"a": 4, "b": 4})
    monkeypatch.setattr(scan.os, "access", lambda path, mode: False)  # root ignores chmod
    fit_setup(data)
    assert not (data / ".tlfinetune-scan.tsv").exists()
    assert len(list((cache_root() / "scans").glob("*.tsv"))) == 1
    probes.clear()
    fit_setup(data)
    assert probes == []
