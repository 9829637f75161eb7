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
    """What an input may be, and may cost to decode, before it is refused: the one place limits live.

    Sizes are set in pixels, not bytes: the pixel cap (36 MP, e.g. 6000 x 6000) is above any real
    chest radiograph (a DR detector writes at most ~4300 x 4300 at 16 bits, 37 MB uncompressed)
    and far below Pillow's own decompression-bomb limit, and it is checked from the header before
    a single pixel is decoded. The byte cap only bounds what is read: 64 MB holds the largest
    uncompressed 16-bit film with room for its header. The structural caps bound the work a small
    file can ask for (each is far above what any real film holds; see docs/reliability.md):

    Attributes:
        max_bytes: largest file or upload read.
        max_pixels: largest image, from its header.
        min_side: smallest side an X-ray may have.
        max_aspect_ratio: longest side over shortest side.
        max_scans: JPEG scans (SOS markers) in one image or DICOM frame; each progressive scan
            walks every block again, so 5,000 scans of 110 bytes cost minutes. libjpeg writes 6-10.
        max_elements: DICOM data elements and sequence items (a real header has a few hundred),
            or PNG chunks (a real file has a few thousand at most): each costs parser time and memory.
        max_codeblocks: JPEG 2000 code-blocks over all tiles and resolutions, from the header;
            OpenJPEG allocates a structure per code-block (4 x 4 blocks: ~1 GB for a 4300 x 4300 film).
        max_tiles: JPEG 2000 tiles (and tile-parts); each costs the decoder its coding parameters.
        decode_cpu_seconds: CPU time one decode may take in an isolated worker before it is
            killed (:mod:`pneumo.core.decode.isolate`); a real film takes well under a second.
        decode_wall_seconds: wall time before the worker is killed whatever its CPU time, so a
            starved or stuck decoder cannot hold a request for ever.
    """

    max_bytes: int = 64 * 1024 * 1024
    max_pixels: int = 36_000_000
    min_side: int = 64
    max_aspect_ratio: float = 4.0
    max_scans: int = 32
    max_elements: int = 50_000
    max_codeblocks: int = 150_000
    max_tiles: int = 4096
    decode_cpu_seconds: float = 2.0
    decode_wall_seconds: float = 30.0


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
