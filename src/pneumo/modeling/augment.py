"""Training-time augmentation: the seed's Keras-style transforms plus framing and acquisition changes.

Augmentation runs on the (1, H, W) [0, 1] tensor between :func:`pneumo.core.preprocess.to_unit_array`
and :func:`pneumo.core.preprocess.normalize`, on training samples only (the Predictor never calls
it). The framing steps (random resized crops, aspect-ratio jitter, black padding) exist to break
the shortcut "a tightly framed film is pneumonia" that :mod:`pneumo.evaluation.robustness`
measures; the photometric steps imitate other machines (gamma, blur, noise, burned-in text).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

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


class _RandomGamma:
    """``x ** g`` with ``g`` uniform in ``[1 - amount, 1 + amount]`` (torchvision has no random gamma)."""

    def __init__(self, amount: float) -> None:
        self.amount = amount

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        g = 1.0 + (2.0 * float(torch.rand(())) - 1.0) * self.amount
        return tensor.clamp(0.0, 1.0) ** g

    def __repr__(self) -> str:
        return f"_RandomGamma({self.amount})"


class _RandomNoise:
    """Additive Gaussian noise of a random std up to ``sigma``, clipped to [0, 1]."""

    def __init__(self, sigma: float) -> None:
        self.sigma = sigma

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        std = float(torch.rand(())) * self.sigma
        return (tensor + torch.randn_like(tensor) * std).clamp(0.0, 1.0)

    def __repr__(self) -> str:
        return f"_RandomNoise({self.sigma})"


class _RandomText:
    """Burned-in text (side markers, dates) in a random corner with probability ``p``.

    Drawn with Pillow on the 8-bit image because torchvision draws no text; the words and
    placement come from torch's generator, so a seeded run is reproducible.
    """

    _WORDS = ("R", "L", "AP", "PA", "PORTABLE", "SUPINE", "ERECT", "2016-11-02", "09:15", "DX", "CHEST")

    def __init__(self, p: float) -> None:
        self.p = p

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        if float(torch.rand(())) >= self.p:
            return tensor
        from PIL import Image, ImageDraw, ImageFont

        _, h, w = tensor.shape
        image = Image.fromarray((tensor[0].clamp(0, 1) * 255).round().to(torch.uint8).numpy(), mode="L")
        draw = ImageDraw.Draw(image)
        n_words = 1 + int(torch.randint(3, ()))
        words = " ".join(self._WORDS[int(torch.randint(len(self._WORDS), ()))] for _ in range(n_words))
        font = ImageFont.load_default(size=max(8, round(h * (0.035 + 0.04 * float(torch.rand(()))))))
        left, top, right, bottom = draw.textbbox((0, 0), words, font=font)
        margin = round(0.03 * min(w, h))
        x = margin if float(torch.rand(())) < 0.5 else max(margin, w - (right - left) - margin)
        y = margin if float(torch.rand(())) < 0.5 else max(margin, h - (bottom - top) - margin)
        draw.text((x, y), words, fill=200 + int(torch.randint(56, ())), font=font)
        return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).unsqueeze(0)

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
