"""The one preprocessing path (``pneumo.core.preprocess``, NumPy): shape, dtype, normalization, no mutation."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from pydantic import TypeAdapter, ValidationError

from pneumo.core.preprocess import PreprocessConfig, normalize, preprocess, resize, to_unit_array

IMAGENET = PreprocessConfig(32, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def _gradient(width: int = 48, height: int = 40) -> Image.Image:
    array = (np.arange(width * height) % 256).astype(np.uint8).reshape(height, width)
    return Image.fromarray(array, mode="L")


def test_output_shape_and_dtype_for_any_input_shape() -> None:
    for size in ((48, 40), (32, 32), (7, 300)):
        out = preprocess(_gradient(*size), IMAGENET)
        assert out.shape == (3, 32, 32)
        assert out.dtype == np.float32


@pytest.mark.parametrize("value", [0, 128, 255])
def test_normalization_values_per_channel(value: int) -> None:
    image = Image.new("L", (32, 32), value)
    out = preprocess(image, IMAGENET)
    for channel in range(3):
        expected = (value / 255.0 - IMAGENET.mean[channel]) / IMAGENET.std[channel]
        np.testing.assert_allclose(out[channel], np.full((32, 32), expected), atol=1e-6)


def test_grayscale_becomes_three_identical_channels() -> None:
    out = preprocess(_gradient(), PreprocessConfig(32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)))
    assert np.array_equal(out[0], out[1]) and np.array_equal(out[1], out[2])
    assert out.min() >= -1.0 and out.max() <= 1.0
    assert out.std() > 0.1  # the picture survived


def test_rgb_input_is_read_as_its_luminance() -> None:
    gray = _gradient()
    rgb = gray.convert("RGB")
    assert np.array_equal(preprocess(rgb, IMAGENET), preprocess(gray, IMAGENET))


def test_inputs_are_never_mutated() -> None:
    image = _gradient()
    before = image.tobytes()
    preprocess(image, IMAGENET)
    resize(image, 16)
    assert image.tobytes() == before and image.size == (48, 40) and image.mode == "L"

    pixels = to_unit_array(image)
    copy = pixels.copy()
    out = normalize(pixels, IMAGENET)
    assert np.array_equal(pixels, copy)
    assert not np.shares_memory(out, pixels)


def test_to_unit_array_range_and_resize_size() -> None:
    pixels = to_unit_array(Image.new("L", (5, 3), 255))
    assert pixels.shape == (1, 3, 5) and pixels.dtype == np.float32 and np.all(pixels == 1.0)
    assert resize(_gradient(), 20).size == (20, 20)
    same = Image.new("L", (20, 20), 9)
    assert resize(same, 20).tobytes() == same.tobytes()


def test_normalize_batch_matches_single_images() -> None:
    batch = np.random.default_rng(0).random((4, 1, 8, 8), dtype=np.float32)
    out = normalize(batch, IMAGENET)
    assert out.shape == (4, 3, 8, 8) and out.dtype == np.float32
    for i in range(4):
        assert np.array_equal(out[i], normalize(batch[i], IMAGENET))
    with pytest.raises(ValueError, match="shape"):
        normalize(np.zeros((8, 8), np.float32), IMAGENET)


def test_config_round_trip_and_validation() -> None:
    """The annotations are the bundle's schema for this section (BundleMeta validates through them)."""
    schema = TypeAdapter(PreprocessConfig)
    assert schema.validate_python(IMAGENET.to_dict()) == IMAGENET
    for bad in (
        {"input_size": 32, "mean": [0.5], "std": [0.5, 0.5, 0.5]},
        {"input_size": 32, "mean": [0.5] * 3, "std": [0.5, 0.0, 0.5]},
        {"input_size": 0, "mean": [0.5] * 3, "std": [0.5] * 3},
        {"input_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3, "crop": 0.9},
    ):
        with pytest.raises(ValidationError):
            schema.validate_python(bad)
