"""Convert deep pixels within a memory budget: banded windowing onto 0-255.

The budget (stated in ``docs/reliability.md``): for any input under
:class:`pneumo.core.decode.Limits`, decoding needs at most ~300 MB of memory beyond the upload
itself. Windowing 16-bit, 32-bit and float pixels onto 0-255 made several full-size float64
copies (8 bytes a pixel, 288 MB each at 36 MP); :func:`window_to_gray8` does the same arithmetic
on bands of rows, so only one band (:data:`BAND_PIXELS`) is ever held as float64. The raster and
DICOM decoders both use it; the DICOM-only bounds (capped inflation, frame headers) live in
:mod:`pneumo.core.decode.dicom`.

Numpy and Pillow offer no banded windowing; the code here only strings them together.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
from PIL import Image

#: Pixels converted at once (one float64 band is 8 MB; a handful of temporaries stay under 50 MB).
BAND_PIXELS = 1 << 20

#: Band iterator: yields ``(first_row, rows)`` with ``rows`` a 2-D array of a few rows.
Bands = Callable[[], Iterator[tuple[int, np.ndarray]]]
Transform = Callable[[np.ndarray], np.ndarray]


def _band_rows(width: int) -> int:
    return max(1, BAND_PIXELS // max(1, width))


def array_bands(array: np.ndarray) -> Bands:
    """Row bands of a 2-D array (views, no copy)."""
    step = _band_rows(array.shape[1])
    return lambda: ((start, array[start : start + step]) for start in range(0, array.shape[0], step))


def image_bands(image: Image.Image) -> Bands:
    """Row bands of a Pillow image as numpy arrays (``np.asarray(image)`` would copy the whole image)."""
    width, height = image.size
    step = _band_rows(width)
    return lambda: (
        (top, np.asarray(image.crop((0, top, width, min(height, top + step))))) for top in range(0, height, step)
    )


def value_range(bands: Bands, transform: Transform) -> tuple[float, float]:
    """Min and max of ``transform`` over every band (``(inf, -inf)`` for an empty image)."""
    lo, hi = float("inf"), float("-inf")
    for _, band in bands():
        values = transform(band)
        if values.size:
            lo, hi = min(lo, float(values.min())), max(hi, float(values.max()))
    return lo, hi


def window_to_gray8(
    bands: Bands, shape: tuple[int, int], transform: Transform, lo: float, hi: float, *, clip: bool = False
) -> np.ndarray:
    """``round(255 * (transform(x) - lo) / (hi - lo))`` as uint8, band by band; zeros when the range is empty.

    Elementwise the same arithmetic as on the whole array, so the result is bit-identical.
    """
    out = np.zeros(shape, dtype=np.uint8)
    if not (np.isfinite(hi - lo) and hi > lo):
        return out
    for start, band in bands():
        scaled = (np.asarray(transform(band), dtype=np.float64) - lo) / (hi - lo)
        if clip:
            np.clip(scaled, 0.0, 1.0, out=scaled)
        out[start : start + band.shape[0]] = np.round(scaled * 255.0)
    return out
