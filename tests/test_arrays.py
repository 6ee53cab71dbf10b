"""Array sources: Keras-style NHWC images and integer or one-hot labels, through the datamodule."""

import numpy as np
import pytest
import torch
from datafiles import all_items, dm_kwargs, random_nhwc

from tlfinetune.data import ImageDataModule
from tlfinetune.errors import DataError
from tlfinetune.transforms import eval_transform


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
