"""Raster files (JPEG, PNG, TIFF) into one 8-bit grayscale image.

The raster branch of the decoding line (:mod:`pneumo.core.decode`). The output is always a Pillow
image in mode ``"L"``: the training data are 8-bit grayscale JPEGs, so every other input (16-bit
PNG, RGB, palette, alpha) is mapped onto that range here, within the memory budget of
:mod:`pneumo.core.decode.budget`.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import ExifTags, Image

from pneumo.core.decode.budget import BAND_PIXELS, image_bands, value_range, window_to_gray8
from pneumo.core.decode.codestreams import check_jpeg_scans, check_png_chunks, tiff_has_more_pages
from pneumo.core.decode.common import DecodedImage, Limits, check_shape, describe_error
from pneumo.core.errors import InputTooLargeError, InvalidImageError, UnsupportedFormatError

#: Pillow's name of each raster format pneumo reads: ``Image.open`` is told which one to use, so
#: bytes that start like a PNG are never handed to another decoder.
_PILLOW_FORMATS = {"jpeg": "JPEG", "png": "PNG", "tiff": "TIFF"}

#: TIFF compressions (Pillow's names) read: the lossless ones film digitizers and research exports
#: write. Others (JPEG-in-TIFF, CCITT fax, ...) bring codecs with no use for a radiograph.
_TIFF_COMPRESSIONS = frozenset({"raw", "tiff_lzw", "tiff_adobe_deflate", "tiff_deflate", "packbits"})


def _check_structure(data: bytes, fmt: str, limits: Limits) -> None:
    """The work a file asks for, bounded from its structure before Pillow parses it (see codestreams.py)."""
    if fmt == "jpeg":
        check_jpeg_scans(data, limits)
    elif fmt == "png":
        check_png_chunks(data, limits)
    elif fmt == "tiff" and tiff_has_more_pages(data):
        raise InvalidImageError(
            "The TIFF file holds several pages; upload one radiograph per file.", code="multi_frame"
        )


def _bomb(limits: Limits) -> InputTooLargeError:
    return InputTooLargeError(
        f"The image header declares more pixels than Pillow's decompression-bomb limit, far over the "
        f"{limits.max_pixels / 1e6:.0f} MP limit; no chest radiograph is that large.",
        code="too_many_pixels",
    )


def read_raster(data: bytes, fmt: str, limits: Limits, draft_size: int | None) -> DecodedImage:
    name = fmt.upper()
    _check_structure(data, fmt, limits)
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
    if fmt == "tiff" and image.info.get("compression", "raw") not in _TIFF_COMPRESSIONS:
        raise UnsupportedFormatError(
            f"The TIFF file is compressed with {image.info.get('compression')}; pneumo reads uncompressed, LZW, "
            "Deflate and PackBits TIFFs. Export the radiograph as PNG or DICOM.",
        )
    # A camera JPEG is often MPO (the photo plus preview frames): its first frame is the picture.
    # Other multi-frame files (APNG) hold several images: refuse. TIFF pages were checked above,
    # from the first page's link: Pillow's n_frames walks every page (100k pages: 52 s).
    try:
        frames = 1 if image.format == "MPO" or fmt == "tiff" else int(getattr(image, "n_frames", 1))
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
        # Done in bands of rows: a whole 36 MP image as float64 is 288 MB per copy (budget.py).
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
