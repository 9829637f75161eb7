"""The header of a received instance: read within bounds, and copied tolerantly into pneumo's own objects.

Two jobs, both about never losing a result to a header:

* :func:`read_header` is the ONE place the node and the DICOMweb worker read a header. It never
  loads pixel data, reads large values lazily, and inflates a Deflated dataset through the capped
  inflater of :mod:`pneumo.core.decode.dicom` (plain ``dcmread`` inflates a 1 MB file to gigabytes).
  When ``pneumo.core.decode.dicom.read_header`` lands, this function becomes a call to it.
* :func:`tolerant_copy` builds the small dataset the report and the overlay are made from: the
  identifiers and the patient and study attributes they carry, each value checked against its VR
  (and PatientSex against its enumerated values). A value that does not conform (``PatientSex U``,
  ``StudyTime 10:30:00``, ``PatientBirthDate 19800000``) is repaired when the repair is certain
  (upper case, separators removed) and otherwise written empty (DICOM: unknown); either way it is
  kept as received in a :class:`HeaderNote` that the report states. Before, any of these sent the
  instance to ``failed/`` with no report at all.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.valuerep import validate_value

from pneumo.core.decode import DEFAULT_LIMITS, Limits
from pneumo.core.errors import PneumoError

#: Identifiers without which no report can be placed in the source's study.
REQUIRED_IDENTIFIERS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")

#: Type 2 patient and study attributes the report copies (present, possibly empty), with their VR.
COPIED_TYPE2 = {
    "PatientName": "PN",
    "PatientID": "LO",
    "PatientBirthDate": "DA",
    "PatientSex": "CS",
    "AccessionNumber": "SH",
    "StudyID": "SH",
    "StudyDate": "DA",
    "StudyTime": "TM",
    "ReferringPhysicianName": "PN",
}
#: Optional attributes copied when present and valid (the intended-use gate and the overlay read them).
COPIED_OPTIONAL = {
    "PatientAge": "AS",
    "Modality": "CS",
    "BodyPartExamined": "CS",
    "ViewPosition": "CS",
    "Laterality": "CS",
    "ImageLaterality": "CS",
    "SeriesNumber": "IS",
    "InstanceNumber": "IS",
    "Manufacturer": "LO",
    "SeriesDescription": "LO",
    "StudyDescription": "LO",
    "IssuerOfPatientID": "LO",
}
_ENUMERATED = {"PatientSex": {"M", "F", "O"}, "Laterality": {"R", "L"}, "ImageLaterality": {"R", "L", "U", "B"}}
#: Single-valued Specific Character Sets written with ISO 2022 code extensions, and what they mean alone.
_ISO2022_ALONE = {"ISO 2022 IR 6": "ISO_IR 6", "ISO 2022 IR 100": "ISO_IR 100", "ISO 2022 IR 101": "ISO_IR 101",
                  "ISO 2022 IR 109": "ISO_IR 109", "ISO 2022 IR 110": "ISO_IR 110", "ISO 2022 IR 126": "ISO_IR 126",
                  "ISO 2022 IR 127": "ISO_IR 127", "ISO 2022 IR 138": "ISO_IR 138", "ISO 2022 IR 144": "ISO_IR 144",
                  "ISO 2022 IR 148": "ISO_IR 148", "ISO 2022 IR 166": "ISO_IR 166", "ISO 2022 IR 13": "ISO_IR 13",
                  "ISO 2022 IR 203": "ISO_IR 203"}  # fmt: skip


class HeaderError(PneumoError):
    """No report can be placed for this dataset: it cannot be parsed, or it lacks the identifiers a report needs."""

    code = "unreadable_dataset"
    http_status = 422

    def __init__(self, message: str, *, code: str | None = None, sop_instance_uid: str | None = None) -> None:
        super().__init__(message, code=code)
        self.sop_instance_uid = sop_instance_uid


@dataclass(frozen=True)
class HeaderNote:
    """A source attribute whose value did not conform: what came, and what pneumo's objects carry instead."""

    keyword: str
    received: str
    written: str

    def text(self) -> str:
        shown = repr(self.written) if self.written else "empty (unknown)"
        return f"{self.keyword} {self.received!r} does not conform to DICOM; written as {shown}"


def read_header(source: Path | bytes, limits: Limits = DEFAULT_LIMITS) -> Dataset:
    """The header of ``source`` (a file or its bytes) without its pixel data, read within bounds.

    Raises:
        HeaderError: ``unreadable_dataset`` (not parseable) or ``missing_identifiers`` (no study to report into).
    """
    from pneumo.core.decode.dicom import read_header as read_bounded  # Deflate capped, elements counted

    try:
        header = read_bounded(source if isinstance(source, bytes) else Path(source).read_bytes(), limits)
        _repair_character_set(header)
        missing = [key for key in REQUIRED_IDENTIFIERS if not _text(header, key)]
    except PneumoError as err:
        raise HeaderError(f"The dataset cannot be read within bounds ({err.code}).") from err
    except Exception as err:  # any parse failure means the same: this is not a dataset pneumo can answer
        raise HeaderError(f"The dataset cannot be parsed as DICOM ({type(err).__name__}).") from err
    if missing:
        raise HeaderError(
            f"The dataset lacks {', '.join(missing)}; a report cannot be placed in its study.",
            code="missing_identifiers",
            sop_instance_uid=_text(header, "SOPInstanceUID") or None,
        )
    return header


def _repair_character_set(header: Dataset) -> None:
    """A single ISO 2022 term (``ISO 2022 IR 100``) means its plain twin (``ISO_IR 100``); pydicom refuses it."""
    value = header.get("SpecificCharacterSet")
    terms = [value] if isinstance(value, str) else list(value or [])
    if len(terms) == 1 and str(terms[0]).strip() in _ISO2022_ALONE:
        header.SpecificCharacterSet = _ISO2022_ALONE[str(terms[0]).strip()]


def _text(header: Dataset, keyword: str) -> str:
    try:
        value = header.get(keyword)
    except Exception:  # an undecodable value reads as absent
        return ""
    return "" if value is None else str(value).strip()


def tolerant_copy(header: Dataset) -> tuple[Dataset, list[HeaderNote]]:
    """The attributes pneumo's objects carry, each valid for its VR, and notes on what had to change.

    The copy is in UTF-8 (``ISO_IR 192``): every value the source's character set decoded can be
    written. Identifiers are copied as they are (``read_header`` checked they exist).
    """
    copy = Dataset()
    copy.SpecificCharacterSet = "ISO_IR 192"
    notes: list[HeaderNote] = []
    for keyword in REQUIRED_IDENTIFIERS:
        setattr(copy, keyword, _text(header, keyword))
    for keyword, vr in {**COPIED_TYPE2, **COPIED_OPTIONAL}.items():
        present = keyword in header
        raw = _raw_text(header, keyword) if present else ""
        value, note = _conform(keyword, vr, raw)
        if note is not None:
            notes.append(note)
        if value or keyword in COPIED_TYPE2:
            setattr(copy, keyword, int(value) if vr == "IS" and value else value)
    orientation = header.get("PatientOrientation")
    if (
        orientation is not None
        and len(orientation) == 2
        and all(re.fullmatch(r"[AFHLPR]{1,3}", v) for v in orientation)
    ):
        copy.PatientOrientation = list(orientation)
    for keyword in ("ProcedureCodeSequence", "Rows", "Columns"):
        if keyword in header:
            try:
                setattr(copy, keyword, header[keyword].value)
            except Exception:  # an unreadable optional attribute is simply not copied
                notes.append(HeaderNote(keyword, "(unreadable)", ""))
    return copy, notes


def _raw_text(header: Dataset, keyword: str) -> str:
    try:
        value = header[keyword].value
    except Exception:  # bytes the character set cannot decode: keep what can be shown
        element = header.data_element(keyword)
        raw = element.value if element is not None else b""
        return raw.decode("latin-1", "replace").strip() if isinstance(raw, bytes) else str(raw)
    if value is None:
        return ""
    if isinstance(value, pydicom.multival.MultiValue):
        return "\\".join(str(v) for v in value)
    return str(value).strip()


def _conform(keyword: str, vr: str, raw: str) -> tuple[str, HeaderNote | None]:
    """``(value to write, note)``: the value as received when valid, else a certain repair, else empty."""
    if not raw:
        return "", None
    if _valid(keyword, vr, raw):
        return raw, None
    for candidate in _repairs(vr, raw):
        if _valid(keyword, vr, candidate):
            return candidate, HeaderNote(keyword, raw, candidate)
    return "", HeaderNote(keyword, raw, "")


def _valid(keyword: str, vr: str, value: str) -> bool:
    if keyword in _ENUMERATED and value not in _ENUMERATED[keyword]:
        return False
    try:
        validate_value(vr, value, pydicom.config.RAISE)
        if vr == "DA":
            pydicom.valuerep.DA(value)
        elif vr == "TM":
            pydicom.valuerep.TM(value)
        elif vr == "IS":
            int(value)
    except Exception:  # pydicom raises ValueError, OverflowError or TypeError for non-conformant values
        return False
    return True


def _repairs(vr: str, raw: str) -> list[str]:
    """Repairs that cannot change the meaning: case of a code string, date and time separators."""
    if vr == "CS":
        return [raw.upper()]
    if vr in ("DA", "TM"):
        return [re.sub(r"[.:/\-]", "", raw)]
    if vr == "IS":
        return [raw.split(".")[0]] if re.fullmatch(r"-?\d+\.0*", raw) else []
    return []
