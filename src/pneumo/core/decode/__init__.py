"""Decode and validate image files and uploads (JPEG, PNG, DICOM, ...) into one 8-bit grayscale image.

Everything that reaches the model goes through :func:`read_image`, so the library, the CLI, the
app and the API refuse the same inputs with the same error codes. Decoding is one straight line:

1. :mod:`~pneumo.core.decode.source`: read the bytes within the size limit and name the format
   from its magic bytes (never from the extension);
2. :mod:`~pneumo.core.decode.raster` (Pillow formats) or :mod:`~pneumo.core.decode.dicom`
   (pydicom, with DICOM's LUTs and windowing), each checking the shape from the header before
   decoding;
3. both convert deep pixels within the memory budget of :mod:`~pneumo.core.decode.budget`.

Before a decoder runs, the work the file asks for is bounded from its structure
(:mod:`~pneumo.core.decode.codestreams`: JPEG scans, PNG chunks, TIFF pages, JPEG 2000 tiles and
code-blocks; DICOM elements in :mod:`~pneumo.core.decode.dicom_header`). With a ``pool``
(:mod:`~pneumo.core.decode.isolate`), DICOM and TIFF decode in a worker process that is killed
at the CPU deadline of :class:`Limits`.

The output is always a Pillow image in mode ``"L"`` (:class:`DecodedImage`):
:mod:`pneumo.core.preprocess` never has to care where an image came from.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from pneumo.core.decode.common import DEFAULT_LIMITS, DecodedImage, Limits, check_shape, describe_error
from pneumo.core.decode.raster import read_raster
from pneumo.core.decode.source import ACCEPTED_FORMATS, IMAGE_EXTENSIONS, read_bytes, sniff_format
from pneumo.core.errors import DicomError, PneumoError, UnsupportedFormatError

if TYPE_CHECKING:
    from pneumo.core.decode.isolate import DecodePool

__all__ = [
    "ACCEPTED_FORMATS",
    "DEFAULT_LIMITS",
    "IMAGE_EXTENSIONS",
    "DecodedImage",
    "Limits",
    "check_shape",
    "decode_bytes",
    "describe_error",
    "read_bytes",
    "read_image",
    "sniff_format",
]


#: What a refused format is called in its message.
_FORMAT_NAMES = {"bmp": "BMP", "webp": "WebP", "gif": "GIF"}


def read_image(
    source: str | Path | bytes,
    limits: Limits = DEFAULT_LIMITS,
    *,
    draft_size: int | None = None,
    pool: DecodePool | None = None,
) -> DecodedImage:
    """Decode ``source`` (a path or the bytes of an upload) into a validated 8-bit grayscale image.

    Args:
        source: path of the file, or its bytes.
        limits: size, shape and work limits; inputs outside them raise :class:`InputTooLargeError`
            or :class:`InvalidImageError`.
        draft_size: when set, JPEGs are decoded at the smallest DCT scale that still gives at
            least ``draft_size`` pixels on each side (Pillow's draft mode): 4-8x less work on a
            full-resolution X-ray that is about to be shrunk to the model's input size anyway.
            A JPEG 2000 DICOM frame is decoded at the matching reduced resolution level.
        pool: decode the formats it isolates (DICOM, TIFF) in one of its worker processes, killed
            at ``limits.decode_cpu_seconds`` (:class:`~pneumo.core.decode.isolate.DecodePool`).

    Raises:
        InvalidImageError: or one of its subclasses, with a stable ``code``.
    """
    data = read_bytes(source, limits)
    fmt = sniff_format(data)
    if fmt is None:
        raise UnsupportedFormatError(
            "The file is not a JPEG, PNG, TIFF or DICOM image (its first bytes match no known image format).",
        )
    if fmt not in ACCEPTED_FORMATS:
        raise UnsupportedFormatError(
            f"The file is a {_FORMAT_NAMES.get(fmt, fmt)} image; pneumo reads JPEG, PNG, TIFF and DICOM, the formats "
            "radiographs are stored and exported in. Export the X-ray as PNG, JPEG or DICOM.",
        )
    if pool is not None and pool.isolates(fmt):
        return pool.decode(data, limits, draft_size)
    return decode_bytes(data, fmt, limits, draft_size)


def decode_bytes(data: bytes, fmt: str, limits: Limits, draft_size: int | None) -> DecodedImage:
    """Decode bytes already read and named by :func:`sniff_format`, in this process."""
    if fmt == "dicom":
        from pneumo.core.decode.dicom import read_dicom  # imported here: pydicom stays off the JPEG path

        try:
            return read_dicom(data, limits, draft_size)
        except (PneumoError, MemoryError):
            raise
        except Exception as err:  # safety net: a malformed header field that pydicom chokes on (found by fuzzing)
            raise DicomError(
                f"The DICOM file is malformed ({describe_error(err)}); export it again from the PACS.",
                code="corrupt_image",
            ) from err
    return read_raster(data, fmt, limits, draft_size)
