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
from PIL import Image

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


class RandomReframe:
    """Reframe a raw film as another hospital might have: random black margins or a random crop (Pillow, no resize).

    For bundles that frame films to their lungs (:mod:`pneumo.core.framing`), the framing
    augmentation must happen *before* the lungs are located, so the model learns from the crops the
    localizer really gives on films framed every which way (and tightly framed healthy films stop
    looking like the dataset's tightly framed pneumonia films). Half of the time each side gets a
    margin of up to ``cfg.pad`` of the image; otherwise a crop of at least ``cfg.crop_scale`` of the
    area with an aspect ratio within ``cfg.aspect``, placed at random (torchvision's
    RandomResizedCrop's sampling, without its resize: the framing and the resize come after).
    """

    def __init__(self, cfg: AugmentConfig) -> None:
        self.pad, self.crop_scale, self.aspect = cfg.pad, cfg.crop_scale, max(cfg.aspect, 1.0)

    def __call__(self, image: Image.Image) -> Image.Image:
        rng = _generator()
        if self.pad > 0 and (self.crop_scale <= 0 or rng.random() < 0.5):
            left, top, right, bottom = rng.uniform(0.0, self.pad, 4)
            w, h = image.size
            canvas = Image.new("L", (w + round((left + right) * w), h + round((top + bottom) * h)), 0)
            canvas.paste(image, (round(left * w), round(top * h)))
            return canvas
        if self.crop_scale <= 0:
            return image
        w, h = image.size
        area = rng.uniform(self.crop_scale, 1.0)
        ratio = float(np.exp(rng.uniform(-np.log(self.aspect), np.log(self.aspect))))
        cw = min(1.0, float(np.sqrt(area * ratio)))
        ch = min(1.0, area / cw)
        x0, y0 = rng.uniform(0.0, 1.0 - cw), rng.uniform(0.0, 1.0 - ch)
        return ops.crop_fraction(image, y0, 1.0 - y0 - ch, x0, 1.0 - x0 - cw)

    def __repr__(self) -> str:
        return f"RandomReframe(pad={self.pad}, crop_scale={self.crop_scale}, aspect={self.aspect})"


def build_augment(
    cfg: AugmentConfig, size: int | None = None, *, framed: bool = False
) -> Callable[[torch.Tensor], torch.Tensor]:
    """A random transform for (1, H, W) tensors in [0, 1] that returns a new tensor of the same size.

    Geometric changes fill with black, the background of a radiograph. When ``cfg.enabled`` is
    false (or every strength is zero) the transform returns a copy of its input. ``size`` is the
    output side for the framing steps (the input's side when ``None``). With ``framed`` (the bundle
    crops films to their lungs) the framing steps (pads, crops) are left out here: they run on the
    raw film before the lungs are located (:class:`RandomReframe`).
    """
    from torchvision.transforms import v2

    steps: list[Callable[[torch.Tensor], torch.Tensor]] = []
    if cfg.enabled:
        if cfg.pad > 0 and not framed:
            steps.append(v2.RandomApply([v2.RandomZoomOut(fill=0.0, side_range=(1.0, 1.0 + 2 * cfg.pad))], p=0.5))
        if (cfg.crop_scale > 0 or cfg.pad > 0) and not framed:
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
