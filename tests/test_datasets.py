"""Datasets: decode failures while loading name the file, or are skipped and listed."""

import gc

import pytest
import torch
from datafiles import corrupt_png, dm_kwargs, tree

from tlfinetune.data import ImageDataModule
from tlfinetune.errors import DataError


def test_decode_failure_while_loading_names_the_file(tmp_path):
    tree(tmp_path, {"a": 3, "b": 3})
    corrupt_png(tmp_path / "a" / "broken.png")
    dm = ImageDataModule(root=tmp_path, val_split=0.01, **dm_kwargs())
    dm.setup("fit")  # the header scan cannot see it
    with pytest.raises(DataError, match="broken.png") as exc:
        list(dm.train_dataloader())
    assert "--data.skip_bad_images true" in str(exc.value)  # the way out, in both spellings
    assert "skip_bad_images: true" in str(exc.value)


def test_decode_failure_in_a_worker_process_keeps_type_and_file_name(tmp_path, monkeypatch):
    # PyTorch waits this long for a worker that has raised to exit; keep the test quick.
    monkeypatch.setattr(torch.utils.data._utils, "MP_STATUS_CHECK_INTERVAL", 0.2)
    tree(tmp_path, {"a": 3, "b": 3})
    corrupt_png(tmp_path / "a" / "broken.png")
    dm = ImageDataModule(root=tmp_path, val_split=0.01, **dm_kwargs(num_workers=1))
    dm.setup("fit")
    loader = dm.train_dataloader()
    with pytest.raises(DataError, match="broken.png") as exc:
        list(loader)
    assert "worker process" in str(exc.value)  # PyTorch's wrapping; the file name survives it
    del exc, loader
    gc.collect()


def test_decode_failure_with_skip_substitutes_and_lists(tmp_path, data_log):
    data = tree(tmp_path / "d", {"a": 3, "b": 3})
    broken = corrupt_png(data / "a" / "broken.png")
    log_file = tmp_path / "bad.txt"
    dm = ImageDataModule(
        root=data, val_split=0.01, skip_bad_images=True, bad_images_log=log_file, **dm_kwargs()
    )
    dm.setup("fit")
    position = dm.train_dataset.files.index(broken)
    x, label = dm.train_dataset[position]
    assert x.shape == (3, 8, 8)
    assert label == dm.train_dataset.labels[position + 1]
    batches = list(dm.train_dataloader())
    assert sum(len(b[1]) for b in batches) == len(dm.train_dataset)  # batches keep their size
    assert log_file.read_text().split() == [str(broken)]
    said = [r.getMessage() for r in data_log.records if "broken.png" in r.getMessage()]
    assert said and not any("set skip_bad_images" in m for m in said)  # it is set already
