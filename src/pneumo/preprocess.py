"""The one preprocessing path shared by training, evaluation and inference.

A decoded grayscale image (see :mod:`pneumo.io`) becomes the model's input in three steps:
:func:`resize` (squash to ``input_size`` x ``input_size``, as the dataset was made),
:func:`to_unit_tensor` (1 x H x W floats in [0, 1]) and :func:`normalize` (3 channels, the
backbone's mean/std). Training inserts augmentation between the last two steps; everything
else calls :func:`preprocess`. The sizes and statistics come from a :class:`PreprocessConfig`
stored in the model bundle, so a bundle always sees what it was trained on.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

#: Antialiased bilinear resampling: Pillow widens the filter support when downscaling, so a
#: 2000 px film shrunk to 224 px matches the dataset's 224 px copies (checked in the slow tests).
RESAMPLE = Image.Resampling.BILINEAR


@dataclass(frozen=True)
class PreprocessConfig:
    """What the model expects: square input side and the per-channel normalization."""

    input_size: int = 224
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PreprocessConfig:
        mean, std = tuple(float(v) for v in data["mean"]), tuple(float(v) for v in data["std"])
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"preprocess needs 3 mean and 3 positive std values, got mean={mean}, std={std}")
        return cls(int(data["input_size"]), mean, std)


def resize(image: Image.Image, size: int) -> Image.Image:
    """Squash a grayscale image to ``size`` x ``size`` (aspect ratio not kept, like the dataset)."""
    if image.mode != "L":
        image = image.convert("L")
    if image.size == (size, size):
        return image
    return image.resize((size, size), RESAMPLE)


def to_unit_tensor(image: Image.Image) -> torch.Tensor:
    """An 8-bit grayscale image as a float tensor of shape (1, H, W) with values in [0, 1]."""
    array = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy(array).unsqueeze(0)


def normalize(tensor: torch.Tensor, config: PreprocessConfig) -> torch.Tensor:
    """Repeat a (1, H, W) or (N, 1, H, W) grayscale tensor to 3 channels and normalize it.

    Returns a new tensor; the input is never modified.
    """
    channel_dim = tensor.dim() - 3
    if tensor.shape[channel_dim] == 1:
        shape = [1] * tensor.dim()
        shape[channel_dim] = 3
        tensor = tensor.repeat(*shape)
    view = [3, 1, 1] if tensor.dim() == 3 else [1, 3, 1, 1]
    mean = torch.tensor(config.mean, dtype=tensor.dtype).view(view)
    std = torch.tensor(config.std, dtype=tensor.dtype).view(view)
    return (tensor - mean) / std


def preprocess(image: Image.Image, config: PreprocessConfig) -> torch.Tensor:
    """Decoded grayscale image -> normalized (3, S, S) model input.

    Bit-identical to ``normalize(to_unit_tensor(resize(image, size)), config)`` (the same float32
    operations), but computed in NumPy: on one small image, torch's intra-op thread pool costs
    far more than the arithmetic, and when the cores are busy (ONNX Runtime's threads, other
    processes) each pooled op waits for a descheduled thread: measured 40-90 ms instead of ~1 ms
    on 2 loaded cores. Training batches still use :func:`normalize`.
    """
    pixels = np.asarray(resize(image, config.input_size), dtype=np.float32) / 255.0
    mean = np.asarray(config.mean, dtype=np.float32).reshape(3, 1, 1)
    std = np.asarray(config.std, dtype=np.float32).reshape(3, 1, 1)
    return torch.from_numpy((pixels[None] - mean) / std)
