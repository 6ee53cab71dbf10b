import gc
import io
import logging
import math
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from jsonargparse import ArgumentParser
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

import tlfinetune.data as data_module
from tlfinetune.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    EpochShuffleSampler,
    ImageDataModule,
    default_num_workers,
    eval_transform,
    stratified_split,
    train_transform,
)
from tlfinetune.errors import DataError, TLFinetuneError

# ---------------------------------------------------------------- helpers


def colour(class_idx: int, i: int) -> tuple[int, int, int]:
    """A colour that identifies (class, index) in a solid test image."""
    return (10 + 40 * class_idx, 3 * i, 255 - 3 * i)


def tree(root: Path, spec: dict[str, int], size: tuple[int, int] = (12, 10)) -> Path:
    """Creates ``n`` solid PNGs in each folder ``rel`` of ``spec``; colours encode class/index."""
    for class_idx, (rel, n) in enumerate(spec.items()):
        folder = root / rel
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            pixels = np.empty((size[1], size[0], 3), np.uint8)
            pixels[...] = colour(class_idx, i)
            Image.fromarray(pixels).save(folder / f"img{i:03d}.png")
    return root


def dm_kwargs(**extra):
    return {"image_size": 8, "batch_size": 4, "num_workers": 0, "augment": False, **extra}


def file_set(dataset) -> set[Path]:
    return set(dataset.files)


def first_pixel(x: torch.Tensor) -> tuple[int, int, int]:
    return tuple(int(v) for v in x[:, x.shape[1] // 2, x.shape[2] // 2])


def truncated_jpeg_bytes(size=(32, 24)) -> bytes:
    """A JPEG cut after its header, in the middle of the pixel data."""
    buf = io.BytesIO()
    pixels = np.random.default_rng(1).integers(0, 256, (size[1], size[0], 3), np.uint8)
    Image.fromarray(pixels).save(buf, "JPEG")
    data = buf.getvalue()
    return data[: len(data) * 2 // 3]


def corrupt_png(path: Path) -> Path:
    """A PNG whose header and end marker are fine but whose pixel data is broken."""
    buf = io.BytesIO()
    pixels = np.random.default_rng(0).integers(0, 256, (16, 16, 3), np.uint8)
    Image.fromarray(pixels).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    start = data.index(b"IDAT") + 20
    data[start : start + 40] = bytes(b ^ 0x55 for b in data[start : start + 40])
    path.write_bytes(bytes(data))
    return path


@pytest.fixture
def data_log(caplog):
    """caplog for the tlfinetune loggers (which do not propagate to the root logger)."""
    logger = logging.getLogger("tlfinetune")
    attach = not logger.propagate  # tlfinetune/__init__ may give it its own handler
    if attach:
        logger.addHandler(caplog.handler)
    caplog.set_level(logging.INFO, logger="tlfinetune")
    yield caplog
    if attach:
        logger.removeHandler(caplog.handler)


# ---------------------------------------------------------------- transforms


def test_preset_constants():
    assert IMAGENET_MEAN == (0.485, 0.456, 0.406)
    assert IMAGENET_STD == (0.229, 0.224, 0.225)


def test_eval_transform_is_vgg_preset_without_normalisation():
    x = torch.randint(
        0, 256, (3, 60, 90), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    out = eval_transform(32)(x)
    assert type(out) is torch.Tensor and out.dtype == torch.uint8 and out.shape == (3, 32, 32)
    expected = TF.center_crop(TF.resize(x, 37, antialias=True), 32)  # round(32 * 256 / 224)
    assert torch.equal(out, expected)
    assert eval_transform(224).resize_size == 256 and eval_transform(224).crop_size == 224


@pytest.mark.parametrize("shape", [(3, 60, 90), (3, 90, 60), (3, 20, 30), (3, 64, 64), (1, 50, 40)])
def test_eval_transform_gives_the_pixels_of_torchvisions_v2_pipeline(shape):
    # ResizeCenterCrop calls torchvision's kernels directly for speed; it must not change a pixel
    # against the v2 pipeline it replaces, for tensors, tv_tensors and PIL images alike.
    x = torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    reference = v2.Compose(
        [v2.ToImage(), v2.Resize(37, antialias=True), v2.CenterCrop(32), v2.ToPureTensor()]
    )
    out = eval_transform(32)(x)
    assert type(out) is torch.Tensor and torch.equal(out, reference(x))
    assert torch.equal(eval_transform(32)(tv_tensors.Image(x)), out)
    if shape[0] == 3:
        pil = TF.to_pil_image(x)
        assert torch.equal(eval_transform(32)(pil), reference(pil))


def test_train_transform_without_augment_equals_eval():
    x = torch.randint(
        0, 256, (3, 40, 50), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)
    )
    plain = train_transform(24, augment=False)
    assert torch.equal(plain(x), eval_transform(24)(x))
    assert torch.equal(plain(x), plain(x))
    torch.manual_seed(0)
    augmented = train_transform(24, augment=True)
    outs = [augmented(x) for _ in range(4)]
    assert all(o.shape == (3, 24, 24) and o.dtype == torch.uint8 for o in outs)
    assert any(not torch.equal(outs[0], o) for o in outs[1:])
    kinds = [type(t) for t in train_transform(24, True, trivial_augment=True).transforms]
    assert v2.RandomResizedCrop in kinds and v2.RandomHorizontalFlip in kinds
    assert v2.TrivialAugmentWide in kinds
    assert v2.TrivialAugmentWide not in [type(t) for t in augmented.transforms]


def test_datamodule_train_images_equal_eval_images_without_augment(tmp_path):
    tree(tmp_path, {"a": 3, "b": 3})
    dm = ImageDataModule(root=tmp_path, **dm_kwargs(image_size=16))
    dm.setup("fit")
    x, label = dm.train_dataset[0]
    path = dm.train_dataset.files[0]
    reference = eval_transform(16)(TF.pil_to_tensor(Image.open(path).convert("RGB")))
    assert torch.equal(x, reference) and isinstance(label, int)


# ---------------------------------------------------------------- folder sources


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


def test_stratified_split_function():
    labels = [0] * 10 + [1] * 3 + [2] * 1
    train, val = stratified_split(labels, 0.3, seed=5)
    assert sorted(train + val) == list(range(14)) and not set(train) & set(val)
    val_labels = [labels[i] for i in val]
    assert val_labels.count(0) == 3 and val_labels.count(1) == 1 and val_labels.count(2) == 0
    assert stratified_split(labels, 0.3, seed=5) == (train, val)
    # A class's split depends on its own members only, not on the other classes.
    _, val_b = stratified_split([0] * 10 + [1] * 7, 0.3, seed=5)
    assert [i for i in val_b if i < 10] == [i for i in val if i < 10]
    with pytest.raises(DataError, match="val_split"):
        stratified_split(labels, 1.0)


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


# ---------------------------------------------------------------- folder errors


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
    assert "skip_bad_images" in message and "\n" not in message


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


def test_decode_failure_while_loading_names_the_file(tmp_path):
    tree(tmp_path, {"a": 3, "b": 3})
    corrupt_png(tmp_path / "a" / "broken.png")
    dm = ImageDataModule(root=tmp_path, val_split=0.01, **dm_kwargs())
    dm.setup("fit")  # the header scan cannot see it
    with pytest.raises(DataError, match="broken.png"):
        list(dm.train_dataloader())


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
    assert any("broken.png" in r.getMessage() for r in data_log.records)


# ---------------------------------------------------------------- CSV sources


def write_csv(path: Path, rows: list[tuple[str, str]], header: str = "path,label") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join([header, *(f"{p},{label}" for p, label in rows)]) + "\n")
    return path


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


# ---------------------------------------------------------------- array sources


def random_nhwc(n=12, h=10, w=9, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def all_items(dataset) -> tuple[torch.Tensor, list[int]]:
    xs, ys = zip(*(dataset[i] for i in range(len(dataset))), strict=True)
    return torch.stack(xs), list(ys)


def test_arrays_uint8_with_validation_data():
    x, y = random_nhwc(), np.arange(12) % 3
    xv, yv = random_nhwc(4, seed=1), np.array([0, 1, 2, 2])
    dm = ImageDataModule.from_arrays(x, y, xv, yv, **dm_kwargs())
    assert dm.class_names == ["0", "1", "2"] and dm.num_classes == 3
    dm.setup("fit")
    assert len(dm.train_dataset) == 12 and len(dm.val_dataset) == 4
    images, labels = next(iter(dm.val_dataloader()))
    assert images.dtype == torch.uint8 and images.shape == (4, 3, 8, 8)
    assert labels.tolist() == [0, 1, 2, 2]
    raw = torch.from_numpy(xv[2]).permute(2, 0, 1)
    assert torch.equal(images[2], eval_transform(8)(raw))


def test_array_dtypes_and_one_hot_give_the_same_data():
    x, y = random_nhwc(), np.arange(12) % 3
    reference = ImageDataModule.from_arrays(x, y, **dm_kwargs())
    reference.setup("fit")
    ref_train = all_items(reference.train_dataset)
    variants = [
        (x.astype(np.float32) / 255, y),
        (x.astype(np.float64), y),
        (torch.from_numpy(x), torch.from_numpy(y)),
        (torch.from_numpy(x).float() / 255, torch.from_numpy(y)),
        (x, np.eye(3)[y]),
        (x, torch.nn.functional.one_hot(torch.from_numpy(y), 3)),
        (x, y[:, None]),
    ]
    for xs, ys in variants:
        dm = ImageDataModule.from_arrays(xs, ys, **dm_kwargs())
        dm.setup("fit")
        got = all_items(dm.train_dataset)
        assert torch.equal(got[0], ref_train[0]) and got[1] == ref_train[1]


def test_one_hot_width_sets_the_number_of_classes_and_names():
    x = random_nhwc(8)
    y = np.eye(4)[[0, 1, 2, 0, 1, 2, 0, 1]]  # class 3 never occurs
    dm = ImageDataModule.from_arrays(x, y, **dm_kwargs())
    assert dm.num_classes == 4
    named = ImageDataModule.from_arrays(
        x, y.argmax(1), class_names=["w", "x", "y", "z"], **dm_kwargs()
    )
    assert named.class_names == ["w", "x", "y", "z"]


def test_grayscale_arrays_and_split_by_val_split():
    x = np.random.default_rng(0).integers(0, 256, (20, 8, 8), dtype=np.uint8)
    y = np.array([0] * 10 + [1] * 10)
    dm = ImageDataModule.from_arrays(x, y, val_split=0.3, **dm_kwargs())
    dm.setup("fit")
    assert len(dm.val_dataset) == 6 and sorted(dm.val_dataset.labels) == [0, 0, 0, 1, 1, 1]
    image, _ = dm.train_dataset[0]
    assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])


def test_array_errors():
    x, y = random_nhwc(), np.arange(12) % 3
    with pytest.raises(DataError, match="NCHW"):
        _ = ImageDataModule.from_arrays(np.moveaxis(x, -1, 1).copy(), y).class_names
    with pytest.raises(DataError, match="train_labels has 11 labels"):
        _ = ImageDataModule.from_arrays(x, y[:11]).class_names
    with pytest.raises(DataError, match=r"label 5.*3 classes"):
        _ = ImageDataModule.from_arrays(
            x, y, class_names=["a", "b", "c"], val_images=x[:2], val_labels=[0, 5]
        ).class_names
    with pytest.raises(DataError, match=r"train_images has values in \[-1"):
        _ = ImageDataModule.from_arrays(x.astype(np.float32) / 128 - 1, y).class_names
    with pytest.raises(DataError, match="val_labels"):
        _ = ImageDataModule.from_arrays(x, y, val_images=x).class_names
    with pytest.raises(DataError, match="root"):
        ImageDataModule.from_arrays(x, y, root="demo")


# ---------------------------------------------------------------- prediction


def test_predict_dir_recursive_sorted_with_indices(tmp_path, make_image):
    tree(tmp_path / "data", {"a": 2, "b": 2})
    shots = tmp_path / "shots"
    names = ["z.png", "a/b/c.png", "a/a.jpg", "m.bmp"]
    for i, rel in enumerate(names):
        make_image(shots / rel, colour(5, i), fmt="PNG")
    make_image(shots / ".ipynb_checkpoints" / "skip.png")
    (shots / "info.txt").write_text("x")
    dm = ImageDataModule(root=tmp_path / "data", predict_dir=shots, **dm_kwargs(batch_size=3))
    expected = ["a/a.jpg", "a/b/c.png", "m.bmp", "z.png"]
    assert [p.relative_to(shots).as_posix() for p in dm.predict_files] == expected
    dm.setup("predict")
    seen = []
    for images, indices in dm.predict_dataloader():
        for image, index in zip(images, indices.tolist(), strict=True):
            rel = dm.predict_files[index].relative_to(shots).as_posix()
            assert first_pixel(image) == colour(5, names.index(rel))
            seen.append(index)
    assert seen == [0, 1, 2, 3]


def test_predict_without_dir_uses_test_then_val(tmp_path):
    tree(tmp_path / "tv", {"train/a": 2, "train/b": 2, "val/a": 1, "val/b": 1})
    dm = ImageDataModule(root=tmp_path / "tv", **dm_kwargs())
    assert all("/val/" in p.as_posix() for p in dm.predict_files) and len(dm.predict_files) == 2
    tree(tmp_path / "tvt", {"train/a": 2, "train/b": 2, "val/a": 1, "test/b": 3})
    dm = ImageDataModule(root=tmp_path / "tvt", **dm_kwargs())
    dm.setup("predict")
    assert [p.parent.name for p in dm.predict_files] == ["b", "b", "b"]
    _, indices = next(iter(dm.predict_dataloader()))
    assert indices.tolist() == [0, 1, 2]


def test_predict_on_arrays_uses_synthetic_names():
    x, y = random_nhwc(), np.arange(12) % 3
    dm = ImageDataModule.from_arrays(x, y, test_images=x[:5], test_labels=y[:5], **dm_kwargs())
    assert [str(p) for p in dm.predict_files] == [f"array/{i:06d}" for i in range(5)]
    dm.setup("predict")
    images, indices = next(iter(dm.predict_dataloader()))
    assert indices.tolist() == [0, 1, 2, 3] and images.dtype == torch.uint8


def test_predict_dir_errors(tmp_path):
    with pytest.raises(DataError, match="nothere"):
        ImageDataModule(predict_dir=tmp_path / "nothere").setup("predict")
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "a.txt").write_text("x")
    with pytest.raises(DataError, match="blank.*no images"):
        ImageDataModule(predict_dir=tmp_path / "blank").setup("predict")
    with pytest.raises(DataError, match="predict_dir"):
        ImageDataModule().setup("predict")


def test_predict_only_datamodule_takes_class_names_from_a_checkpoint(tmp_path, make_image):
    make_image(tmp_path / "p" / "x.png")
    dm = ImageDataModule(predict_dir=tmp_path / "p", **dm_kwargs())
    dm.setup("predict")
    assert getattr(dm, "num_classes", None) is None
    with pytest.raises(DataError, match="predict_dir"):
        _ = dm.class_names
    dm.load_state_dict({"class_names": ["cat", "dog"]})
    assert dm.class_names == ["cat", "dog"] and dm.num_classes == 2
    assert dm.state_dict() == {"class_names": ["cat", "dog"]}


def test_state_dict_round_trip_and_mismatch(tmp_path):
    tree(tmp_path, {"a": 2, "b": 2})
    dm = ImageDataModule(root=tmp_path, **dm_kwargs())
    state = dm.state_dict()
    assert state == {"class_names": ["a", "b"]}
    dm.load_state_dict(state)
    with pytest.raises(DataError, match="checkpoint"):
        dm.load_state_dict({"class_names": ["a", "c"]})


# ---------------------------------------------------------------- test split


def test_test_requested_without_test_split(tmp_path):
    tree(tmp_path, {"train/a": 3, "train/b": 3, "val/a": 1, "val/b": 1})
    dm = ImageDataModule(root=tmp_path, **dm_kwargs())
    assert not dm.has_test
    with pytest.raises(DataError, match=r"test split.*test/ folder"):
        dm.setup("test")
    with pytest.raises(DataError, match="test split"):
        dm.test_dataloader()
    arrays = ImageDataModule.from_arrays(random_nhwc(), np.arange(12) % 3, **dm_kwargs())
    with pytest.raises(DataError, match="test_images"):
        arrays.test_dataloader()


def test_testing_a_plain_class_folder_uses_all_its_images(tmp_path):
    """`test --data.root FOLDER` with FOLDER/<class>/*: every image is a test image."""
    tree(tmp_path, {"a": 3, "b": 4})
    dm = ImageDataModule(root=tmp_path, **dm_kwargs())
    dm.setup("test")
    assert len(dm.test_dataset) == 7
    labels = sorted(int(y) for _, y in dm.test_dataloader().dataset)
    assert labels == [0, 0, 0, 1, 1, 1, 1]


# ---------------------------------------------------------------- order and loaders


def test_sampler_order_depends_only_on_seed_and_epoch():
    fresh = EpochShuffleSampler(50, seed=7)
    fresh.set_epoch(3)
    used = EpochShuffleSampler(50, seed=7)
    for epoch in range(3):
        used.set_epoch(epoch)
        list(used)
    used.set_epoch(3)
    assert list(fresh) == list(used) == fresh.permutation(3)
    assert sorted(fresh) == list(range(50)) and len(fresh) == 50
    assert list(fresh) != fresh.permutation(4)
    assert fresh.permutation(3) != EpochShuffleSampler(50, seed=8).permutation(3)


def fake_trainer(epoch: int, device: str = "cpu") -> SimpleNamespace:
    progress = SimpleNamespace(current=SimpleNamespace(processed=epoch))
    return SimpleNamespace(
        fit_loop=SimpleNamespace(epoch_progress=progress),
        current_epoch=epoch,
        num_devices=1,
        strategy=SimpleNamespace(root_device=torch.device(device)),
        log_dir=None,
        default_root_dir=".",
        is_global_zero=True,
    )


def test_train_loader_takes_the_epoch_from_the_trainer():
    x = np.zeros((20, 4, 4, 3), np.uint8)
    x[:, 0, 0, 0] = np.arange(20)
    dm = ImageDataModule.from_arrays(x, np.arange(20) % 2, x[:2], [0, 1], **dm_kwargs(seed=3))
    dm.trainer = fake_trainer(epoch=4)
    loader = dm.train_dataloader()
    assert loader.sampler is dm.train_sampler and dm.train_sampler.epoch == 4
    assert not loader.drop_last and len(loader) == math.ceil(20 / 4)
    order = [dm.train_dataset.labels[i] for i in EpochShuffleSampler(20, 3).permutation(4)]
    assert torch.cat([y for _, y in loader]).tolist() == order
    val = dm.val_dataloader()
    assert torch.cat([y for _, y in val]).tolist() == [0, 1]  # not shuffled


class _OrderRecorder(pl.LightningModule):
    """Records which images (identified by a pixel value) each training epoch sees."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.orders: dict[int, list[int]] = {}

    def training_step(self, batch, batch_idx):
        x, _ = batch
        self.orders.setdefault(self.current_epoch, []).extend(x[:, 0, 0, 0].tolist())
        return (self.w * x.float().mean()).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _fit(dm, max_epochs, root, ckpt_path=None, callbacks=()):
    model = _OrderRecorder()
    trainer = pl.Trainer(
        max_epochs=max_epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        callbacks=list(callbacks),
        enable_checkpointing=bool(callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=root,
    )
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return model.orders


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore:.*LeafSpec")
def test_resumed_training_sees_the_same_order_as_an_uninterrupted_run(tmp_path):
    x = np.zeros((24, 8, 8, 3), np.uint8)
    x[..., 0] = np.arange(24)[:, None, None]  # image i is identified by its red value i
    y = np.arange(24) % 2

    def make():
        # One worker: the sampler's order is fixed when Lightning creates the first iterator,
        # which on resume happens before it calls set_epoch.
        return ImageDataModule.from_arrays(x, y, x[:2], y[:2], **dm_kwargs(num_workers=1))

    full = _fit(make(), 3, tmp_path / "full")
    assert len(full) == 3 and all(sorted(v) == list(range(24)) for v in full.values())
    assert full[0] != full[1] != full[2]
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    first = _fit(make(), 2, tmp_path / "part", callbacks=[ckpt])
    assert first == {0: full[0], 1: full[1]}
    resumed = _fit(make(), 3, tmp_path / "part", ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert resumed == {2: full[2]}
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert saved["ImageDataModule"] == {"class_names": ["0", "1"]}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.filterwarnings("ignore::UserWarning", "ignore:.*LeafSpec")
def test_pin_memory_follows_the_trainer_device(tmp_path):
    x = np.zeros((8, 8, 8, 3), np.uint8)
    y = np.arange(8) % 2
    for accelerator, pinned in (("gpu", True), ("cpu", False)):
        dm = ImageDataModule.from_arrays(x, y, x[:2], y[:2], **dm_kwargs(num_workers=1))
        trainer = pl.Trainer(
            accelerator=accelerator,
            devices=1,
            max_epochs=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=tmp_path,
        )
        trainer.fit(_OrderRecorder(), datamodule=dm)
        assert trainer.train_dataloader.pin_memory is pinned
        assert dm.val_dataloader().pin_memory is pinned


def test_hyperparameters_hold_no_path_objects(tmp_path):
    tree(tmp_path, {"a": 2, "b": 2})
    dm = ImageDataModule(root=tmp_path, predict_dir=tmp_path / "a", bad_images_log=tmp_path / "l")
    assert dm.hparams["root"] == str(tmp_path) and dm.hparams["predict_dir"] == str(tmp_path / "a")
    buffer = io.BytesIO()
    torch.save({"datamodule_hyper_parameters": dict(dm.hparams)}, buffer)
    buffer.seek(0)
    assert torch.load(buffer, weights_only=True)["datamodule_hyper_parameters"]["seed"] == 0


def test_default_num_workers(monkeypatch):
    # On a GPU every core but the training process's own: decoding is what a GPU waits for.
    for cpus, expected in ((1, 0), (2, 1), (3, 2), (16, 15), (17, 16), (128, 16)):
        monkeypatch.setattr(data_module.os, "sched_getaffinity", lambda _pid, n=cpus: set(range(n)))
        assert default_num_workers() == expected
    monkeypatch.setattr(data_module.os, "sched_getaffinity", lambda _pid: set(range(8)))
    assert default_num_workers(processes_per_node=4) == 1
    # Training on the CPU: only the cores its compute threads leave free.
    assert default_num_workers(compute_threads=8) == 0
    assert default_num_workers(compute_threads=16) == 0
    assert default_num_workers(compute_threads=6) == 2
    assert default_num_workers(compute_threads=2) == 6
    monkeypatch.setattr(data_module.os, "sched_getaffinity", lambda _pid: set(range(64)))
    assert default_num_workers(processes_per_node=8) == 7  # 8 DDP ranks on 64 cores


def test_default_workers_leave_the_cores_to_cpu_training(monkeypatch):
    monkeypatch.setattr(data_module.os, "sched_getaffinity", lambda _pid: set(range(2)))
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    x, y = random_nhwc(), np.arange(12) % 3
    dm = ImageDataModule.from_arrays(x, y, image_size=8, batch_size=4, num_workers=None)
    assert dm._resolved_num_workers() == 1  # no trainer yet: as for a GPU
    dm.trainer = fake_trainer(0, "cpu")
    assert dm._resolved_num_workers() == 0 and dm.train_dataloader().num_workers == 0
    dm.trainer = fake_trainer(0, "cuda")
    assert dm._resolved_num_workers() == 1
    dm.num_workers = 2  # an explicit setting always wins
    dm.trainer = fake_trainer(0, "cpu")
    assert dm._resolved_num_workers() == 2


def test_loader_settings(tmp_path):
    x, y = random_nhwc(), np.arange(12) % 3
    dm = ImageDataModule.from_arrays(x, y, **dm_kwargs(num_workers=1))
    dm.setup("fit")
    loader = dm.val_dataloader()
    assert loader.num_workers == 1 and loader.persistent_workers
    assert loader.pin_memory == torch.cuda.is_available()  # no trainer: what the machine has
    dm.trainer = fake_trainer(0, "cpu")
    assert not dm.val_dataloader().pin_memory
    dm.trainer = fake_trainer(0, "cuda")
    assert dm._pin_memory()
    zero = ImageDataModule.from_arrays(x, y, **dm_kwargs(num_workers=0))
    zero.setup("fit")
    assert not zero.val_dataloader().persistent_workers
    auto = ImageDataModule.from_arrays(x, y, image_size=8, num_workers=None)
    assert auto._resolved_num_workers() == default_num_workers()


# ---------------------------------------------------------------- arguments


def test_invalid_arguments():
    with pytest.raises(DataError, match="val_split"):
        ImageDataModule(root="demo", val_split=0)
    with pytest.raises(DataError, match="val_split"):
        ImageDataModule(root="demo", val_split=1.5)
    with pytest.raises(DataError, match="batch_size"):
        ImageDataModule(root="demo", batch_size=0)
    with pytest.raises(DataError, match="num_workers"):
        ImageDataModule(root="demo", num_workers=-1)


def test_cli_exposes_typed_documented_arguments():
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(ImageDataModule, "data")
    help_text = parser.format_help()
    for name in (
        "root",
        "val_split",
        "seed",
        "image_size",
        "batch_size",
        "num_workers",
        "augment",
        "predict_dir",
        "skip_bad_images",
        "train_csv",
        "val_csv",
        "test_csv",
        "trivial_augment",
        "max_image_pixels",
        "bad_images_log",
    ):
        assert f"--data.{name} " in help_text, name
    assert "decompression" in help_text and "ImageFolder" in help_text
    cfg = parser.parse_args(
        ["--data.root", "demo", "--data.max_image_pixels", "null", "--data.augment", "false"]
    )
    assert cfg.data.root == "demo" and isinstance(cfg.data.root, str)
    assert cfg.data.max_image_pixels is None and cfg.data.augment is False
    defaults = parser.get_defaults().data
    assert (defaults.image_size, defaults.batch_size, defaults.val_split) == (224, 32, 0.2)
    assert (defaults.seed, defaults.augment, defaults.num_workers) == (0, True, None)
    assert defaults.max_image_pixels == Image.MAX_IMAGE_PIXELS
