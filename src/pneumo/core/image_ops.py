"""Image operations that imitate other framings and other machines, written once.

The robustness validation (:mod:`pneumo.evaluation.robustness`) applies them with fixed strengths
to score a model; training (:mod:`pneumo.modeling.augment`, :mod:`pneumo.modeling.data`) applies
them with random strengths to teach one. Both call these functions, so "a 12% crop" or "burned-in
text" means the same thing in the score and in the lesson. Every function returns a new image or
array and never modifies its input; the random ones take a NumPy generator, so a seeded caller is
reproducible. Pillow and NumPy only (no torch): the evaluation runs in a serving install.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

#: Words a radiograph carries burned in (side markers, positions, dates, times, sites).
TEXT_WORDS = ("R", "L", "AP", "PA", "PORTABLE", "SUPINE", "ERECT", "2017-03-14", "11:42", "DX", "CHEST", "GZ-WCMC")


def crop_fraction(image: Image.Image, top: float, bottom: float, left: float, right: float) -> Image.Image:
    """``image`` with the given fractions of its height (top, bottom) and width (left, right) cut off."""
    w, h = image.size
    return image.crop((round(left * w), round(top * h), w - round(right * w), h - round(bottom * h)))


def pad_fraction(image: Image.Image, vertical: float, horizontal: float) -> Image.Image:
    """``image`` inside black margins (the background of a radiograph) of the given fraction of each side."""
    w, h = image.size
    dx, dy = round(horizontal * w), round(vertical * h)
    canvas = Image.new("L", (w + 2 * dx, h + 2 * dy), 0)
    canvas.paste(image.convert("L"), (dx, dy))
    return canvas


def gamma(pixels: np.ndarray, exponent: float) -> np.ndarray:
    """``pixels ** exponent`` for values in [0, 1] (a detector's other response curve)."""
    return np.clip(np.asarray(pixels, dtype=np.float32), 0.0, 1.0) ** np.float32(exponent)


def add_noise(pixels: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Additive Gaussian noise of standard deviation ``sigma`` (unit intensities), clipped to [0, 1]."""
    noisy = np.asarray(pixels, dtype=np.float32) + rng.normal(0.0, sigma, np.shape(pixels)).astype(np.float32)
    return np.clip(noisy, 0.0, 1.0)


def burn_text(image: Image.Image, rng: np.random.Generator, height_fraction: float = 0.055) -> Image.Image:
    """One to three burned-in words in a random corner, at ``height_fraction`` of the image height, near white."""
    out = image.convert("L").copy()
    w, h = out.size
    font = ImageFont.load_default(size=max(8, round(height_fraction * h)))
    words = " ".join(str(rng.choice(TEXT_WORDS)) for _ in range(int(rng.integers(1, 4))))
    draw = ImageDraw.Draw(out)
    left, top, right, bottom = draw.textbbox((0, 0), words, font=font)
    margin = round(0.03 * min(w, h))
    x = margin if rng.random() < 0.5 else max(margin, w - (right - left) - margin)
    y = margin if rng.random() < 0.5 else max(margin, h - (bottom - top) - margin)
    draw.text((x, y), words, fill=int(rng.integers(200, 256)), font=font)
    return out


def to_image(pixels: np.ndarray) -> Image.Image:
    """A (H, W) array in [0, 1] as an 8-bit grayscale image."""
    return Image.fromarray(np.clip(np.round(np.asarray(pixels) * 255.0), 0, 255).astype(np.uint8), mode="L")


def to_pixels(image: Image.Image) -> np.ndarray:
    """An image as a float32 (H, W) array in [0, 1]."""
    return np.asarray(image.convert("L"), dtype=np.float32) / 255.0
