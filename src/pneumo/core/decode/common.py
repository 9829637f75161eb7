"""What every decoder shares: the input limits, the decoded image, the shape check and user-facing failure text.

The bottom of the decoding line (:mod:`pneumo.core.decode`): the raster and DICOM decoders both
import it, it imports neither.
"""

from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass, field

from PIL import Image, UnidentifiedImageError

from pneumo.core.errors import InputTooLargeError, InvalidImageError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Limits:
    """What an input may be before it is refused.

    The pixel cap (36 MP, e.g. 6000 x 6000) is far below Pillow's own decompression-bomb limit
    (89 MP warning, 179 MP error) but above any real chest radiograph (at most ~4300 x 4300),
    and it is checked from the header, before a single pixel is decoded, so memory stays flat.
    """

    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 36_000_000
    min_side: int = 64
    max_aspect_ratio: float = 4.0


DEFAULT_LIMITS = Limits()


@dataclass
class DecodedImage:
    """An input decoded to 8-bit grayscale, with what is known about where it came from."""

    image: Image.Image
    format: str
    original_size: tuple[int, int]
    metadata: dict[str, str] = field(default_factory=dict)


def check_shape(width: int, height: int, limits: Limits) -> None:
    if width * height > limits.max_pixels:
        raise InputTooLargeError(
            f"The image is {width} x {height} = {width * height / 1e6:.0f} megapixels, over the "
            f"{limits.max_pixels / 1e6:.0f} MP limit; no chest radiograph is that large.",
            code="too_many_pixels",
        )
    if min(width, height) < limits.min_side:
        raise InvalidImageError(
            f"The image is {width} x {height} pixels; an X-ray needs at least {limits.min_side} on each side.",
            code="image_too_small",
        )
    if max(width, height) / min(width, height) > limits.max_aspect_ratio:
        raise InvalidImageError(
            f"The image is {width} x {height} pixels, an aspect ratio over {limits.max_aspect_ratio:g}:1; "
            "a chest X-ray is roughly square.",
            code="bad_aspect_ratio",
        )


def describe_error(err: BaseException) -> str:
    """What went wrong, in words a user can act on; the decoder's own text goes to the log only.

    Library messages name Python types and indexes (``<class 'str'>``, ``index 2512 is out of
    bounds``), which say nothing to a radiographer, so they are never shown (issue 12, F9).
    """
    log.info("Decoder failure: %s: %s", type(err).__name__, err)
    text = str(err).lower()
    if isinstance(err, UnidentifiedImageError):
        return "the header is not valid"
    if "truncated" in text or isinstance(err, EOFError) or "end of file" in text or "ended prematurely" in text:
        return "the data ends before the image does"
    if isinstance(err, zlib.error) or "decompress" in text or "crc" in text:
        return "its compressed data is damaged"
    return "its structure does not match what its header declares"
