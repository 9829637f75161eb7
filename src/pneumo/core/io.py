"""Decode and validate image files and uploads (JPEG, PNG, DICOM, ...) into one 8-bit grayscale image.

Everything that reaches the model goes through :func:`read_image`, so the library, the CLI,
the app and the API refuse the same inputs with the same error codes. The output is always a
Pillow image in mode ``"L"``: the training data are 8-bit grayscale JPEGs, so every other
input (16-bit PNG, DICOM with any bit depth, RGB, palette, alpha) is mapped onto that range
here, once, and :mod:`pneumo.core.preprocess` never has to care where an image came from.
"""

from __future__ import annotations

import io
import logging
import os
import stat
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, UnidentifiedImageError

from pneumo.core.decode_budget import (
    BAND_PIXELS,
    image_bands,
    value_range,
    window_to_gray8,
)
from pneumo.core.errors import DicomError, InputTooLargeError, InvalidImageError, PneumoError, UnsupportedFormatError

log = logging.getLogger(__name__)

#: File name extensions of the images pneumo looks for in folders (content is still checked by magic bytes).
IMAGE_EXTENSIONS = frozenset({".jpeg", ".jpg", ".png", ".dcm"})


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


def sniff_format(data: bytes) -> str | None:
    """Name the format from the file's first bytes (never from its extension), or ``None``."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if len(data) >= 132 and data[128:132] == b"DICM":
        return "dicom"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    if data[:2] == b"BM":
        return "bmp"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


def read_bytes(source: str | Path | bytes, limits: Limits = DEFAULT_LIMITS) -> bytes:
    """Return the raw bytes of ``source``, refusing oversized files before reading them."""
    if isinstance(source, bytes | bytearray | memoryview):
        data = bytes(source)
    else:
        path = Path(source)
        _check_regular_file(path)
        try:
            size = path.stat().st_size
            if size > limits.max_bytes:
                raise InputTooLargeError(
                    f"{path.name} is {size / 2**20:.1f} MB, over the {limits.max_bytes / 2**20:.0f} MB limit.",
                    code="file_too_large",
                )
            with path.open("rb") as handle:  # read at most one byte past the limit, whatever stat said
                data = handle.read(limits.max_bytes + 1)
        except OSError as err:  # permission denied, removed meanwhile, I/O error
            raise InvalidImageError(
                f"{path} cannot be read ({err.strerror or err}); check that it exists and is readable.",
                code="unreadable_file",
            ) from err
    if len(data) > limits.max_bytes:
        raise InputTooLargeError(
            f"The upload is {len(data) / 2**20:.1f} MB, over the {limits.max_bytes / 2**20:.0f} MB limit.",
            code="file_too_large",
        )
    if not data:
        raise InvalidImageError("The file is empty (0 bytes).", code="empty_file")
    return data


def _check_regular_file(path: Path) -> None:
    """Refuse, with a row-worthy error, anything at ``path`` that is not a readable regular file.

    Never opens the path: a FIFO would block the batch forever and a device could stream
    without end. ``Path.is_file()`` raises on a name too long, so ``os.stat`` is asked directly.
    """
    try:
        info = path.stat()
    except FileNotFoundError as err:
        broken = path.is_symlink()
        raise InvalidImageError(
            f"{path} {'is a broken symbolic link (its target does not exist)' if broken else 'does not exist'}; "
            "pass the path of an image.",
            code="file_not_found",
        ) from err
    except OSError as err:  # name too long, permission denied on a parent folder, symlink loop
        raise InvalidImageError(
            f"{path} cannot be read ({err.strerror or err}); check the name and the permissions.",
            code="unreadable_file",
        ) from err
    if stat.S_ISREG(info.st_mode):
        return
    if stat.S_ISDIR(info.st_mode):
        if not os.access(path, os.R_OK | os.X_OK):
            raise InvalidImageError(
                f"{path} is a folder whose contents cannot be listed (permission denied); nothing in it was read.",
                code="unreadable_file",
            )
        raise InvalidImageError(f"{path} is a folder, not a file; pass the path of an image.", code="file_not_found")
    kind = "named pipe (FIFO)" if stat.S_ISFIFO(info.st_mode) else "socket" if stat.S_ISSOCK(info.st_mode) else "device"
    raise InvalidImageError(
        f"{path} is a {kind}, not a regular file; it was not opened. Pass the path of an image file.",
        code="unreadable_file",
    )


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
        from pneumo.core.dicom_image import read_dicom  # imported here: it imports this module (and pydicom)

        try:
            return read_dicom(data, limits)
        except (PneumoError, MemoryError):
            raise
        except Exception as err:  # safety net: a malformed header field that pydicom chokes on (found by fuzzing)
            raise DicomError(
                f"The DICOM file is malformed ({describe_error(err)}); export it again from the PACS.",
                code="corrupt_image",
            ) from err
    return _read_pillow(data, fmt, limits, draft_size)


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


#: Pillow's name of each sniffed format: ``Image.open`` is told which one to use, so bytes that
#: start like a PNG are never handed to another decoder.
_PILLOW_FORMATS = {"jpeg": "JPEG", "png": "PNG", "tiff": "TIFF", "bmp": "BMP", "webp": "WEBP"}


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


def _bomb(limits: Limits) -> InputTooLargeError:
    return InputTooLargeError(
        f"The image header declares more pixels than Pillow's decompression-bomb limit, far over the "
        f"{limits.max_pixels / 1e6:.0f} MP limit; no chest radiograph is that large.",
        code="too_many_pixels",
    )


def _read_pillow(data: bytes, fmt: str, limits: Limits, draft_size: int | None) -> DecodedImage:
    name = fmt.upper()
    try:
        with warnings.catch_warnings():
            # Pillow warns (and past 2x errors) on huge images; both mean "too large" here.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image: Image.Image = Image.open(io.BytesIO(data), formats=[_PILLOW_FORMATS[fmt]])
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as err:
        raise _bomb(limits) from err
    except MemoryError:  # never disguise running out of memory as a bad file
        raise
    except Exception as err:  # untrusted bytes: Pillow's parsers raise many types on malformed headers
        raise InvalidImageError(
            f"The file starts like a {name} but cannot be read ({describe_error(err)}); it is damaged or not an image.",
            code="corrupt_image",
        ) from err

    original_size = image.size
    check_shape(*original_size, limits)
    # A camera JPEG is often MPO (the photo plus preview frames): its first frame is the picture.
    # Other multi-frame files (APNG, multi-page TIFF, animated WebP) hold several images: refuse.
    try:  # counting frames parses every frame header (TIFF IFDs): damaged ones fail here
        frames = 1 if image.format == "MPO" else int(getattr(image, "n_frames", 1))
    except MemoryError:
        raise
    except Exception as err:
        raise InvalidImageError(
            f"The {name} file's frames cannot be read ({describe_error(err)}); it is damaged.", code="corrupt_image"
        ) from err
    if frames > 1:
        raise InvalidImageError(f"The file holds {frames} frames; upload one radiograph per file.", code="multi_frame")
    try:
        if fmt == "jpeg" and draft_size is not None:
            image.draft("L", (draft_size, draft_size))
        image.load()
        orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
        gray = _to_gray8(image)
        del image  # the full-depth pixels (up to 144 MB for a float TIFF) are no longer needed
        # Rotated upright after the 8-bit conversion (a quarter of the memory of a float image);
        # ImageOps.exif_transpose would do it but reads the tag from the image it rotates.
        if orientation in _ORIENTATION:
            gray = gray.transpose(_ORIENTATION[orientation])
    except Image.DecompressionBombError as err:
        raise _bomb(limits) from err
    except MemoryError:
        raise
    except Exception as err:  # truncated or corrupt pixel data: any decoder failure means the same to the user
        code = "truncated_image" if "truncated" in str(err).lower() else "corrupt_image"
        raise InvalidImageError(
            f"The {name} file cannot be decoded ({describe_error(err)}); it is truncated or damaged. Export it again.",
            code=code,
        ) from err
    return DecodedImage(gray, fmt, original_size)


#: EXIF orientation -> the transpose that sets the picture upright (the table of ImageOps.exif_transpose).
_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _to_gray8(image: Image.Image) -> Image.Image:
    """Map any Pillow mode onto 8-bit grayscale, keeping the full dynamic range of deep images."""
    if image.mode == "L":
        return image
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        # 16-bit PNG/TIFF (often 10-14 significant bits) and 32-bit int/float: window the stored
        # range onto 0-255, as the DICOM path does without a VOI LUT. Scaling by 65535 instead
        # would turn a 12-bit radiograph nearly black; the dataset's originals span 0-255.
        # Done in bands of rows: a whole 36 MP image as float64 is 288 MB per copy (decode_budget).
        bands = image_bands(image)
        with np.errstate(invalid="ignore", over="ignore"):  # NaN/inf in a float TIFF are zeroed right here
            lo, hi = value_range(bands, _finite)
            lo, hi = min(lo, 0.0), max(hi, 0.0)
            gray = window_to_gray8(bands, (image.height, image.width), _finite, lo, hi)
        return Image.fromarray(gray, mode="L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Transparent areas become black, the background of a radiograph. Band by band: RGBA
        # composites hold 4 bytes a pixel, three copies of a 36 MP image would be 430 MB.
        out = Image.new("L", image.size)
        step = max(1, BAND_PIXELS // image.width)
        for top in range(0, image.height, step):
            rgba = image.crop((0, top, image.width, min(image.height, top + step))).convert("RGBA")
            background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
            out.paste(Image.alpha_composite(background, rgba).convert("L"), (0, top))
        return out
    return image.convert("L")


def _finite(values: np.ndarray) -> np.ndarray:
    return np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
