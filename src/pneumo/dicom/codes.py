"""What pneumo's DICOM objects are called and numbered: codes, the private coding scheme, derived UIDs.

Shared by the report (:mod:`pneumo.dicom.sr`), the overlay (:mod:`pneumo.dicom.sc`) and the node, so
the same source and model always give the same UIDs and the node recognises its own output.

UIDs are derived (``generate_uid(entropy_srcs=...)``) from the source UIDs and the model version:
processing the same image twice with the same model (e.g. after a crash between sending and
forgetting a spooled file) gives the same SOP Instance UID, which a PACS treats as the same object.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

#: Manufacturer written into every object pneumo makes (and how pneumo recognises its own output).
MANUFACTURER = "pneumo"
#: Series numbers of the report and overlay series pneumo adds to a study (high, clear of the modality's).
SR_SERIES_NUMBER = 9901
SC_SERIES_NUMBER = 9902
#: Series descriptions carry the caution a PACS worklist shows (LO: at most 64 characters).
SR_SERIES_DESCRIPTION = "pneumo AI result - NOT FOR DIAGNOSTIC USE"
SC_SERIES_DESCRIPTION = "pneumo CAM overlay - NOT FOR DIAGNOSTIC USE"

#: The private coding scheme of the values no standard terminology names (PS3.16 8.2: "99" prefix).
PRIVATE_SCHEME = "99PNEUMO"
PRIVATE_SCHEME_NAME = "pneumo private codes"
PRIVATE_SCHEME_ORGANIZATION = "pneumo open-source project"

# Standard codes (DICOM, SNOMED CT, UCUM) where one exists.
PNEUMONIA = Code("233604007", "SCT", "Pneumonia")
PRESENT = Code("52101004", "SCT", "Present")
ABSENT = Code("2667000", "SCT", "Absent")
NO_UNITS = Code("1", "UCUM", "no units")
LUNG = Code("39607008", "SCT", "Lung")
PROCESSING_EQUIPMENT = Code("109102", "DCM", "Processing Equipment")

# The private ones.
PROBABILITY = Code("PNEUMO01", PRIVATE_SCHEME, "Calibrated probability of pneumonia")
THRESHOLD = Code("PNEUMO02", PRIVATE_SCHEME, "Decision threshold")
NO_RESULT_REASON = Code("PNEUMO03", PRIVATE_SCHEME, "No result reason")
INTENDED_USE_CONCEPT = Code("PNEUMO04", PRIVATE_SCHEME, "Intended use")
ANALYSIS_OUTCOME = Code("PNEUMO05", PRIVATE_SCHEME, "Analysis outcome")
ANALYSED = Code("PNEUMO06", PRIVATE_SCHEME, "Analysed")
NOT_ANALYSED = Code("PNEUMO07", PRIVATE_SCHEME, "Not analysed")
OUTSIDE_INTENDED_USE = Code("PNEUMO08", PRIVATE_SCHEME, "Not analysed: outside intended use")
HEADER_NOTE = Code("PNEUMO09", PRIVATE_SCHEME, "Non-conformant source attribute")
REGION_ANALYSED = Code("PNEUMO10", PRIVATE_SCHEME, "Region analysed")
OPERATING_POINT = Code("PNEUMO11", PRIVATE_SCHEME, "Operating point")
PRIVATE_CODES = (
    PROBABILITY,
    THRESHOLD,
    NO_RESULT_REASON,
    INTENDED_USE_CONCEPT,
    ANALYSIS_OUTCOME,
    ANALYSED,
    NOT_ANALYSED,
    OUTSIDE_INTENDED_USE,
    HEADER_NOTE,
    REGION_ANALYSED,
    OPERATING_POINT,
)

#: Procedure reported, by source modality, where the source names none (ProcedureCodeSequence).
CHEST_XRAY = Code("399208008", "SCT", "Plain chest X-ray")
PROCEDURES_BY_MODALITY = {
    "CT": Code("77477000", "SCT", "Computed tomography"),
    "MR": Code("113091000", "SCT", "Magnetic resonance imaging"),
    "US": Code("16310003", "SCT", "Ultrasonography"),
    "NM": Code("371572003", "SCT", "Nuclear medicine imaging"),
    "MG": Code("71651007", "SCT", "Mammography"),
    "XA": Code("77343006", "SCT", "Angiography"),
    "RF": Code("44491008", "SCT", "Fluoroscopy"),
}
RADIOGRAPHY = Code("363680008", "SCT", "Radiographic imaging procedure")
IMAGING_PROCEDURE = Code("363679005", "SCT", "Imaging")


@dataclass(frozen=True)
class Finding:
    """What the model said about one image."""

    pneumonia: bool
    probability: float
    threshold: float
    #: The part of the image the model read (a framed model's lung box), in words; empty when it read all of it.
    region: str = ""
    #: What the threshold was chosen for, on validation data.
    operating_point: str = ""


@dataclass(frozen=True)
class ModelInfo:
    """The model named in every report."""

    name: str
    version: str
    intended_use: str


def derived_uid(*parts: str) -> str:
    """A UID that is a pure function of ``parts`` (pydicom's root, SHA-512 of the parts)."""
    return str(generate_uid(entropy_srcs=list(parts)))


def sr_series_uid(study_uid: str, model: ModelInfo) -> str:
    """The one series that holds every pneumo report of a study (for a model version)."""
    return derived_uid(study_uid, "pneumo-sr-series", model.name, model.version)


def sc_series_uid(study_uid: str, model: ModelInfo) -> str:
    """The one series that holds every pneumo overlay of a study (for a model version)."""
    return derived_uid(study_uid, "pneumo-sc-series", model.name, model.version)


def instance_number(source_uid: str, kind: str) -> int:
    """The Instance Number of pneumo's object for ``source_uid``: unique within pneumo's series, stable.

    The sources of one study come from several series whose Instance Numbers repeat, so copying
    them gave duplicates in the report series. A 31-bit hash of the source's SOP Instance UID is
    the same on every run (a resent report keeps its number) and, for the few hundred sources a
    study holds, collides with odds below one in ten thousand.
    """
    digest = hashlib.sha256(f"{kind}:{source_uid}".encode()).digest()
    return int.from_bytes(digest[:4], "big") % (2**31 - 2) + 1


def is_own_output(header: Dataset, model: ModelInfo) -> bool:
    """True when ``header`` is a report or overlay pneumo made (never classify those: it would loop)."""
    study = str(header.get("StudyInstanceUID", "") or "")
    series = str(header.get("SeriesInstanceUID", "") or "")
    if str(header.get("Manufacturer", "") or "") == MANUFACTURER and str(header.get("Modality", "")) in ("SR", "OT"):
        return True
    return bool(study) and series in (sr_series_uid(study, model), sc_series_uid(study, model))


def coding_scheme_identification() -> Dataset:
    """The Coding Scheme Identification Sequence item that declares ``99PNEUMO`` (PS3.3 C.12.1.1.4)."""
    item = Dataset()
    item.CodingSchemeDesignator = PRIVATE_SCHEME
    item.CodingSchemeName = PRIVATE_SCHEME_NAME
    item.CodingSchemeResponsibleOrganization = PRIVATE_SCHEME_ORGANIZATION
    return item
