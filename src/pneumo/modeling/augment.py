"""Training-time augmentation: the seed's Keras-style transforms plus framing and acquisition changes.

Augmentation runs on the (1, H, W) [0, 1] tensor between :func:`pneumo.core.preprocess.to_unit_array`
and :func:`pneumo.core.preprocess.normalize`, on training samples only (the Predictor never calls
it). The framing steps (random resized crops, aspect-ratio jitter, black padding) exist to break
the shortcut "a tightly framed film is pneumonia" that :mod:`pneumo.evaluation.robustness`
measures; the photometric steps imitate other machines (gamma, blur, noise, burned-in text), with
the same operations the robustness validation scores (:mod:`pneumo.core.image_ops`).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from pneumo.core import image_ops as ops
from pneumo.core.errors import DataError
from pneumo.modeling.config import AugmentConfig


class _Augment:
    """Random augmentation of a (1, H, W) tensor in [0, 1]; a class (not a lambda) so workers can pickle it."""

    def __init__(self, transform: Callable[[torch.Tensor], torch.Tensor] | None) -> None:
        self.transform = transform

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        # Clone first: torchvision returns its input unchanged when no transform fires, and the
        # caller must be free to keep (or cache) the tensor it passed in.
        out = tensor.clone()
        return self.transform(out) if self.transform is not None else out

    def __repr__(self) -> str:
        return f"_Augment({self.transform!r})"


def _generator() -> np.random.Generator:
    """A NumPy generator drawn from torch's, so a run seeded through torch (Lightning) stays reproducible."""
    return np.random.default_rng(int(torch.randint(2**62, ())))


class _RandomGamma:
    """:func:`pneumo.core.image_ops.gamma` with an exponent uniform in ``[1 - amount, 1 + amount]``."""

    def __init__(self, amount: float) -> None:
        self.amount = amount

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        g = 1.0 + (2.0 * float(torch.rand(())) - 1.0) * self.amount
        return torch.from_numpy(ops.gamma(tensor.numpy(), g))

    def __repr__(self) -> str:
        return f"_RandomGamma({self.amount})"


class _RandomNoise:
    """:func:`pneumo.core.image_ops.add_noise` with a random standard deviation up to ``sigma``."""

    def __init__(self, sigma: float) -> None:
        self.sigma = sigma

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        std = float(torch.rand(())) * self.sigma
        return torch.from_numpy(ops.add_noise(tensor.numpy(), std, _generator()))

    def __repr__(self) -> str:
        return f"_RandomNoise({self.sigma})"


class _RandomText:
    """:func:`pneumo.core.image_ops.burn_text` with probability ``p``, at a random height of 3.5-7.5% of the image."""

    def __init__(self, p: float) -> None:
        self.p = p

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        if float(torch.rand(())) >= self.p:
            return tensor
        height = 0.035 + 0.04 * float(torch.rand(()))
        image = ops.burn_text(ops.to_image(tensor[0].numpy()), _generator(), height)
        return torch.from_numpy(ops.to_pixels(image)).unsqueeze(0)

    def __repr__(self) -> str:
        return f"_RandomText({self.p})"


def build_augment(cfg: AugmentConfig, size: int | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """A random transform for (1, H, W) tensors in [0, 1] that returns a new tensor of the same size.

    Geometric changes fill with black, the background of a radiograph. When ``cfg.enabled`` is
    false (or every strength is zero) the transform returns a copy of its input. ``size`` is the
    output side for the framing steps (the input's side when ``None``).
    """
    from torchvision.transforms import v2

    steps: list[Callable[[torch.Tensor], torch.Tensor]] = []
    if cfg.enabled:
        if cfg.pad > 0:
            steps.append(v2.RandomApply([v2.RandomZoomOut(fill=0.0, side_range=(1.0, 1.0 + 2 * cfg.pad))], p=0.5))
        if cfg.crop_scale > 0 or cfg.pad > 0:
            if size is None:
                raise DataError("build_augment needs the input size for crop/pad augmentation.", code="bad_config")
            scale = (cfg.crop_scale, 1.0) if cfg.crop_scale > 0 else (1.0, 1.0)
            ratio = (1.0 / cfg.aspect, cfg.aspect) if cfg.aspect > 1 else (1.0, 1.0)
            steps.append(v2.RandomResizedCrop(size, scale=scale, ratio=ratio, antialias=True))
        if cfg.rotation_deg or cfg.zoom or cfg.shift:
            steps.append(
                v2.RandomAffine(
                    degrees=cfg.rotation_deg,
                    translate=(cfg.shift, cfg.shift) if cfg.shift else None,
                    scale=(1.0 - cfg.zoom, 1.0 + cfg.zoom) if cfg.zoom else None,
                    interpolation=v2.InterpolationMode.BILINEAR,
                    fill=0.0,
                )
            )
        if cfg.hflip > 0:
            steps.append(v2.RandomHorizontalFlip(p=cfg.hflip))
        if cfg.brightness or cfg.contrast:
            steps.append(v2.ColorJitter(brightness=cfg.brightness or None, contrast=cfg.contrast or None))
        if cfg.gamma > 0:
            steps.append(_RandomGamma(cfg.gamma))
        if cfg.blur > 0:
            steps.append(v2.RandomApply([v2.GaussianBlur(kernel_size=5, sigma=(0.1, cfg.blur))], p=0.3))
        if cfg.noise > 0:
            steps.append(v2.RandomApply([_RandomNoise(cfg.noise)], p=0.3))
        if cfg.text > 0:
            steps.append(_RandomText(cfg.text))
    return _Augment(v2.Compose(steps) if steps else None)
