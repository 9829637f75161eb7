"""The DICOM objects pneumo sends back to the PACS: a Comprehensive SR per image, and a Grad-CAM capture.

Both are built with ``highdicom``, which copies the patient and study modules from the source
image (identifiers are copied, never invented) and fills the SOP common, series and equipment
modules. This module only decides *what the report says* (the content tree below, documented
in ``docs/dicom.md``) and *which UIDs* the new objects get:

```
CONTAINER (18748-4, LN, "Diagnostic imaging report")
  HAS CONCEPT MOD  CODE (121058, DCM, "Procedure reported") = (399208008, SCT, "Plain chest X-ray")
  HAS CONCEPT MOD  TEXT (111001, DCM, "Algorithm Name"), TEXT (111003, DCM, "Algorithm Version")   [TID 4019]
  CONTAINS IMAGE   (260753009, SCT, "Source") -> the source SOP Class / SOP Instance UID
  CONTAINS CODE    (233604007, SCT, "Pneumonia") = (373066001, SCT, "Yes") | (373067005, SCT, "No")   [result]
  CONTAINS NUM     (PNEUMO01, 99PNEUMO, "Calibrated probability of pneumonia") unit (1, UCUM, "no units")   [result]
  CONTAINS NUM     (PNEUMO02, 99PNEUMO, "Decision threshold") unit (1, UCUM, "no units")   [result]
  CONTAINS TEXT    (PNEUMO03, 99PNEUMO, "No result reason") = "<error code>: <message>"   [no result]
  CONTAINS TEXT    (PNEUMO04, 99PNEUMO, "Intended use") = the intended-use statement
```

UIDs are derived (``generate_uid(entropy_srcs=...)``) from the source UIDs and the model
version, so processing the same image twice with the same model (e.g. after a crash between
sending and forgetting the spooled file) gives the same SOP Instance UID, which a PACS treats
as the same object instead of a duplicate report.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid
from pydicom.valuerep import DA, TM

from pneumo import __version__

#: Manufacturer written into every object pneumo makes (and how pneumo recognises its own output).
MANUFACTURER = "pneumo"
#: Series numbers of the report and overlay series pneumo adds to a study (high, to stay clear of the modality's).
SR_SERIES_NUMBER = 9901
SC_SERIES_NUMBER = 9902
SR_SERIES_DESCRIPTION = "pneumo pneumonia result"
SC_SERIES_DESCRIPTION = "pneumo Grad-CAM overlay"

# Coded concepts of the content tree. Standard codes (LOINC, DICOM, SNOMED CT) where one exists;
# the 99PNEUMO private scheme for the three values no standard names.
REPORT_TITLE = Code("18748-4", "LN", "Diagnostic imaging report")
PROCEDURE_REPORTED = Code("121058", "DCM", "Procedure reported")
CHEST_XRAY = Code("399208008", "SCT", "Plain chest X-ray")
SOURCE = Code("260753009", "SCT", "Source")
PNEUMONIA = Code("233604007", "SCT", "Pneumonia")
YES = Code("373066001", "SCT", "Yes")
NO = Code("373067005", "SCT", "No")
PROBABILITY = Code("PNEUMO01", "99PNEUMO", "Calibrated probability of pneumonia")
THRESHOLD = Code("PNEUMO02", "99PNEUMO", "Decision threshold")
NO_RESULT_REASON = Code("PNEUMO03", "99PNEUMO", "No result reason")
INTENDED_USE_CONCEPT = Code("PNEUMO04", "99PNEUMO", "Intended use")
NO_UNITS = Code("1", "UCUM", "no units")


@dataclass(frozen=True)
class Finding:
    """What the model said about one image."""

    pneumonia: bool
    probability: float
    threshold: float


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
    """The one series that holds every pneumo Grad-CAM overlay of a study (for a model version)."""
    return derived_uid(study_uid, "pneumo-sc-series", model.name, model.version)


def is_own_output(header: Dataset, model: ModelInfo) -> bool:
    """True when ``header`` is a report or overlay pneumo made (never classify those: it would loop)."""
    study = str(header.get("StudyInstanceUID", ""))
    series = str(header.get("SeriesInstanceUID", ""))
    if str(header.get("Manufacturer", "")) == MANUFACTURER and str(header.get("Modality", "")) in ("SR", "OT"):
        return True
    return bool(study) and series in (sr_series_uid(study, model), sc_series_uid(study, model))


def build_report(
    source: Dataset, model: ModelInfo, finding: Finding | None, error: tuple[str, str] | None = None
) -> Dataset:
    """The Comprehensive SR for one source image: its finding, or why there is none.

    Args:
        source: the source image's header (pixel data not needed): patient, study and the
            referenced SOP Class / Instance UIDs are taken from it.
        model: model name, version and intended use, written into every report.
        finding: the result, or ``None`` when no result could be given.
        error: ``(code, message)`` of the reason, when ``finding`` is ``None``.
    """
    import highdicom as hd  # lazy: only the DICOM node needs it

    relation = hd.sr.RelationshipTypeValues
    root = hd.sr.ContainerContentItem(name=REPORT_TITLE, template_id=None)
    items: list[Any] = [
        hd.sr.CodeContentItem(PROCEDURE_REPORTED, CHEST_XRAY, relationship_type=relation.HAS_CONCEPT_MOD),
        *hd.sr.AlgorithmIdentification(name=model.name, version=model.version, manufacturer=MANUFACTURER),
        hd.sr.ImageContentItem(
            SOURCE,
            referenced_sop_class_uid=str(source.SOPClassUID),
            referenced_sop_instance_uid=str(source.SOPInstanceUID),
            relationship_type=relation.CONTAINS,
        ),
    ]
    if finding is not None:
        items += [
            hd.sr.CodeContentItem(PNEUMONIA, YES if finding.pneumonia else NO, relationship_type=relation.CONTAINS),
            hd.sr.NumContentItem(PROBABILITY, finding.probability, NO_UNITS, relationship_type=relation.CONTAINS),
            hd.sr.NumContentItem(THRESHOLD, finding.threshold, NO_UNITS, relationship_type=relation.CONTAINS),
        ]
    else:
        code, message = error or ("no_result", "No result was given.")
        items.append(hd.sr.TextContentItem(NO_RESULT_REASON, f"{code}: {message}", relationship_type=relation.CONTAINS))
    items.append(hd.sr.TextContentItem(INTENDED_USE_CONCEPT, model.intended_use, relationship_type=relation.CONTAINS))
    root.ContentSequence = hd.sr.ContentSequence(items)

    study_uid = str(source.StudyInstanceUID)
    report = hd.sr.ComprehensiveSR(
        evidence=[with_type2_identifiers(source)],
        content=root,
        series_instance_uid=sr_series_uid(study_uid, model),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=derived_uid(str(source.SOPInstanceUID), "pneumo-sr", model.name, model.version),
        instance_number=int(source.get("InstanceNumber", 1) or 1),
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=False,  # not verified by a clinician: decision support, not a diagnosis
        is_verified=False,
        series_description=SR_SERIES_DESCRIPTION,
        software_versions=__version__,
    )
    now = datetime.now()
    report.ContentDate, report.ContentTime = DA(now.date()), TM(now.time().replace(microsecond=0))
    return report


def build_overlay(source: Dataset, model: ModelInfo, overlay_rgb: np.ndarray, label: str) -> Dataset:
    """A Secondary Capture of the Grad-CAM overlay, in pneumo's overlay series of the source's study.

    Args:
        source: the source image's header.
        model: the model whose evidence the overlay shows.
        overlay_rgb: (H, W, 3) uint8 picture (``Explanation.overlay()``).
        label: the answer the heatmap explains, written into the image comments.
    """
    import highdicom as hd

    pixels = np.ascontiguousarray(overlay_rgb, dtype=np.uint8)
    orientation = source.get("PatientOrientation")
    capture = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source,
        pixel_array=pixels,
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        series_instance_uid=sc_series_uid(str(source.StudyInstanceUID), model),
        series_number=SC_SERIES_NUMBER,
        sop_instance_uid=derived_uid(str(source.SOPInstanceUID), "pneumo-sc", model.name, model.version),
        instance_number=int(source.get("InstanceNumber", 1) or 1),
        manufacturer=MANUFACTURER,
        # highdicom insists on an orientation; the overlay is the source resized, never turned, so the
        # source's own value is right. Where the source has none, it is emptied below (DICOM: unknown).
        patient_orientation=tuple(orientation) if orientation and len(orientation) == 2 else ("L", "F"),
        transfer_syntax_uid="1.2.840.10008.1.2.1",
    )
    capture.PatientOrientation = list(orientation) if orientation and len(orientation) == 2 else []
    capture.SeriesDescription = SC_SERIES_DESCRIPTION
    capture.ImageType = ["DERIVED", "SECONDARY"]
    capture.BurnedInAnnotation = "NO"
    capture.ImageComments = f"Grad-CAM evidence for {label} ({model.name} {model.version}); not for diagnosis."
    capture.DerivationDescription = "Grad-CAM heatmap of the model's decision laid over the source radiograph."
    ref = Dataset()
    ref.ReferencedSOPClassUID = source.SOPClassUID
    ref.ReferencedSOPInstanceUID = source.SOPInstanceUID
    capture.SourceImageSequence = [ref]
    return capture


#: Type 2 patient and study attributes highdicom reads from the source (they must exist, may be empty).
_TYPE2_IDENTIFIERS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)


def with_type2_identifiers(source: Dataset) -> Dataset:
    """A copy of ``source`` where absent type 2 identifiers are present and empty.

    DICOM's "empty" means "unknown": the report says exactly what the source said, never an invented
    value, and highdicom (which reads these attributes unconditionally) gets a well-formed evidence dataset.
    """
    copy = Dataset(source)
    for keyword in _TYPE2_IDENTIFIERS:
        if keyword not in copy:
            setattr(copy, keyword, "")
    return copy
