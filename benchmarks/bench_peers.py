"""The peers ``python benchmarks/bench.py`` compares tlfinetune against, in the same process.

A plain hand-written PyTorch loop (:func:`torch_peer`) and the seed's Keras code on TensorFlow
(:func:`keras_peer`), each doing the same job as tlfinetune's ``trainer.fit`` on the same
setting. Kept apart from the orchestration so that what a peer does, which every "vs plain
PyTorch" figure rests on, can be read in one place.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F
from bench_measure import PeakMemory, Result, _autocast, _sync
from bench_setting import _Setting
from torch import nn

from tlfinetune import backbone as bb
from tlfinetune.transforms import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["keras_peer", "torch_peer"]


def torch_peer(
    s: _Setting, regime: str, loader: Any, num_classes: int, features: nn.Module
) -> Result:
    """A plain hand-written PyTorch loop doing the same job, as a user would write it.

    What it does, exactly:

    - model: ``torchvision.models.<backbone>().features`` (here a fresh copy with the same
      weights as the tlfinetune model) followed by the seed's head
      ``Flatten -> Linear(C*h*w, 256) -> ReLU -> Linear(256, classes)``; default (NCHW) memory
      layout, ``model.train()``;
    - freezing: ``requires_grad = False`` on ``features[:k]`` (``k`` as the FreezeSchedule's);
      Adam (lr 1e-3) over the parameters that require grad;
    - data: the very DataLoader tlfinetune trains from (same files, transform, batch size,
      workers); each batch ``x.float() / 255`` then ImageNet mean/std, moved to the device;
    - step: forward under ``torch.autocast`` for mixed precision (a ``GradScaler`` for
      ``16-mixed``), ``F.cross_entropy``, ``zero_grad``, ``backward``, ``step``; running loss
      and accuracy with ``.item()`` every step, as a training loop prints them.

    Frozen layers need no ``torch.no_grad`` here: with no parameter or input requiring grad,
    autograd records nothing for them.
    """
    device = s.device
    torch.manual_seed(s.seed)
    row = Result("plain PyTorch", regime)
    t_build = time.perf_counter()
    with torch.no_grad():
        c, h, w = features(torch.zeros(1, 3, s.image_size, s.image_size)).shape[1:]
    head = nn.Sequential(
        nn.Flatten(), nn.Linear(c * h * w, 256), nn.ReLU(), nn.Linear(256, num_classes)
    )
    model = nn.Sequential(features, head).to(device)
    k = s.trainable_from(regime)
    for p in features[:k].parameters():
        p.requires_grad = False
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    scaler = torch.amp.GradScaler(device.type, enabled=s.precision == "16-mixed")
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    build_s = time.perf_counter() - t_build
    model.train()
    with PeakMemory(device) as mem:
        _sync(device)
        t = t0 = time.perf_counter()
        c = time.process_time()
        for _epoch in range(s.epochs):
            seen, correct, running = 0, 0, 0.0
            for x, y in loader:
                x = (x.to(device).float() / 255 - mean) / std
                y = y.to(device)
                with _autocast(device, s.precision):
                    logits = model(x)
                    loss = F.cross_entropy(logits.float(), y)
                optimizer.zero_grad()
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                running += loss.item() * len(y)
                correct += (logits.argmax(1) == y).sum().item()
                seen += len(y)
            _sync(device)
            now = time.perf_counter()
            row.epochs.append((seen, now - t))
            row.cpu.append(time.process_time() - c)
            t, c = now, time.process_time()
        row.total_s = now - t0 + build_s
    mem.fill(row)
    return row


def keras_peer(s: _Setting, regime: str, num_classes: int) -> Result:
    """The seed's Keras code on TensorFlow, when it is installed (not run where it is not).

    ``keras.applications.VGG16(weights=None, include_top=False)``, frozen as the seed does it
    (``base.trainable = False``, or ``layers[:15]`` for ``partial`` with ``block5``), then
    ``Flatten, Dense(256, relu), Dense(classes, softmax)``, ``adam``, sparse categorical
    cross-entropy, ``model.fit`` on ``image_dataset_from_directory`` of the same files (resized,
    not centre-cropped) with ``preprocess_input``. ``bf16-mixed``/``16-mixed`` set the
    ``mixed_bfloat16``/``mixed_float16`` policy.
    """
    import tensorflow as tf  # type: ignore[import-not-found]

    keras = tf.keras
    row = Result("Keras (TensorFlow)", regime)
    apps = {"vgg16": keras.applications.VGG16, "vgg19": keras.applications.VGG19}
    if s.backbone not in apps:
        row.note = f"Keras has no {s.backbone}"
        return row
    policy = {"bf16-mixed": "mixed_bfloat16", "16-mixed": "mixed_float16"}.get(
        s.precision, "float32"
    )
    keras.mixed_precision.set_global_policy(policy)
    try:
        size = (s.image_size, s.image_size)
        ds = keras.utils.image_dataset_from_directory(
            str(s.root / "train"), image_size=size, batch_size=s.batch_size, seed=s.seed
        )
        preprocess = keras.applications.vgg16.preprocess_input
        ds = ds.map(lambda x, y: (preprocess(x), y)).prefetch(tf.data.AUTOTUNE)
        t_build = time.perf_counter()
        base = apps[s.backbone](weights=None, include_top=False, input_shape=(*size, 3))
        k = s.trainable_from(regime)
        keras_k = {layer.index: layer.keras_index for layer in bb.get_spec(s.backbone).layers}.get(
            k
        )
        if regime == "frozen":
            base.trainable = False
        elif regime == "partial":
            if keras_k is None:
                row.note = f"no Keras layer starts at module {k}"
                return row
            for layer in base.layers[:keras_k]:
                layer.trainable = False
        model = keras.Sequential(
            [
                base,
                keras.layers.Flatten(),
                keras.layers.Dense(256, activation="relu"),
                keras.layers.Dense(num_classes, activation="softmax", dtype="float32"),
            ]
        )
        model.compile(
            optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"]
        )
        build_s = time.perf_counter() - t_build
        files = sum(1 for p in (s.root / "train").rglob("*") if p.is_file())
        times: list[float] = []

        class Timer(keras.callbacks.Callback):
            def on_train_begin(self, logs: Any = None) -> None:
                self.t = time.perf_counter()

            def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
                now = time.perf_counter()
                times.append(now - self.t)
                self.t = now

        with PeakMemory(torch.device("cpu")) as mem:
            t0 = time.perf_counter()
            model.fit(ds, epochs=s.epochs, verbose=0, callbacks=[Timer()])
            row.total_s = time.perf_counter() - t0 + build_s
        mem.fill(row)
        row.epochs = [(files, t) for t in times]
    finally:
        keras.mixed_precision.set_global_policy("float32")
    return row
