"""Decode within a memory budget: what :mod:`pneumo.core.io` checks and how it converts before memory is spent.

The budget (stated in ``docs/reliability.md``): for any input under :class:`pneumo.core.io.Limits`,
decoding needs at most ~300 MB of memory beyond the upload itself. Three things used to break it:

* a Deflated-transfer-syntax DICOM is one zlib stream that pydicom inflates whole
  (``zlib.decompress``), so 1.5 MB on disk could become gigabytes; :func:`inflate_capped`
  inflates at most :func:`inflate_cap` bytes and refuses beyond;
* an encapsulated (JPEG, JPEG-LS, JPEG 2000) frame is decoded at the size its *own* header
  declares, whatever the DICOM Rows/Columns say; :func:`check_frame_header` reads that header
  (pydicom's and Pillow's header parsers, no pixel decoded) and refuses a mismatch first;
* windowing 16-bit, 32-bit and float pixels onto 0-255 made several full-size float64 copies
  (8 bytes a pixel, 288 MB each at 36 MP); :func:`window_to_gray8` does the same arithmetic on
  bands of rows, so only one band (:data:`BAND_PIXELS`) is ever held as float64.

Numpy and Pillow offer no banded windowing, and zlib's ``max_length`` is the cap itself; the
code here only strings them together.
"""

from __future__ import annotations

import io
import zlib
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO, cast

import numpy as np
from PIL import Image

from pneumo.core.errors import DicomError, InputTooLargeError

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


# ------------------------------------------------------------------------------------------ DICOM


def dicom_to_gray8(pixels: np.ndarray, ds: Any, *, invert: bool) -> np.ndarray:
    """A viewer's display of stored DICOM values as uint8, band by band (see ``pneumo.core.dicom_image.read_dicom``).

    Modality LUT, then the VOI LUT or window, then that VOI's output range onto 0-255 (the
    image's own range without a VOI); ``invert`` mirrors MONOCHROME1 before scaling, so a
    MONOCHROME2 twin rounds identically. Every step is elementwise: bands give the same bytes.
    """
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    bands = array_bands(pixels)

    def to_values(band: np.ndarray) -> np.ndarray:
        return np.asarray(apply_modality_lut(band, ds))

    def to_display(band: np.ndarray) -> np.ndarray:
        return np.asarray(apply_voi_lut(to_values(band), ds))

    has_voi = any(key in ds for key in ("VOILUTSequence", "WindowCenter", "WindowWidth"))
    transform: Transform = to_display if has_voi else to_values
    lo, hi = value_range(bands, transform)
    if has_voi:
        try:  # the VOI output range is what its extreme inputs map to (a window's full [y_min, y_max])
            extremes = apply_voi_lut(np.array([-(2.0**40), 2.0**40]), ds)
            lo, hi = float(min(extremes.min(), lo)), float(max(extremes.max(), hi))
        except Exception:  # an unusual LUT that cannot take the probe: the image's own range
            pass
    if not invert:
        return window_to_gray8(bands, pixels.shape[:2], transform, lo, hi, clip=True)
    shown = transform
    return window_to_gray8(
        bands, pixels.shape[:2], lambda band: (lo + hi) - np.asarray(shown(band), dtype=np.float64), lo, hi, clip=True
    )


def inflate_cap(max_pixels: int) -> int:
    """Most bytes a Deflated DICOM dataset may inflate to: the largest allowed 16-bit image plus 4 MB of header."""
    return 2 * max_pixels + 4 * 2**20


def inflate_capped(data: bytes, max_pixels: int) -> Any:
    """Parse a Deflated-Explicit-VR DICOM, inflating at most :func:`inflate_cap` bytes (pydicom inflates all).

    Returns the pydicom dataset with its file meta, its transfer syntax rewritten to the
    Explicit VR Little Endian the deflated stream holds.

    Raises:
        InputTooLargeError: ``inflated_too_large`` when the stream inflates past the cap.
        DicomError: ``corrupt_image`` when the stream is not valid deflate data.
    """
    from pydicom.filebase import DicomBytesIO
    from pydicom.filereader import _read_file_meta_info, read_dataset, read_preamble
    from pydicom.uid import ExplicitVRLittleEndian

    stream = io.BytesIO(data)
    read_preamble(stream, False)
    meta = _read_file_meta_info(stream)
    cap = inflate_cap(max_pixels)
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        inflated = inflater.decompress(memoryview(data)[stream.tell() :], cap + 1)
    except zlib.error as err:
        raise DicomError(
            "The DICOM file is Deflate-compressed but its data cannot be inflated; it is damaged.",
            code="corrupt_image",
        ) from err
    if len(inflated) > cap or inflater.unconsumed_tail:
        raise InputTooLargeError(
            f"The DICOM file is Deflate-compressed and inflates to more than {cap / 2**20:.0f} MB, more than the "
            f"largest allowed radiograph ({max_pixels / 1e6:.0f} MP at 16 bits) needs; it was refused unread.",
            code="inflated_too_large",
        )
    ds = read_dataset(cast(BinaryIO, DicomBytesIO(inflated)), False, True)
    del inflated
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    ds.set_original_encoding(False, True, ds._character_set)
    return ds


def check_frame_header(ds: Any, rows: int, cols: int) -> None:
    """Refuse an encapsulated frame whose own header disagrees with Rows/Columns/BitsAllocated.

    The decoder allocates what the codestream declares, so a 100 KB JPEG declaring 13000 x 13000
    inside a 1000 x 800 DICOM would cost 1.6 GB before the shape check after decoding.
    RLE has no size in its header (pydicom decodes it to Rows x Columns) and is not checked here.
    """
    from pydicom.encaps import generate_fragmented_frames

    syntax = ds.file_meta.TransferSyntaxUID
    if not (syntax.is_compressed and syntax.is_encapsulated) or "RLE" in syntax.name:
        return
    first_frame = next(iter(generate_fragmented_frames(ds.PixelData, number_of_frames=1)), (b"",))
    fragment = first_frame[0] if first_frame else b""  # the frame's header is in its first fragment
    size, bits, samples = _codestream_header(bytes(fragment[:65536]))
    allocated = int(ds.get("BitsAllocated", 16) or 16)
    if size is None:
        raise DicomError(
            f"The DICOM's compressed frame ({syntax.name}) has no readable image header; the file is damaged.",
            code="corrupt_image",
        )
    if size != (cols, rows) or (bits is not None and bits > allocated) or samples not in (None, 1):
        raise DicomError(
            f"The DICOM header declares a {cols} x {rows} image of {allocated}-bit pixels, but its compressed frame "
            f"declares {size[0]} x {size[1]} with {bits or '?'} bits and {samples or '?'} channels; the file is "
            "inconsistent and was refused before decoding. Export it again from the PACS.",
            code="corrupt_image",
        )


def _codestream_header(head: bytes) -> tuple[tuple[int, int] | None, int | None, int | None]:
    """``((width, height), bits, samples)`` from a JPEG / JPEG-LS / JPEG 2000 header, without decoding."""
    if head[:2] == b"\xff\xd8":  # JPEG or JPEG-LS: pydicom's SOF parser (it knows SOF55, Pillow does not)
        from pydicom.pixels.utils import _get_jpg_parameters

        info = _get_jpg_parameters(head)
        if "width" not in info:
            return None, None, None
        return (int(info["width"]), int(info["height"])), int(info["precision"]), int(info["components"])
    try:  # JPEG 2000 codestream or JP2: Pillow reads the SIZ / ihdr box on open, decoding nothing
        with Image.open(io.BytesIO(head), formats=["JPEG2000"]) as image:
            return image.size, None, len(image.getbands())
    except Exception:  # untrusted header bytes: any parser failure means "no readable header"
        return None, None, None
