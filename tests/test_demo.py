import hashlib
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tlfinetune.data import ImageDataModule
from tlfinetune.demo import (
    DEMO_CLASSES,
    ensure_demo_dataset,
    render_demo_image,
)
from tlfinetune.errors import DataError
from tlfinetune.machine import cache_root

SMALL = {"train_per_class": 3, "val_per_class": 1, "test_per_class": 2}


def digest(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def as_arrays(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*(dataset[i] for i in range(len(dataset))), strict=True)
    return torch.stack(xs), torch.tensor(ys)


def test_cache_root_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("TLFINETUNE_CACHE", str(tmp_path / "c"))
    assert cache_root() == tmp_path / "c"
    monkeypatch.delenv("TLFINETUNE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "tlfinetune"


def test_default_demo_has_documented_layout_and_is_fast(tmp_path):
    start = time.perf_counter()
    folder = ensure_demo_dataset(tmp_path)
    elapsed = time.perf_counter() - start
    assert elapsed < 5, f"demo generation took {elapsed:.1f} s"  # about 1 s; slack for busy CI
    assert folder == tmp_path / "demo-v1"
    for split, count in (("train", 60), ("val", 20), ("test", 20)):
        classes = sorted(p.name for p in (folder / split).iterdir())
        assert classes == list(DEMO_CLASSES)
        for name in classes:
            files = sorted((folder / split / name).glob("*.png"))
            assert len(files) == count
    with Image.open(folder / "train" / "ring" / "0000.png") as img:
        assert (img.size, img.mode) == ((64, 64), "RGB")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp leftovers
    again = time.perf_counter()
    assert ensure_demo_dataset(tmp_path) == folder  # cached: no work
    assert time.perf_counter() - again < 0.5


def test_demo_is_deterministic_byte_for_byte(tmp_path):
    a = ensure_demo_dataset(tmp_path / "a", **SMALL)
    b = ensure_demo_dataset(tmp_path / "b", **SMALL)
    assert digest(a) == digest(b)
    assert len([k for k in digest(a) if k.endswith(".png")]) == 6 * (3 + 1 + 2)
    other_seed = ensure_demo_dataset(tmp_path / "c", seed=1, **SMALL)
    assert digest(other_seed)["train/circle/0000.png"] != digest(a)["train/circle/0000.png"]


def test_images_differ_and_are_not_blank():
    rng = np.random.default_rng(0)
    images = [render_demo_image(name, rng, 64) for name in DEMO_CLASSES for _ in range(3)]
    assert all(img.shape == (64, 64, 3) and img.dtype == np.uint8 for img in images)
    assert all(img.std() > 10 for img in images)
    flat = np.stack([img.reshape(-1) for img in images]).astype(np.int32)
    assert len({row.tobytes() for row in flat}) == len(images)
    with pytest.raises(ValueError, match="hexagon"):
        render_demo_image("hexagon", rng)


def test_concurrent_generation_is_race_free(tmp_path):
    results: list[Path] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            results.append(ensure_demo_dataset(tmp_path, **SMALL))
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(set(results)) == 1
    assert [p.name for p in tmp_path.iterdir()] == [results[0].name]  # temp folders removed
    assert digest(results[0]) == digest(ensure_demo_dataset(tmp_path / "fresh", **SMALL))


def test_incomplete_cache_folder_is_reported(tmp_path):
    (tmp_path / "demo-v1" / "train").mkdir(parents=True)
    with pytest.raises(DataError, match="demo-v1"):
        ensure_demo_dataset(tmp_path)


def test_unwritable_cache_is_a_data_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(DataError, match="TLFINETUNE_CACHE"):
        ensure_demo_dataset(blocker / "cache")


def test_datamodule_demo_same_tensors_twice():
    a = ImageDataModule.demo(image_size=32, augment=False, num_workers=0)
    b = ImageDataModule(root="demo", image_size=32, augment=False, num_workers=0)
    assert a.class_names == b.class_names == list(DEMO_CLASSES) and a.num_classes == 6
    a.setup("fit")
    b.setup("fit")
    assert len(a.train_dataset) == 360 and len(a.val_dataset) == 120
    xa, ya = as_arrays(a.train_dataset)
    xb, yb = as_arrays(b.train_dataset)
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert xa.shape == (360, 3, 32, 32) and xa.dtype == torch.uint8
    assert torch.bincount(ya).tolist() == [60] * 6
    a.setup("test")
    assert len(a.test_dataset) == 120
    assert os.environ["TLFINETUNE_CACHE"] in str(a.predict_files[0])  # the private test cache


def _random_features(x: torch.Tensor) -> torch.Tensor:
    """Colour-invariant random conv features: a fixed, untrained 2-layer net."""
    median = x.flatten(2).median(-1).values[..., None, None]
    d = (x - median).abs().sum(1, keepdim=True)
    d = d / (d.amax((2, 3), keepdim=True) + 1e-6)
    g = torch.Generator().manual_seed(0)
    h1 = torch.relu(
        torch.nn.functional.conv2d(d, torch.randn(64, 1, 5, 5, generator=g), padding=2) - 0.5
    )
    h1 = torch.nn.functional.max_pool2d(h1, 2)
    w2 = torch.randn(128, 64, 3, 3, generator=g) / 24
    h2 = torch.relu(torch.nn.functional.conv2d(h1, w2, padding=1))
    return torch.cat([h1.amax((2, 3)), h1.mean((2, 3)), h2.amax((2, 3)), h2.mean((2, 3))], 1)


def test_demo_is_learnable_but_not_trivial():
    dm = ImageDataModule.demo(image_size=32, augment=False, num_workers=0)
    dm.setup("fit")
    x_train, y_train = as_arrays(dm.train_dataset)
    x_val, y_val = as_arrays(dm.val_dataset)
    x_train, x_val = x_train.float() / 255, x_val.float() / 255

    # Raw pixels say (almost) nothing: colours, positions and sizes are random.
    pooled_train = torch.nn.functional.adaptive_avg_pool2d(x_train, 8).flatten(1)
    pooled_val = torch.nn.functional.adaptive_avg_pool2d(x_val, 8).flatten(1)
    centroids = torch.stack([pooled_train[y_train == c].mean(0) for c in range(6)])
    pixel_acc = (torch.cdist(pooled_val, centroids).argmin(1) == y_val).float().mean().item()
    assert pixel_acc < 0.35  # chance is 1/6

    # Shape features with a ridge classifier learn a lot, without solving it.
    f_train, f_val = _random_features(x_train), _random_features(x_val)
    mu, sd = f_train.mean(0), f_train.std(0) + 1e-6
    f_train, f_val = (f_train - mu) / sd, (f_val - mu) / sd
    targets = torch.nn.functional.one_hot(y_train, 6).float()
    gram = f_train.T @ f_train + 10 * torch.eye(f_train.shape[1])
    weights = torch.linalg.solve(gram, f_train.T @ targets)
    acc = ((f_val @ weights).argmax(1) == y_val).float().mean().item()
    assert 0.45 < acc < 0.98, acc
