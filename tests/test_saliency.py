"""Grad-CAM: the map lies where the evidence is, on frozen models too, and leaves them untouched."""

import io
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_families import FAMILIES
from tiny import tiny_tensors
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchvision.ops.misc import Permute

from tlfinetune import TransferClassifier
from tlfinetune.errors import ConfigError
from tlfinetune.predict import overlay_names
from tlfinetune.report import evaluate, plot_mistakes
from tlfinetune.saliency import cam_layer, grad_cam, overlay

# Tiny models: a second thread only adds overhead (see conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")

RED, BLUE, GREEN = (230, 20, 20), (20, 20, 230), (20, 230, 20)


def quadrant_task(n: int, size: int = 32, seed: int = 0):
    """Noise images; the class is the colour of a square in the top-left quadrant (red or blue).

    Each other quadrant holds a green square, so a map of "where the squares are" would spread
    over all four quadrants: only the evidence for the class lies in the top-left one.
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(60, 140, (n, 3, size, size), generator=g, dtype=torch.uint8)
    y = torch.arange(n) % 2
    half, side = size // 2, size // 4
    for i in range(n):
        for q, (top, left) in enumerate([(0, 0), (0, half), (half, 0), (half, half)]):
            colour = (RED, BLUE)[int(y[i])] if q == 0 else GREEN
            r, c = (
                top + int(torch.randint(0, half - side + 1, (), generator=g)) for top in (top, left)
            )
            x[i, :, r : r + side, c : c + side] = torch.tensor(colour, dtype=torch.uint8)[
                :, None, None
            ]
    return x, y


def small_cnn_classifier(size: int = 32) -> TransferClassifier:
    """A TransferClassifier with a 3-conv backbone whose last map still knows where things are.

    test_vgg16 trained for seconds does not localise at 32-128 px: its block5 convolutions run
    on a 2x2-8x8 map, so every position sees the whole image (measured: maps centred whatever
    the image, 14-37% of their mass in the quadrant that decides the class, at 100% accuracy).
    """
    model = TransferClassifier(
        backbone="test_vgg16", weights="none", num_classes=2, image_size=size, head="gap"
    )
    model.backbone = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
    )  # fmt: skip
    model.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 2))
    return model


def top_left_mass(cam: torch.Tensor) -> torch.Tensor:
    half = cam.shape[-1] // 2
    return cam[:, :half, :half].sum((1, 2)) / cam.sum((1, 2)).clamp_min(1e-12)


def test_the_map_lies_in_the_quadrant_the_class_depends_on():
    torch.manual_seed(0)
    x, y = quadrant_task(64)
    model = small_cnn_classifier()
    optimizer = torch.optim.Adam(model.parameters(), 1e-2)
    for step in range(60):
        batch = torch.arange(step * 16, step * 16 + 16) % len(x)
        loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    test_x, test_y = quadrant_task(32, seed=1)
    # Frozen, in train mode, inside inference mode as in Lightning's loops.
    for p in model.parameters():
        p.requires_grad_(False)
        p.grad = None
    model.train()  # the head trains; the frozen backbone's layers stay in eval mode (as Keras')
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modes = {name: m.training for name, m in model.named_modules()}
    assert model.head.training and not any(m.training for m in model.backbone.children())
    with torch.inference_mode():
        assert (model(test_x).argmax(1) == test_y).float().mean() > 0.9  # it learned the task
        cam = grad_cam(model, test_x)

    assert cam.shape == (32, 32, 32) and cam.min() >= 0 and cam.amax((1, 2)).max() <= 1
    mass = top_left_mass(cam)
    assert mass.mean() > 0.5, mass  # a quarter of the image, over half of the evidence
    # Nothing about the model changed: flags, modes, weights, no gradient left behind.
    assert not any(p.requires_grad or p.grad is not None for p in model.parameters())
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_vgg_maps_come_from_the_last_conv_stage_and_ignore_the_freeze():
    torch.manual_seed(0)
    model = TransferClassifier(backbone="test_vgg16", weights="none", num_classes=3, image_size=64)
    assert cam_layer(model) is model.backbone[29]  # block5's last ReLU, before block5_pool
    x, _ = tiny_tensors(4, 64)
    target = torch.tensor([0, 1, 2, 0])
    trainable = grad_cam(model, x, target)
    for p in model.backbone.parameters():  # the frozen regime: forward skips its graph
        p.requires_grad_(False)
    model.train()
    with torch.inference_mode():  # as in Lightning's evaluation and prediction loops
        frozen = grad_cam(model, x, target.clone())
    assert frozen.shape == (4, 64, 64) and frozen.amax((1, 2)).eq(1).all()  # not empty
    torch.testing.assert_close(frozen, trainable)
    assert model.training and model.head.training
    assert all(p.requires_grad for p in model.head.parameters())
    assert not any(p.requires_grad for p in model.backbone.parameters())


@pytest.mark.parametrize(
    "layers",
    [
        # ViT-like: a patch embedding, then a token sequence (N, L, C).
        [nn.Conv2d(3, 8, 8, stride=8), nn.Flatten(2), Permute([0, 2, 1]), nn.Linear(8, 8)],
        # Swin-like: maps kept channels-last (N, H, W, C).
        [nn.Conv2d(3, 12, 4, stride=4), Permute([0, 2, 3, 1]), nn.LayerNorm(12)],
    ],
    ids=["tokens", "channels-last"],
)
def test_backbones_without_a_conv_map_are_refused_clearly(layers):
    model = TransferClassifier(backbone="test_vgg16", weights="none", num_classes=2, image_size=32)
    model.backbone = nn.Sequential(*layers)
    with pytest.raises(ConfigError, match="not supported for the backbone test_vgg16"):
        grad_cam(model, torch.zeros(1, 3, 32, 32, dtype=torch.uint8))


def test_mistakes_carry_heat_maps_that_the_figure_draws():
    x, y = tiny_tensors(12, 32)
    model = TransferClassifier(backbone="test_vgg16", weights="none", num_classes=3, image_size=32)
    result = evaluate(model, DataLoader(TensorDataset(x, y), batch_size=4), max_mistakes=4)
    assert result.mistakes and all(m.heat.shape == (32, 32) for m in result.mistakes)
    with_heat = figure_pixels(plot_mistakes(result))
    for m in result.mistakes:
        m.heat = None
    assert with_heat.shape == figure_pixels(plot_mistakes(result)).shape
    assert not np.array_equal(with_heat, figure_pixels(plot_mistakes(result)))


def figure_pixels(fig):
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=50)
    return np.asarray(Image.open(buffer))


def test_overlay_blends_the_colour_map_over_the_image():
    image = torch.full((3, 8, 8), 128, dtype=torch.uint8)
    heat = torch.zeros(8, 8)
    heat[:4, :4] = 1
    blended = overlay(image, heat)
    assert blended.dtype == torch.uint8 and blended.shape == (3, 8, 8)
    blended = blended.int()
    assert blended[0, 0, 0] > blended[2, 0, 0]  # hot: red
    assert blended[2, 7, 7] > blended[0, 7, 7]  # cold: blue


def test_overlay_files_are_named_after_the_images():
    files = [Path("/d/cats/a.jpg"), Path("/d/cats/a.png"), Path("/d/dogs/b.jpeg"), Path("/d/c.png")]
    assert overlay_names(files) == {
        0: Path("cats/a.jpg.png"),  # a.jpg and a.png would both be a.png
        1: Path("cats/a.png.png"),
        2: Path("dogs/b.png"),
        3: Path("c.png"),
    }


def test_without_captum_reports_still_work_and_say_why_there_is_no_map(monkeypatch, data_log):
    monkeypatch.setitem(sys.modules, "captum.attr", None)  # as if captum were not installed
    x, y = tiny_tensors(12, 32)
    model = TransferClassifier(backbone="test_vgg16", weights="none", num_classes=3, image_size=32)
    result = evaluate(model, DataLoader(TensorDataset(x, y), batch_size=4), max_mistakes=2)
    assert result.mistakes and all(m.heat is None for m in result.mistakes)
    assert "pip install 'tlfinetune[saliency]'" in data_log.text
    with pytest.raises(ConfigError, match=r"need the captum package"):
        grad_cam(model, x[:1])


@pytest.mark.parametrize("name", [n for n in FAMILIES if n != "test_vit"])  # ViT: refused above
def test_every_convolutional_family_gets_a_heat_map_per_image(name, one_thread):
    model = TransferClassifier(backbone=name, weights="none", num_classes=3, image_size=32)
    images = torch.randint(0, 256, (2, 3, 32, 32), generator=torch.Generator().manual_seed(0))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cam = grad_cam(model, images.to(torch.uint8))
    assert cam.shape == (2, 32, 32) and torch.isfinite(cam).all()
    assert cam.min() >= 0 and cam.max() <= 1
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
