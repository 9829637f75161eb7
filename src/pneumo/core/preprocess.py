"""The one preprocessing path shared by training, evaluation and inference (NumPy only, no torch).

A decoded grayscale image (see :mod:`pneumo.core.decode`) becomes the model's input in four steps:
canonical framing (:mod:`pneumo.core.framing`: the lung box plus a margin, or the full frame for
bundles made before it), :func:`resize` (squash to ``input_size`` x ``input_size``, as the dataset
was made), :func:`to_unit_array` (1 x H x W floats in [0, 1]) and :func:`normalize` (3 channels, the
backbone's mean/std). :class:`Preprocessor` runs them; training inserts augmentation before the
framing (a reframed raw film) and between the last two steps, and turns the result into a tensor
after :func:`normalize`. The framing, sizes and statistics come from a :class:`PreprocessConfig`
stored in the model bundle, so a bundle always sees what it was trained on.

NumPy rather than torch: the inference path must load without torch, and on one small image
torch's intra-op thread pool costs far more than the arithmetic (when the cores are busy each
pooled op waits for a descheduled thread: measured 40-90 ms instead of ~1 ms on 2 loaded cores).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any, ClassVar

import numpy as np
from PIL import Image
from pydantic import ConfigDict, Field

from pneumo.core.framing import FULL_FRAME, Box, Framer, FramingConfig

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
    #: How the film is framed before resizing; the default (``method="none"``) is the full frame.
    framing: FramingConfig = field(default_factory=FramingConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def framed(self) -> bool:
        """Whether the film is cropped to its lung fields before resizing."""
        return self.framing.method != "none"


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


class Preprocessor:
    """The whole path from a decoded image to the model's input, for one bundle's :class:`PreprocessConfig`.

    The Predictor, the training data, the INT8 calibration and the robustness validation all hold
    one, so the framing a bundle was trained with is the framing it is served with.

    Args:
        config: the bundle's preprocessing.
        localizer: the lung localizer graph when the config frames the film (the bundle's
            ``localizer.onnx``; None: the one shipped with pneumo, which training uses).
    """

    def __init__(self, config: PreprocessConfig, localizer: Path | None = None) -> None:
        self.config = config
        self.framer = Framer(config.framing, localizer) if config.framed else None

    def frame(self, image: Image.Image) -> tuple[Image.Image, Box]:
        """The part of ``image`` the model sees and its box (the full frame when the bundle does not frame)."""
        if self.framer is None:
            return image, FULL_FRAME
        return self.framer.apply(image)

    def prepare(self, image: Image.Image) -> tuple[np.ndarray, Box]:
        """Decoded grayscale image -> normalized float32 (3, S, S) model input, and the crop box it came from."""
        crop, box = self.frame(image)
        return preprocess(crop, self.config), box

    def __call__(self, image: Image.Image) -> np.ndarray:
        """The model input of ``image`` (:meth:`prepare` without the box)."""
        return self.prepare(image)[0]
