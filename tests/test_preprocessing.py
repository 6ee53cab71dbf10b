"""The weights' preprocessing preset: owned by the model (its backbone's weights enum), read by
the data, carried by the checkpoint to ``predict``."""

import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torchvision
from lightning.pytorch.loggers import CSVLogger
from PIL import Image
from tiny import trainer

from tlfinetune import ImageDataModule, TransferClassifier
from tlfinetune import backbone as bb
from tlfinetune.transforms import VGG16_PREPROCESSING, ResizeCenterCrop, weights_preprocessing

B3 = weights_preprocessing(torchvision.models.EfficientNet_B3_Weights)  # 320 -> 300, bicubic
SMALL_B3 = B3.at(32)  # its ratio and interpolation at 32 px: resize 34, crop 32


def images(root, classes=("ants", "bees", "wasps"), per_class=4, size=(40, 30)):
    rng = np.random.default_rng(0)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 90, (size[1], size[0], 3), dtype=np.uint8)
            pixels[..., c] += 120
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


def served(data, model):
    """The datamodule as a Trainer serving ``model`` sets it up (the model is attached first)."""
    data.trainer = SimpleNamespace(lightning_module=model)
    data.setup("validate")
    return data.val_dataset.transform


def test_the_backbone_table_owns_the_preset(monkeypatch):
    plain = TransferClassifier(backbone="test_vgg16", weights="none")
    assert plain.preprocessing == VGG16_PREPROCESSING  # no weights enum: VGG16's preset
    assert plain.hparams.preprocessing == VGG16_PREPROCESSING.as_dict()
    # A table entry whose weights are EfficientNet-B3's gets B3's preset, mean/std included.
    spec = dataclasses.replace(
        bb.BACKBONES["test_vgg16"], weights_enum=torchvision.models.EfficientNet_B3_Weights
    )
    monkeypatch.setitem(bb.BACKBONES, "test_vgg16", spec)
    model = TransferClassifier(backbone="test_vgg16", weights="none")
    assert model.preprocessing == B3 and model.hparams.preprocessing["interpolation"] == "bicubic"
    assert model.mean.flatten().tolist() == pytest.approx(B3.mean)
    assert model.std.flatten().tolist() == pytest.approx(B3.std)
    # Given, it wins; the model's own image size scales it.
    sized = TransferClassifier(
        backbone="test_vgg16", weights="none", num_classes=2, image_size=32, preprocessing=B3
    )
    assert sized.preprocessing == SMALL_B3 and sized.hparams.preprocessing == B3.as_dict()


def test_the_data_takes_size_and_transform_from_the_model(tmp_path):
    root = images(tmp_path)
    kwargs = {"root": root, "batch_size": 4, "num_workers": 0, "val_split": 0.5}
    model = TransferClassifier(backbone="test_vgg16", weights="none", preprocessing=SMALL_B3)
    data = ImageDataModule(**kwargs)
    assert data.image_size is None  # no default of its own
    val = served(data, model)
    assert data.image_size == 32 and data.hparams.image_size == 32  # the preset's crop size
    assert (val.resize_size, val.crop_size, val.interpolation.value) == (34, 32, "bicubic")
    # A model of a known size (a checkpoint's) gives its size; the user's size wins over both.
    sized = TransferClassifier(
        backbone="test_vgg16", weights="none", num_classes=3, image_size=64, preprocessing=B3
    )
    assert served(ImageDataModule(**kwargs), sized).crop_size == 64
    val = served(ImageDataModule(**kwargs, image_size=48), sized)
    assert (val.resize_size, val.crop_size) == (51, 48)  # round(48 * 320 / 300)
    # Without a model: VGG16's preset, tlfinetune's default backbone's.
    alone = ImageDataModule(**kwargs)
    alone.setup("validate")
    assert alone.image_size == 224 and alone.preprocessing == VGG16_PREPROCESSING
    # Reused for another backbone's model: rebuilt with its preset, not left with the old one.
    vgg = TransferClassifier(backbone="test_vgg16", weights="none")
    assert served(data, vgg).extra_repr() == (
        "resize_size=256, crop_size=224, interpolation=bilinear, antialias=True"
    )


def test_predict_on_a_checkpoint_prepares_images_as_training_did(tmp_path):
    root = images(tmp_path / "data")
    model = TransferClassifier(backbone="test_vgg16", weights="none", preprocessing=SMALL_B3)
    data = ImageDataModule(root=root, batch_size=8, num_workers=0, augment=False)
    # A logger: Lightning refuses a datamodule and a model that log different image sizes.
    fit = trainer(logger=CSVLogger(tmp_path), limit_train_batches=1, limit_val_batches=1)
    fit.fit(model, data)
    assert data.image_size == model.hparams.image_size == 32
    assert data.train_dataset.transform.interpolation.value == "bicubic"  # augment: false
    fit.save_checkpoint(tmp_path / "model.ckpt")

    loaded = TransferClassifier.load_from_checkpoint(
        tmp_path / "model.ckpt", map_location="cpu", weights_only=True
    )
    assert loaded.preprocessing == SMALL_B3
    new = images(tmp_path / "new", classes=("x",), per_class=2, size=(50, 37))
    predict = ImageDataModule(predict_dir=new, batch_size=8, num_workers=0)
    (probs,) = trainer().predict(loaded, predict)
    transform = predict.predict_dataset.base.transform
    assert isinstance(transform, ResizeCenterCrop) and transform.extra_repr() == (
        "resize_size=34, crop_size=32, interpolation=bicubic, antialias=True"
    )
    x = transform(Image.open(predict.predict_files[0]))
    loaded.eval()
    with torch.no_grad():
        expected = torch.softmax(loaded(x[None]), dim=1)
    torch.testing.assert_close(probs[:1], expected)
