"""The seed's Keras code (snippet 1) as a script, timed: the Keras side of ``bench.py --job seed``.

``python benchmarks/seed_keras.py --data FOLDER --out stamps.json [--policy float32]``

Line for line what the seed does (``configs/vgg16_transfer.yaml`` quotes it)::

    base_model = VGG16(weights='imagenet', include_top=False, input_shape=(224, 224, 3))
    for layer in base_model.layers: layer.trainable = False
    Flatten -> Dense(256, activation='relu') -> Dense(num_classes, activation='softmax')
    model.compile(optimizer='adam', loss='categorical_crossentropy', metrics=['accuracy'])
    model.fit(train_images, train_labels, epochs=10, validation_data=(val_images, val_labels))

``weights=None`` (no download; speed does not depend on the weights). The seed trains on
in-memory arrays: here they are read from ``FOLDER/train/<class>/*`` and ``FOLDER/val/<class>/*``
with ``keras.utils.load_img(target_size=...)`` (resized, as the seed's arrays are),
``img_to_array``, ``vgg16.preprocess_input`` and one-hot labels, before ``fit``; that loading is
timed on its own. ``model.fit`` uses Keras's default batch size, 32. The policy is Keras's
default, ``float32``, unless ``--policy mixed_bfloat16`` is given (the seed sets none).

This file imports only TensorFlow, NumPy and the standard library (not torch), so that the
process's start-up is the seed's own. It writes ``time.time()`` stamps as JSON, in the format
``bench_job.split_job`` reads: ``imported``, ``loaded`` (arrays ready), ``built`` (model
compiled), ``fit_start``, per epoch ``train_start``, ``val_start``, ``val_end``, ``train_end``,
and ``fit_end``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

T0 = time.time()

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

keras = tf.keras
IMPORTED = time.time()


def load(folder: Path, classes: list[str], size: int) -> tuple[np.ndarray, np.ndarray]:
    """Arrays ``(N, size, size, 3)`` preprocessed for VGG16, and one-hot labels."""
    images, labels = [], []
    for c, name in enumerate(classes):
        for path in sorted((folder / name).iterdir()):
            img = keras.utils.load_img(path, target_size=(size, size))
            images.append(keras.utils.img_to_array(img))
            labels.append(c)
    x = keras.applications.vgg16.preprocess_input(np.stack(images))
    y = keras.utils.to_categorical(np.array(labels), len(classes))
    return x, y


def main() -> None:
    """Run the seed's job and write the stamps."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="folder with train/<class> and val/<class>")
    parser.add_argument("--out", required=True, help="JSON file for the time stamps")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument(
        "--policy", default="float32", help="float32 (Keras's default) or mixed_bfloat16"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    stamps: dict = {"created": T0, "imported": IMPORTED, "epochs": [], "policy": args.policy}
    keras.utils.set_random_seed(args.seed)
    keras.mixed_precision.set_global_policy(args.policy)
    root = Path(args.data)
    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    train_images, train_labels = load(root / "train", classes, args.image_size)
    val_images, val_labels = load(root / "val", classes, args.image_size)
    stamps["loaded"] = time.time()

    size = args.image_size
    base_model = keras.applications.VGG16(
        weights=None, include_top=False, input_shape=(size, size, 3)
    )
    for layer in base_model.layers:
        layer.trainable = False
    model = keras.Sequential(
        [
            base_model,
            keras.layers.Flatten(),
            keras.layers.Dense(256, activation="relu"),
            # float32 output under a mixed policy, as Keras's mixed-precision guide says.
            keras.layers.Dense(len(classes), activation="softmax", dtype="float32"),
        ]
    )
    model.compile(optimizer="adam", loss="categorical_crossentropy", metrics=["accuracy"])
    stamps["built"] = time.time()

    class Stamps(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):  # noqa: ANN001, ANN202, D102
            stamps["fit_start"] = time.time()

        def on_epoch_begin(self, epoch, logs=None):  # noqa: ANN001, ANN202, D102
            stamps["epochs"].append({"train_start": time.time()})

        def on_test_begin(self, logs=None):  # noqa: ANN001, ANN202, D102
            stamps["epochs"][-1]["val_start"] = time.time()

        def on_test_end(self, logs=None):  # noqa: ANN001, ANN202, D102
            stamps["epochs"][-1]["val_end"] = time.time()

        def on_epoch_end(self, epoch, logs=None):  # noqa: ANN001, ANN202, D102
            stamps["epochs"][-1]["train_end"] = time.time()
            stamps["epochs"][-1]["val_acc"] = float((logs or {}).get("val_accuracy", "nan"))

        def on_train_end(self, logs=None):  # noqa: ANN001, ANN202, D102
            stamps["fit_end"] = time.time()

    model.fit(
        train_images,
        train_labels,
        epochs=args.epochs,
        validation_data=(val_images, val_labels),
        callbacks=[Stamps()],
    )
    Path(args.out).write_text(json.dumps(stamps), encoding="utf-8")


if __name__ == "__main__":
    main()
