"""DICOM radiographs into the 8-bit grayscale image every other input becomes.

The DICOM branch of the decoding line (:mod:`pneumo.core.decode`), with DICOM's own rules: which
modalities count as a radiograph, the header fields shown to users, the modality and VOI LUTs
(the display windowing), compressed transfer syntaxes, and the DICOM-only memory bounds:

* a Deflated-transfer-syntax DICOM is one zlib stream that pydicom inflates whole
  (``zlib.decompress``), so 1.5 MB on disk could become gigabytes; :func:`inflate_capped`
  inflates at most :func:`inflate_cap` bytes and refuses beyond;
* an encapsulated (JPEG, JPEG-LS, JPEG 2000) frame is decoded at the size its *own* header
  declares, whatever the DICOM Rows/Columns say; :func:`check_frame_header` reads that header
  (pydicom's and Pillow's header parsers, no pixel decoded) and refuses a mismatch first.

``read_image`` imports this module only when the bytes are DICOM, so pydicom stays off the JPEG path.
"""

from __future__ import annotations

import io
import zlib
from typing import Any, BinaryIO, cast

import numpy as np
from PIL import Image

from pneumo.core.decode.budget import Transform, array_bands, value_range, window_to_gray8
from pneumo.core.decode.common import DecodedImage, Limits, check_shape, describe_error
from pneumo.core.errors import DicomError, InputTooLargeError, PneumoError

#: DICOM modalities accepted as a plain radiograph. CR and DX are the standard codes for
#: computed and digital radiography; "DR" is not a DICOM term but several vendors write it
#: for digital radiography, so refusing it would refuse real chest films.
RADIOGRAPH_MODALITIES = frozenset({"CR", "DX", "DR"})


#: DICOM header fields a clinician checks, shown by the app and returned by the API: keyword -> the name
#: shown to users, in display order. The one list of them.
DICOM_FIELDS: dict[str, str] = {
    "Modality": "Modality",
    "ViewPosition": "View position",
    "PatientAge": "Patient age",
    "PatientSex": "Patient sex",
    "BodyPartExamined": "Body part",
    "StudyDate": "Study date",
}


def read_dicom(data: bytes, limits: Limits) -> DecodedImage:
    """Decode a single-frame grayscale radiograph as a viewer displays it.

    The stored values go through the modality LUT (rescale slope/intercept or LUT) and the VOI
    LUT or window the file asks for; the output range of that VOI transform (not of this image's
    pixels) maps onto 0-255, so a window means the same on every file. Without a VOI, the
    image's own min-max is used, as viewers do. MONOCHROME1 (white = low values) is inverted.
    A compressed transfer syntax is decoded by whichever pydicom plugin is installed (RLE and
    JPEG baseline work out of the box); without one the error names what to install.
    """
    try:
        from pydicom.pixels import get_decoder
    except ImportError as err:  # pragma: no cover - pydicom is a core dependency
        raise DicomError("Reading DICOM needs pydicom: pip install pydicom.", code="dicom_unavailable") from err

    try:
        ds = _parse_dicom(data, limits)
    except PneumoError:
        raise
    except Exception as err:  # pydicom raises many types for malformed files
        raise DicomError(f"The DICOM file cannot be parsed ({describe_error(err)}).", code="corrupt_image") from err

    metadata = {name: str(ds.get(name)) for name in DICOM_FIELDS if ds.get(name) not in (None, "")}
    modality = str(ds.get("Modality", "") or "").upper()
    if modality and modality not in RADIOGRAPH_MODALITIES:
        raise DicomError(
            f"The DICOM modality is {modality!r}; pneumo reads plain radiographs "
            f"({', '.join(sorted(RADIOGRAPH_MODALITIES))}) only.",
            code="unsupported_modality",
        )
    if "PixelData" not in ds:
        raise DicomError(
            "The DICOM file has no pixel data (is it a report or a structured document?).", code="dicom_no_pixel_data"
        )
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric not in ("MONOCHROME1", "MONOCHROME2") or int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        raise DicomError(
            f"The DICOM photometric interpretation is {photometric} with {ds.get('SamplesPerPixel', 1)} samples per "
            "pixel; radiographs are grayscale (MONOCHROME1 or MONOCHROME2, one sample per pixel).",
            code="unsupported_photometric",
        )
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise DicomError(f"The DICOM file holds {frames} frames; send one radiograph per file.", code="multi_frame")
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    check_shape(cols, rows, limits)

    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if syntax is not None and syntax.is_compressed:
        try:
            decoder = get_decoder(syntax)
            available, missing = decoder.is_available, "; ".join(decoder.missing_dependencies)
        except Exception:  # pydicom knows no decoder at all for this syntax
            available, missing = False, "pydicom has no decoder for it"
        if not available:
            raise DicomError(
                f"The DICOM transfer syntax {syntax.name} ({syntax}) is compressed and no decoder for it is "
                f"installed ({missing}). Install one (e.g. pip install pylibjpeg pylibjpeg-libjpeg "
                "pylibjpeg-openjpeg) or export the image uncompressed.",
                code="unsupported_transfer_syntax",
            )

    if syntax is not None:
        check_frame_header(ds, rows, cols)  # before decoding: the codec allocates what the frame declares
    try:
        pixels = ds.pixel_array
    except Exception as err:  # pixel data that does not match the header, or a broken codestream
        raise DicomError(
            f"The DICOM pixel data cannot be decoded ({describe_error(err)}); export it again from the PACS.",
            code="corrupt_image",
        ) from err
    if pixels.shape != (rows, cols):
        raise DicomError(
            f"The DICOM pixel data does not hold the single {cols} x {rows} grayscale image its header declares.",
            code="corrupt_image",
        )

    gray = Image.fromarray(dicom_to_gray8(pixels, ds, invert=photometric == "MONOCHROME1"), mode="L")
    return DecodedImage(gray, "dicom", (cols, rows), metadata)


def _parse_dicom(data: bytes, limits: Limits) -> Any:
    """``pydicom.dcmread``, except that a Deflated dataset is inflated within the budget (:func:`inflate_capped`)."""
    import pydicom
    from pydicom.filereader import _read_file_meta_info, read_preamble
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    stream = io.BytesIO(data)  # the file meta group only: dcmread would inflate a Deflated dataset whole
    read_preamble(stream, False)
    if _read_file_meta_info(stream).get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian:
        return inflate_capped(data, limits.max_pixels)
    return pydicom.dcmread(io.BytesIO(data))


# ------------------------------------------------------------------------------ display windowing


def dicom_to_gray8(pixels: np.ndarray, ds: Any, *, invert: bool) -> np.ndarray:
    """A viewer's display of stored DICOM values as uint8, band by band (see :func:`read_dicom`).

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


# ---------------------------------------------------------------------------------- memory bounds


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
