"""DICOM radiographs into the 8-bit grayscale image every other input becomes.

The DICOM branch of the decoding line (:mod:`pneumo.core.decode`), with DICOM's own rules: which
modalities count as a radiograph, the header fields shown to users, the modality and VOI LUTs (the
display windowing). Its bounds live beside it: :mod:`~pneumo.core.decode.dicom_header` parses the
dataset (capped inflation, counted elements; :func:`read_header` for callers that need the header
only) and :mod:`~pneumo.core.decode.dicom_pixels` decodes the pixel data (the transfer syntaxes
pneumo reads, each frame checked before its codec runs, JPEG 2000 at a reduced level for drafts).

``read_image`` imports this module only when the bytes are DICOM, so pydicom stays off the JPEG path.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from PIL import Image

from pneumo.core.decode.budget import Transform, array_bands, value_range, window_to_gray8
from pneumo.core.decode.common import DecodedImage, Limits, check_shape, describe_error
from pneumo.core.decode.dicom_header import inflate_cap, parse_dataset, read_header
from pneumo.core.decode.dicom_pixels import SUPPORTED, check_frame_header, decode_pixels
from pneumo.core.errors import DicomError, PneumoError

__all__ = [
    "DICOM_FIELDS",
    "RADIOGRAPH_MODALITIES",
    "SUPPORTED",
    "check_frame_header",
    "dicom_to_gray8",
    "inflate_cap",
    "read_dicom",
    "read_header",
]

log = logging.getLogger(__name__)

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


def read_dicom(data: bytes, limits: Limits, draft_size: int | None = None) -> DecodedImage:
    """Decode a single-frame grayscale radiograph as a viewer displays it.

    The stored values go through the modality LUT (rescale slope/intercept or LUT) and the VOI
    LUT or window the file asks for; the output range of that VOI transform (not of this image's
    pixels) maps onto 0-255, so a window means the same on every file. Without a VOI, the
    image's own min-max is used, as viewers do. MONOCHROME1 (white = low values) is inverted.
    ``draft_size`` lets a JPEG 2000 frame decode at a reduced level whose shorter side is still
    at least that many pixels (``original_size`` keeps the film's size).
    """
    try:
        ds, saw_pixel_data = parse_dataset(data, limits)
    except (PneumoError, MemoryError):  # never disguise running out of memory as a bad file
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
        if saw_pixel_data:  # its header was read, its value was not: undefined length without an end
            raise DicomError(
                "The DICOM pixel data element is there but cannot be read to its end (an undefined length with no "
                "closing delimiter); the file is truncated or damaged. Export it again from the PACS.",
                code="corrupt_image",
            )
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
    if "VOILUTSequence" in ds and not ds.VOILUTSequence:
        # Type 1C: present means at least one item. An empty one says nothing; viewers ignore it, and
        # pydicom would map every pixel to one gray (then refused as "not a chest X-ray").
        log.info("Ignoring an empty VOI LUT Sequence")
        del ds.VOILUTSequence

    pixels = decode_pixels(ds, rows, cols, limits, draft_size)
    gray = Image.fromarray(dicom_to_gray8(pixels, ds, invert=photometric == "MONOCHROME1"), mode="L")
    return DecodedImage(gray, "dicom", (cols, rows), metadata)


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
