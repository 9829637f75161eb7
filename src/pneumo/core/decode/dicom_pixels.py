"""DICOM pixel data into a numpy array within bounds: which transfer syntaxes, which codec, checked how.

The codecs (issue 21): pydicom decodes native and RLE data; pylibjpeg's plugins decode JPEG
(libjpeg: baseline, 12-bit extended, lossless, JPEG-LS) and JPEG 2000 (OpenJPEG); Pillow decodes
8-bit JPEG and reduced-resolution JPEG 2000. Every transfer syntax outside :data:`SUPPORTED` is
refused as ``unsupported_transfer_syntax``. Before a codec runs, the frame is checked (issue 22):

* the frame's own header (JPEG SOF, JPEG-LS SOF55, JPEG 2000 SIZ) must agree with Rows, Columns,
  BitsAllocated and SamplesPerPixel, because the codec allocates what the frame declares;
* a JPEG-family frame may hold at most ``Limits.max_scans`` scans, a JPEG 2000 frame at most
  ``Limits.max_tiles`` tiles and ``Limits.max_codeblocks`` code-blocks
  (:mod:`pneumo.core.decode.codestreams`); the encapsulated fragments count as elements;
* RLE is decoded by pylibjpeg-rle, which writes at most Rows x Columns per segment: pydicom's own
  RLE decoder expands a segment whole (64x its size, 1.3 GB for a 20 MB file) before trimming it;
* a JPEG 2000 frame is decoded at a reduced resolution level when the caller asks for a draft
  (the model sees 224 pixels; a 4300-pixel film is decoded at 269, 1/256 of the work and memory).
"""

from __future__ import annotations

import io
import itertools
import math
from typing import Any

import numpy as np
from PIL import Image

from pneumo.core.decode.codestreams import check_j2k, check_jpeg_scans, j2k_sample_format
from pneumo.core.decode.common import Limits, describe_error
from pneumo.core.errors import DicomError, InputTooLargeError

_NATIVE = (
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian (retired, still written by old modalities)
)
_JPEG = (
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline (Process 1)
    "1.2.840.10008.1.2.4.51",  # JPEG Extended (Process 2 and 4): 12-bit
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless (Process 14)
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless, First-Order Prediction (Process 14, SV1)
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-Lossless
)
_J2K = (
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.4.201",  # High-Throughput JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.202",  # High-Throughput JPEG 2000 with RPCL Options Lossless
    "1.2.840.10008.1.2.4.203",  # High-Throughput JPEG 2000
)
_RLE = "1.2.840.10008.1.2.5"

#: The transfer syntaxes pneumo reads (docs/dicom.md lists them with their codecs).
SUPPORTED = frozenset((*_NATIVE, *_JPEG, *_J2K, _RLE))


def _corrupt(message: str) -> DicomError:
    return DicomError(message, code="corrupt_image")


def check_syntax(syntax: Any) -> None:
    """Refuse a transfer syntax pneumo does not read, or whose codec is not installed, naming both."""
    from pydicom.pixels import get_decoder
    from pydicom.uid import UID

    if str(syntax) not in SUPPORTED and not UID(str(syntax)).is_valid:
        raise _corrupt(f"The DICOM transfer syntax UID {str(syntax)[:64]!r} is not a valid UID; the header is damaged.")
    if str(syntax) not in SUPPORTED:
        raise DicomError(
            f"The DICOM transfer syntax {getattr(syntax, 'name', '') or 'unknown'} ({syntax}) is not one pneumo reads "
            "(uncompressed, Deflate, RLE, JPEG baseline/extended/lossless, JPEG-LS, JPEG 2000). Export the image "
            "uncompressed or in one of those.",
            code="unsupported_transfer_syntax",
        )
    if str(syntax) in _NATIVE:
        return
    decoder = get_decoder(syntax)
    plugin = "pylibjpeg" if str(syntax) == _RLE else None
    available = decoder.is_available and (plugin is None or plugin in decoder.available_plugins)
    if not available:
        raise DicomError(
            f"The DICOM transfer syntax {syntax.name} ({syntax}) is compressed and no decoder for it is installed "
            f"({'; '.join(decoder.missing_dependencies) or 'pylibjpeg-rle'}). Install pneumo's codecs "
            "(pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg pylibjpeg-rle) or export the image "
            "uncompressed.",
            code="unsupported_transfer_syntax",
        )


def frame_bytes(ds: Any, limits: Limits) -> bytes:
    """The single encapsulated frame of ``ds``, its fragments counted against ``Limits.max_elements``."""
    from pydicom.encaps import generate_fragments, parse_basic_offsets

    buffer = io.BytesIO(ds.PixelData)
    parse_basic_offsets(buffer)  # the Basic Offset Table item comes first; the fragments follow it
    fragments = list(itertools.islice(generate_fragments(buffer), limits.max_elements + 1))
    if len(fragments) > limits.max_elements:
        raise InputTooLargeError(
            f"The DICOM pixel data is split into more than {limits.max_elements:,} fragments; a frame needs a handful. "
            "The file is damaged or built to stall the decoder; export it again from the PACS.",
            code="too_many_elements",
        )
    return b"".join(fragments)


def decode_pixels(ds: Any, rows: int, cols: int, limits: Limits, draft_size: int | None) -> np.ndarray:
    """The stored values of the single frame of ``ds``, as a 2-D array (reduced for JPEG 2000 drafts).

    Raises:
        DicomError: ``unsupported_transfer_syntax``, or ``corrupt_image`` for data that do not match the header.
        InputTooLargeError: ``too_many_scans``, ``too_many_codeblocks``, ``too_many_tiles``, ``too_many_elements``.
    """
    from pydicom.pixels import get_decoder

    syntax = ds.file_meta.TransferSyntaxUID
    check_syntax(syntax)
    plugin = ""
    if str(syntax) in _NATIVE:
        if ds["PixelData"].is_undefined_length:
            raise _corrupt(
                f"The DICOM pixel data has an undefined length, which only compressed (encapsulated) transfer syntaxes "
                f"use, but the file declares the uncompressed {syntax.name}; it is inconsistent. Export it again."
            )
    else:
        frame = frame_bytes(ds, limits)
        check_frame_header(ds, frame, rows, cols)  # before decoding: the codec allocates what the frame declares
        if str(syntax) in _JPEG:
            check_jpeg_scans(frame, limits)
        elif str(syntax) in _J2K:
            levels = check_j2k(frame, limits)
            reduce = _reduce_level(rows, cols, levels, draft_size)
            if reduce and j2k_sample_format(frame) == (int(ds.BitsStored), int(ds.get("PixelRepresentation", 0))):
                return _j2k_reduced(frame, ds, rows, cols, reduce)
        else:
            plugin = "pylibjpeg"  # RLE: pylibjpeg-rle writes at most Rows x Columns per segment
    try:
        pixels, _ = get_decoder(syntax).as_array(ds, index=0, decoding_plugin=plugin)
    except (MemoryError, InputTooLargeError, KeyboardInterrupt, SystemExit):
        raise
    except BaseException as err:  # a broken codestream; BaseException: pylibjpeg-rle's Rust code panics on some
        # damaged segments (pyo3's PanicException derives from BaseException), found by benchmarks/fuzz_decode.py
        raise _corrupt(
            f"The DICOM pixel data cannot be decoded ({describe_error(err)}); export it again from the PACS."
        ) from err
    if pixels.shape != (rows, cols):
        raise _corrupt(
            f"The DICOM pixel data does not hold the single {cols} x {rows} grayscale image its header declares."
        )
    return pixels


# ------------------------------------------------------------------------------- frame headers


def check_frame_header(ds: Any, frame: bytes, rows: int, cols: int) -> None:
    """Refuse an encapsulated frame whose own header disagrees with Rows/Columns/BitsAllocated.

    The decoder allocates what the codestream declares, so a 100 KB JPEG declaring 13000 x 13000
    inside a 1000 x 800 DICOM would cost 1.6 GB before the shape check after decoding.
    RLE has no size in its header (pylibjpeg-rle decodes it to Rows x Columns) and is not checked here.
    """
    syntax = ds.file_meta.TransferSyntaxUID
    if str(syntax) == _RLE:
        return
    size, bits, samples = _codestream_header(frame[:65536])
    allocated = int(ds.get("BitsAllocated", 16) or 16)
    if size is None:
        raise _corrupt(
            f"The DICOM's compressed frame ({syntax.name}) has no readable image header; the file is damaged."
        )
    if size != (cols, rows) or (bits is not None and bits > allocated) or samples not in (None, 1):
        raise _corrupt(
            f"The DICOM header declares a {cols} x {rows} image of {allocated}-bit pixels, but its compressed frame "
            f"declares {size[0]} x {size[1]} with {bits or '?'} bits and {samples or '?'} channels; the file is "
            "inconsistent and was refused before decoding. Export it again from the PACS."
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


# ------------------------------------------------------------------ reduced JPEG 2000 decoding


def _reduce_level(rows: int, cols: int, levels: int, draft_size: int | None) -> int:
    """The most resolution levels to drop so the shorter side stays >= ``draft_size`` (0: decode in full).

    Pillow sizes a reduced image by rounding, OpenJPEG by ceiling; a level where the two differ
    for either side would fail in Pillow, so only levels where they agree are used.
    """
    if not draft_size:
        return 0
    for level in range(levels, 0, -1):
        scale = 1 << level
        sides = [(side, math.ceil(side / scale)) for side in (rows, cols)]
        if min(reduced for _, reduced in sides) >= draft_size and all(
            int((side + (scale >> 1)) / scale) == reduced for side, reduced in sides
        ):
            return level
    return 0


def _j2k_reduced(frame: bytes, ds: Any, rows: int, cols: int, level: int) -> np.ndarray:
    """The stored values of a JPEG 2000 frame decoded at 1 / 2**level of its size (OpenJPEG through Pillow).

    Pillow returns more-than-8-bit samples as 16-bit, shifted left to fill 16 bits and offset by
    half the range when signed; the shift and offset are undone so the values are the stored ones.
    """
    bits, signed = int(ds.BitsStored), int(ds.get("PixelRepresentation", 0)) == 1
    try:
        with Image.open(io.BytesIO(frame), formats=["JPEG2000"]) as image:
            image.reduce = level  # type: ignore[method-assign,assignment]  # Pillow's J2K plugin: a level, set before load
            image.load()
            values = np.asarray(image).astype(np.int32)
    except MemoryError:
        raise
    except Exception as err:  # a damaged codestream
        raise _corrupt(
            f"The DICOM pixel data cannot be decoded ({describe_error(err)}); export it again from the PACS."
        ) from err
    if bits > 8:
        values >>= 16 - bits
    if signed:
        values -= 1 << (bits - 1)
    expected = (math.ceil(rows / (1 << level)), math.ceil(cols / (1 << level)))
    if values.shape != expected:
        raise _corrupt(
            f"The DICOM pixel data does not hold the single {cols} x {rows} grayscale image its header declares."
        )
    return values
