"""The datamodule: prediction and test splits, loaders, checkpoints, arguments."""

import io
import math
from types import SimpleNamespace

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from datafiles import colour, dm_kwargs, first_pixel, random_nhwc, tree
from jsonargparse import ArgumentParser
from PIL import Image

import tlfinetune.machine as machine
from tlfinetune.data import ImageDataModule
from tlfinetune.errors import DataError
from tlfinetune.machine import default_num_workers
from tlfinetune.sampling import EpochShuffleSampler


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


def test_testing_a_plain_class_folder_uses_all_its_images(tmp_path, data_log):
    """`test --data.root FOLDER` with FOLDER/<class>/*: every image is a test image."""
    tree(tmp_path, {"a": 3, "b": 4})
    dm = ImageDataModule(root=tmp_path, **dm_kwargs())
    dm.setup("test")
    assert len(dm.test_dataset) == 7
    # ... and when the model was trained on that folder, it has seen them: the user is told
    (warning,) = [r.getMessage() for r in data_log.records if r.levelname == "WARNING"]
    assert f"No test/ folder in {tmp_path}: testing on all 7 of its images" in warning
    assert "has seen most of them" in warning and "test/ folders" in warning
    labels = sorted(int(y) for _, y in dm.test_dataloader().dataset)
    assert labels == [0, 0, 0, 1, 1, 1, 1]


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


def test_default_workers_leave_the_cores_to_cpu_training(monkeypatch):
    monkeypatch.setattr(machine.os, "sched_getaffinity", lambda _pid: set(range(2)))
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
    assert (defaults.image_size, defaults.batch_size, defaults.val_split) == (None, 32, 0.2)
    assert (defaults.seed, defaults.augment, defaults.num_workers) == (0, True, None)
    assert defaults.max_image_pixels == Image.MAX_IMAGE_PIXELS
