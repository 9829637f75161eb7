"""Decode and validate image files and uploads (JPEG, PNG, DICOM, ...) into one 8-bit grayscale image.

Everything that reaches the model goes through :func:`read_image`, so the library, the CLI, the
app and the API refuse the same inputs with the same error codes. Decoding is one straight line:

1. :mod:`~pneumo.core.decode.source`: read the bytes within the size limit and name the format
   from its magic bytes (never from the extension);
2. :mod:`~pneumo.core.decode.raster` (Pillow formats) or :mod:`~pneumo.core.decode.dicom`
   (pydicom, with DICOM's LUTs and windowing), each checking the shape from the header before
   decoding;
3. both convert deep pixels within the memory budget of :mod:`~pneumo.core.decode.budget`.

The output is always a Pillow image in mode ``"L"`` (:class:`DecodedImage`):
:mod:`pneumo.core.preprocess` never has to care where an image came from.
"""

from __future__ import annotations

from pathlib import Path

from pneumo.core.decode.common import DEFAULT_LIMITS, DecodedImage, Limits, check_shape, describe_error
from pneumo.core.decode.raster import read_raster
from pneumo.core.decode.source import IMAGE_EXTENSIONS, read_bytes, sniff_format
from pneumo.core.errors import DicomError, PneumoError, UnsupportedFormatError

__all__ = [
    "DEFAULT_LIMITS",
    "IMAGE_EXTENSIONS",
    "DecodedImage",
    "Limits",
    "check_shape",
    "describe_error",
    "read_bytes",
    "read_image",
    "sniff_format",
]


def read_image(
    source: str | Path | bytes, limits: Limits = DEFAULT_LIMITS, *, draft_size: int | None = None
) -> DecodedImage:
    """Decode ``source`` (a path or the bytes of an upload) into a validated 8-bit grayscale image.

    Args:
        source: path of the file, or its bytes.
        limits: size and shape limits; inputs outside them raise :class:`InputTooLargeError`
            or :class:`InvalidImageError`.
        draft_size: when set, JPEGs are decoded at the smallest DCT scale that still gives at
            least ``draft_size`` pixels on each side (Pillow's draft mode): 4-8x less work on a
            full-resolution X-ray that is about to be shrunk to the model's input size anyway.

    Raises:
        InvalidImageError: or one of its subclasses, with a stable ``code``.
    """
    data = read_bytes(source, limits)
    fmt = sniff_format(data)
    if fmt is None:
        raise UnsupportedFormatError(
            "The file is not a JPEG, PNG or DICOM image (its first bytes match no known image format).",
        )
    if fmt == "dicom":
        from pneumo.core.decode.dicom import read_dicom  # imported here: pydicom stays off the JPEG path

        try:
            return read_dicom(data, limits)
        except (PneumoError, MemoryError):
            raise
        except Exception as err:  # safety net: a malformed header field that pydicom chokes on (found by fuzzing)
            raise DicomError(
                f"The DICOM file is malformed ({describe_error(err)}); export it again from the PACS.",
                code="corrupt_image",
            ) from err
    return read_raster(data, fmt, limits, draft_size)
