"""Training data and export of the lung localizer (pneumo.modeling.localizer, localizer_data)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from framing_helpers import synthetic_chest
from PIL import Image
from scipy import ndimage

from pneumo.core.framing import Box, Framer, FramingConfig
from pneumo.modeling.localizer import TinyBoxNet, export_localizer
from pneumo.modeling.localizer_data import (
    VIEW_SOURCE,
    _otsu,
    mask_box,
    negative_view,
    pseudo_label,
    random_view,
)


def _chest() -> tuple[Image.Image, Box]:
    return synthetic_chest(VIEW_SOURCE, VIEW_SOURCE)


def test_otsu_splits_two_populations() -> None:
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(10, 2, 2000), rng.normal(50, 3, 1000)])
    assert 15 < _otsu(values) < 45


def test_mask_box() -> None:
    mask = np.zeros((10, 20), bool)
    assert mask_box(mask) is None
    mask[2:5, 4:8] = True
    assert mask_box(mask) == (0.2, 0.2, 0.4, 0.5)


def test_pseudo_label_finds_and_accepts_the_lungs_of_a_synthetic_chest() -> None:
    image, lungs = _chest()
    label = pseudo_label(image)
    assert label.accepted
    box = label.box()
    assert box is not None and Box(*box).iou(lungs) > 0.75, (box, lungs)


def test_pseudo_label_refuses_a_picture_without_lungs() -> None:
    assert not pseudo_label(Image.new("L", (224, 224), 120)).accepted
    noise = np.random.default_rng(0).integers(0, 256, (224, 224), dtype=np.uint8)
    assert not pseudo_label(Image.fromarray(noise, mode="L")).accepted


def _mask_of(box: Box) -> Image.Image:
    mask = Image.new("L", (VIEW_SOURCE, VIEW_SOURCE), 0)
    mask.paste(255, box.to_pixels(VIEW_SOURCE, VIEW_SOURCE))
    return mask


def test_random_views_move_the_label_with_the_image() -> None:
    """The target box sits on the lungs' pixels in every view: the mask drawn as a white square shows it."""
    lungs = Box(0.3, 0.25, 0.7, 0.75)
    mask = _mask_of(lungs)
    film = mask.copy()  # the film *is* the lungs: the target box must be where the bright square went
    rng = np.random.default_rng(0)
    checked = 0
    for _ in range(200):
        pixels, target, found = random_view(film, mask, rng, 64)
        assert pixels.shape == (1, 64, 64) and pixels.dtype == np.float32
        if not found:
            continue
        bright = pixels[0] > 0.6  # the square, and maybe a white fill, band or text: keep the largest blob
        if bright[[0, 0, -1, -1], [0, -1, 0, -1]].any() or bright.sum() < 40:
            continue
        labels, count = ndimage.label(bright)
        largest = 1 + int(np.argmax(ndimage.sum(bright, labels, range(1, count + 1))))
        seen = mask_box(labels == largest)
        assert seen is not None
        cut = Box(max(target[0], 0.0), max(target[1], 0.0), min(target[2], 1.0), min(target[3], 1.0))
        assert cut.iou(Box(*seen)) > 0.7, (target, seen)
        checked += 1
    assert checked > 100


def test_random_views_extend_the_box_past_a_frame_that_cuts_the_lungs() -> None:
    mask = _mask_of(Box(0.3, 0.05, 0.7, 0.95))
    rng = np.random.default_rng(3)
    targets = np.array([random_view(mask, mask, rng, 32)[1] for _ in range(300)])
    assert (targets[:, 1] < -0.01).any() and (targets[:, 3] > 1.01).any()
    assert targets.min() >= -0.5 and targets.max() <= 1.5


def test_negative_views_are_thumbnails() -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        pixels = negative_view(rng, 64)
        assert pixels.shape == (1, 64, 64) and np.abs(pixels).max() <= 1.0


def test_export_writes_a_graph_the_framer_reads(tmp_path: Path) -> None:
    import torch

    torch.manual_seed(0)
    path = export_localizer(TinyBoxNet(64), tmp_path / "localizer.onnx")
    assert path.stat().st_size < 1_000_000
    image, _ = _chest()
    crop, box = Framer(FramingConfig(method="lungbox-v1"), path).apply(image)  # untrained: any answer, no crash
    assert crop.mode == "L" and 0.0 <= box.x0 < box.x1 <= 1.0
