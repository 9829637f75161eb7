"""The one preprocessing path shared by training, evaluation and inference (NumPy only, no torch).

A decoded grayscale image (see :mod:`pneumo.core.decode`) becomes the model's input in three steps:
:func:`resize` (squash to ``input_size`` x ``input_size``, as the dataset was made),
:func:`to_unit_array` (1 x H x W floats in [0, 1]) and :func:`normalize` (3 channels, the
backbone's mean/std). Training inserts augmentation between the last two steps (and turns the
result into a tensor after :func:`normalize`); everything else calls :func:`preprocess`. The sizes
and statistics come from a :class:`PreprocessConfig` stored in the model bundle, so a bundle
always sees what it was trained on.

NumPy rather than torch: the inference path must load without torch, and on one small image
torch's intra-op thread pool costs far more than the arithmetic (when the cores are busy each
pooled op waits for a descheduled thread: measured 40-90 ms instead of ~1 ms on 2 loaded cores).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Annotated, Any, ClassVar

import numpy as np
from PIL import Image
from pydantic import ConfigDict, Field

#: Antialiased bilinear resampling: Pillow widens the filter support when downscaling, so a
#: 2000 px film shrunk to 224 px matches the dataset's 224 px copies (checked in the slow tests).
RESAMPLE = Image.Resampling.BILINEAR


_Level = Annotated[float, Field(ge=-10.0, le=10.0)]
_Spread = Annotated[float, Field(gt=1e-3, le=10.0)]


@dataclass(frozen=True)
class PreprocessConfig:
    """What the model expects: square input side and the per-channel normalization.

    The annotations double as the bundle's schema: :class:`pneumo.core.bundle.BundleMeta` validates
    ``bundle.json``'s ``preprocess`` section against them (a side of 16-1024 pixels, three finite
    means and positive stds, no unknown keys). Plain construction in code is not checked.
    """

    __pydantic_config__: ClassVar[ConfigDict] = ConfigDict(extra="forbid", allow_inf_nan=False)

    # Capped: a tampered bundle asking for 60000 px inputs would allocate gigabytes per image.
    input_size: Annotated[int, Field(ge=16, le=1024)] = 224
    mean: tuple[_Level, _Level, _Level] = (0.5, 0.5, 0.5)
    std: tuple[_Spread, _Spread, _Spread] = (0.5, 0.5, 0.5)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def resize(image: Image.Image, size: int) -> Image.Image:
    """Squash a grayscale image to ``size`` x ``size`` (aspect ratio not kept, like the dataset)."""
    if image.mode != "L":
        image = image.convert("L")
    if image.size == (size, size):
        return image
    return image.resize((size, size), RESAMPLE)


def to_unit_array(image: Image.Image) -> np.ndarray:
    """An 8-bit grayscale image as float32 of shape (1, H, W) with values in [0, 1]."""
    return (np.asarray(image, dtype=np.float32) / 255.0)[None]


def normalize(array: np.ndarray, config: PreprocessConfig) -> np.ndarray:
    """Repeat a (1, H, W) or (N, 1, H, W) grayscale float32 array to 3 channels and normalize it.

    Returns a new float32 array; the input is never modified. The Predictor and the training
    batches both call this, so the two cannot drift apart.
    """
    array = np.asarray(array, dtype=np.float32)
    if array.ndim not in (3, 4):
        raise ValueError(f"normalize expects (1, H, W) or (N, 1, H, W) pixels, got shape {array.shape}.")
    view = (3, 1, 1) if array.ndim == 3 else (1, 3, 1, 1)
    mean = np.asarray(config.mean, dtype=np.float32).reshape(view)
    std = np.asarray(config.std, dtype=np.float32).reshape(view)
    return (array - mean) / std  # broadcasting repeats one gray channel to three


def preprocess(image: Image.Image, config: PreprocessConfig) -> np.ndarray:
    """Decoded grayscale image -> normalized float32 (3, S, S) model input."""
    return normalize(to_unit_array(resize(image, config.input_size)), config)
