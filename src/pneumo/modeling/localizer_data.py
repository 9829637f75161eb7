"""Training data of the lung localizer: classical pseudo-labels, and random views whose label moves with the image.

No lung masks exist for this dataset, so the labels are derived: :func:`pseudo_label` marks the
lung fields as the regions much darker than the tissue around them (a black top-hat, i.e. a grey
closing minus the image, with a square wider than a lung), keeps the largest such region on each
side of the midline and accepts the film only when the two look like a pair of lungs (similar
heights, overlapping rows, a mediastinum between them). It runs on *unshifted* films, where it is
reliable (accepted on ~94% of NORMAL and ~63% of PNEUMONIA films, whose opacified lungs are no longer
dark); :func:`random_view` then crops, pads, squashes, rotates and writes on the film, moving the
lung mask with it, so the regressor learns the box of the same anatomy under any framing.

scipy and scikit-image are needed here only (training time); the inference path never imports them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from pneumo.core.framing import thumbnail

#: Side of the square the pseudo-labeler works on (the films are squashed squares already).
LABEL_SIZE = 128
#: Side of the films the views are cut from (the dataset's 224 px squares).
VIEW_SOURCE = 224
#: A view whose visible lung area is under this share of the whole film's counts as "no lungs".
MIN_VISIBLE = 0.35
#: Range of the box coordinates the localizer can express (it may place the lungs past the frame).
BOX_RANGE = (-0.5, 1.5)
_WORDS = ("R", "L", "AP", "PA", "PORTABLE", "SUPINE", "ERECT", "2017-03-14", "11:42", "GZ-WCMC", "DR-2", "KV68")


@dataclass(frozen=True)
class PseudoLabel:
    """The lungs of one film: a boolean mask (``LABEL_SIZE`` square) and whether it is trustworthy."""

    mask: np.ndarray
    accepted: bool

    def box(self) -> tuple[float, float, float, float] | None:
        return mask_box(self.mask)


def mask_box(mask: np.ndarray) -> tuple[float, float, float, float] | None:
    """Normalized ``(x0, y0, x1, y1)`` bounding box of the true pixels of a mask, or ``None`` when empty."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    h, w = mask.shape
    return cols[0] / w, rows[0] / h, (cols[-1] + 1) / w, (rows[-1] + 1) / h


def pseudo_label(image: Image.Image) -> PseudoLabel:
    """The lung fields of an unshifted film, found classically (see the module docstring)."""
    from scipy import ndimage as ndi

    n = LABEL_SIZE
    gray = np.asarray(image.convert("L").resize((n, n), Image.Resampling.BILINEAR), dtype=np.float32)
    gray = ndi.gaussian_filter(gray, 1.5)
    side = int(0.4 * n) | 1  # wider than a lung (~30% of the film), narrower than the body
    pad = side // 2 + 1
    # Zero padding: the air outside the body reaches the (dark) outside of the frame, so the closing
    # leaves it dark; a lung is walled in by the chest wall and the mediastinum, so it is filled.
    closed = ndi.minimum_filter(
        ndi.maximum_filter(np.pad(gray, pad), side, mode="constant", cval=0.0), side, mode="nearest"
    )[pad:-pad, pad:-pad]
    tophat = closed - gray
    mask = tophat > max(_otsu(tophat), 0.25 * float(np.percentile(tophat, 99)))
    mask = ndi.binary_opening(mask, iterations=2)
    mask = ndi.binary_closing(mask, structure=np.ones((5, 1), bool))
    labels, count = ndi.label(mask)
    if count == 0:
        return PseudoLabel(np.zeros((n, n), bool), False)
    index = np.arange(1, count + 1)
    areas = ndi.sum(mask, labels, index)
    centres = ndi.center_of_mass(mask, labels, index)
    best: dict[int, tuple[float, int, tuple[slice, slice]]] = {}
    for label, area, (_, cx), (rows, cols) in zip(index, areas, centres, ndi.find_objects(labels), strict=True):
        touches = cols.start == 0 or cols.stop == n or rows.start == 0 or rows.stop == n
        if area < 0.02 * n * n or touches:  # specks; air outside the body reaching the frame
            continue
        half = int(cx >= n / 2)
        if half not in best or area > best[half][0]:
            best[half] = (float(area), int(label), (rows, cols))
    lungs = np.isin(labels, [b[1] for b in best.values()])
    return PseudoLabel(lungs, len(best) == 2 and _looks_like_lungs(best[0], best[1], n))


def _otsu(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold (the split maximizing the between-class variance), without scikit-image."""
    if float(values.max()) <= float(values.min()):  # flat: nothing to split
        return float(values.max())
    counts, edges = np.histogram(values, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    weight = np.cumsum(counts).astype(np.float64)
    below = np.cumsum(counts * centres)
    total, total_sum = weight[-1], below[-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        mean_low = below / weight
        mean_high = (total_sum - below) / (total - weight)
        between = weight * (total - weight) * (mean_low - mean_high) ** 2
    return float(centres[int(np.nanargmax(between[:-1]))])


def _looks_like_lungs(
    right: tuple[float, int, tuple[slice, slice]], left: tuple[float, int, tuple[slice, slice]], n: int
) -> bool:
    """Whether two dark regions (image left and right) are a plausible pair of lungs."""
    (a0, _, (r0, c0)), (a1, _, (r1, c1)) = right, left
    h0, h1 = r0.stop - r0.start, r1.stop - r1.start
    overlap = min(r0.stop, r1.stop) - max(r0.start, r1.start)
    x0, x1 = min(c0.start, c1.start) / n, max(c0.stop, c1.stop) / n
    y0, y1 = min(r0.start, r1.start) / n, max(r0.stop, r1.stop) / n
    gap = (c1.start - c0.stop) / n
    return (
        overlap > 0.6 * min(h0, h1)
        and 0.6 < h0 / h1 < 1.67
        and 0.4 < a0 / a1 < 2.5
        and x1 - x0 > 0.45
        and y1 - y0 > 0.35
        and 0.0 < gap < 0.3
        and 0.35 < (x0 + x1) / 2 < 0.65
    )


def _frame_offsets(rng: np.random.Generator) -> tuple[float, float, float, float]:
    """Left, top, right, bottom edges of a new frame, as fractions of the film (negative: padding).

    Mostly the framing shifts of the robustness validation and their mixtures, sometimes a
    small window anywhere (which may hold no lungs at all: the "not found" cases).
    """
    if rng.random() < 0.08:
        w, h = rng.uniform(0.25, 0.7, 2)
        x, y = rng.uniform(0.0, 1.0 - w), rng.uniform(0.0, 1.0 - h)
        return x, y, 1.0 - x - w, 1.0 - y - h
    edges = rng.uniform(-0.25, 0.28, 4) * (rng.random(4) < 0.7)
    if rng.random() < 0.3:  # symmetric, as the shifts are
        edges[2], edges[3] = edges[0], edges[1]
    return float(edges[0]), float(edges[1]), float(edges[2]), float(edges[3])


def _text(draw: ImageDraw.ImageDraw, size: tuple[int, int], rng: np.random.Generator) -> None:
    w, h = size
    font = ImageFont.load_default(size=max(6, round(rng.uniform(0.03, 0.09) * h)))
    words = " ".join(str(rng.choice(_WORDS)) for _ in range(int(rng.integers(1, 4))))
    left, top, right, bottom = draw.textbbox((0, 0), words, font=font)
    margin = round(rng.uniform(0.0, 0.05) * min(w, h))
    x = margin if rng.random() < 0.5 else max(margin, w - (right - left) - margin)
    y = margin if rng.random() < 0.5 else max(margin, h - (bottom - top) - margin)
    draw.text((x, y), words, fill=int(rng.integers(170, 256)), font=font)


def _photometric(view: Image.Image, rng: np.random.Generator) -> Image.Image:
    if rng.random() < 0.5:
        gamma = float(np.exp(rng.uniform(-0.5, 0.5)))
        view = view.point([min(255, round(255 * (v / 255) ** gamma)) for v in range(256)])
    if rng.random() < 0.3:
        view = view.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.3, 2.0))))
    if rng.random() < 0.3:
        noisy = np.asarray(view, np.float32) + rng.normal(0.0, rng.uniform(2.0, 14.0), (view.height, view.width))
        view = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), mode="L")
    return view


def random_view(
    film: Image.Image, mask: Image.Image, rng: np.random.Generator, size: int
) -> tuple[np.ndarray, np.ndarray, float]:
    """A randomly reframed view of ``film`` and the box of its lungs in the view's coordinates.

    Args:
        film: a ``VIEW_SOURCE`` square grayscale film.
        mask: its lung mask as an "L" image of the same size (255 = lung).
        rng: the random generator (seeded per sample by the caller).
        size: the localizer's input side.

    Returns:
        The thumbnail (1, S, S), the target box ``(x0, y0, x1, y1)`` normalized to the view (past
        0 or 1 where the view cuts the lungs), and the target "found" (1.0 when at least
        ``MIN_VISIBLE`` of the lungs' area is still in view).
    """
    if rng.random() < 0.5:
        film, mask = film.transpose(Image.Transpose.FLIP_LEFT_RIGHT), mask.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    side = film.width
    left, top, right, bottom = _frame_offsets(rng)
    out_w, out_h = max(8, round((1 - left - right) * side)), max(8, round((1 - top - bottom) * side))
    angle = float(np.deg2rad(rng.uniform(-12.0, 12.0))) if rng.random() < 0.35 else 0.0
    cos, sin = np.cos(angle), np.sin(angle)
    # Output pixel (u, v) -> input pixel: rotate about the view's centre, then shift by the frame's corner.
    cu, cv = out_w / 2, out_h / 2
    cx, cy = left * side + cu, top * side + cv
    coeffs = (cos, -sin, cx - cos * cu + sin * cv, sin, cos, cy - sin * cu - cos * cv)
    fill = 0 if rng.random() < 0.75 else int(rng.choice([255, int(rng.integers(60, 200))]))
    view = film.transform((out_w, out_h), Image.Transform.AFFINE, coeffs, Image.Resampling.BILINEAR, fillcolor=fill)
    moved = mask.transform((out_w, out_h), Image.Transform.AFFINE, coeffs, Image.Resampling.NEAREST, fillcolor=0)
    if rng.random() < 0.2:  # a collimation band inside the frame, black or white
        band = ImageDraw.Draw(view), ImageDraw.Draw(moved)
        dw, dh = float(rng.uniform(0.03, 0.12)) * out_w, float(rng.uniform(0.03, 0.12)) * out_h
        rects = [
            (0.0, 0.0, dw, out_h),
            (0.0, 0.0, out_w, dh),
            (out_w - dw, 0.0, out_w, out_h),
            (0.0, out_h - dh, out_w, out_h),
        ]
        edge = rects[int(rng.integers(4))]
        band[0].rectangle(edge, fill=0 if rng.random() < 0.7 else 255)
        band[1].rectangle(edge, fill=0)
    if rng.random() < 0.5:
        _text(ImageDraw.Draw(view), view.size, rng)
    view = _photometric(view, rng)
    # The target is the box of the *whole* lungs in the view's coordinates, past its edges where the
    # frame cuts them: the box names the anatomy, not the part the frame happens to show.
    rows, cols = np.nonzero(np.asarray(mask) > 127)
    x, y = cols + 0.5 - cx, rows + 0.5 - cy
    u, v = (cos * x + sin * y + cu) / out_w, (-sin * x + cos * y + cv) / out_h
    visible = int((np.asarray(moved) > 127).sum())
    found = float(rows.size > 0 and visible >= MIN_VISIBLE * rows.size)
    box = (u.min(), v.min(), u.max(), v.max()) if found else (0.0, 0.0, 1.0, 1.0)
    target = np.clip(np.asarray(box, dtype=np.float32), BOX_RANGE[0], BOX_RANGE[1])
    return thumbnail(view, size)[0], target, found


def negative_view(rng: np.random.Generator, size: int) -> np.ndarray:
    """A thumbnail of something that is not a chest X-ray (flat, ramps, noise, shapes, text): "no lungs".

    Only synthetic pictures, so the photos and documents of ``benchmarks/ood_nonxray.py`` stay
    unseen and measure the fallback honestly.
    """
    w, h = (int(v) for v in rng.integers(64, 320, 2))
    kind = int(rng.integers(5))
    if kind == 0:
        pixels = np.full((h, w), rng.uniform(0, 255))
    elif kind == 1:
        y, x = np.mgrid[0:h, 0:w]
        pixels = rng.uniform(0, 255) + rng.uniform(-1, 1) * x + rng.uniform(-1, 1) * y
    elif kind == 2:
        pixels = rng.normal(rng.uniform(30, 220), rng.uniform(5, 80), (h, w))
        if rng.random() < 0.5:
            pixels = np.asarray(
                Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).filter(
                    ImageFilter.GaussianBlur(rng.uniform(1, 8))
                ),
                np.float64,
            )
    else:
        image = Image.new("L", (w, h), int(rng.integers(0, 256)))
        draw = ImageDraw.Draw(image)
        for _ in range(int(rng.integers(1, 12))):
            box = sorted(rng.integers(0, w, 2)), sorted(rng.integers(0, h, 2))
            shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
            shape((box[0][0], box[1][0], box[0][1], box[1][1]), fill=int(rng.integers(0, 256)))
        for _ in range(int(rng.integers(0, 8)) if kind == 4 else 0):
            _text(draw, image.size, rng)
        pixels = np.asarray(image, np.float64)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), mode="L")
    return thumbnail(image, size)[0]
