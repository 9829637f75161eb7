"""DICOM radiographs into the 8-bit grayscale image every other input becomes (:func:`pneumo.core.io.read_image`).

Split from :mod:`pneumo.core.io` because DICOM has its own rules: which modalities count as a
radiograph, the header fields shown to users, the modality and VOI LUTs, compressed transfer syntaxes
and the decode budget of :mod:`pneumo.core.decode_budget`. ``read_image`` imports this module only
when the bytes are DICOM, so pydicom stays off the JPEG path.
"""

from __future__ import annotations

import io
from typing import Any

from PIL import Image

from pneumo.core.decode_budget import check_frame_header, dicom_to_gray8, inflate_capped
from pneumo.core.errors import DicomError, PneumoError
from pneumo.core.io import DecodedImage, Limits, check_shape, describe_error

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
    """``pydicom.dcmread``, except that a Deflated dataset is inflated within the budget (decode_budget)."""
    import pydicom
    from pydicom.filereader import _read_file_meta_info, read_preamble
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    stream = io.BytesIO(data)  # the file meta group only: dcmread would inflate a Deflated dataset whole
    read_preamble(stream, False)
    if _read_file_meta_info(stream).get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian:
        return inflate_capped(data, limits.max_pixels)
    return pydicom.dcmread(io.BytesIO(data))
