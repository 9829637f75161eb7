"""The report pneumo stores back for each instance: a TID 1500 Measurement Report, as IHE AI Results uses it.

Built with highdicom (``MeasurementReport`` in a ``Comprehensive3DSR``), which copies the patient
and study modules from the source (identifiers are copied, never invented; the source's header
first goes through :func:`pneumo.dicom.header.tolerant_copy`) and fills the SOP common, series
and equipment modules. The content tree (documented in ``docs/dicom.md``)::

    CONTAINER (126000, DCM, "Imaging Measurement Report")                      TID 1500
      HAS CONCEPT MOD  Language of Content Item and Descendants = English
      HAS OBS CONTEXT  Observer Type = Device; Device Observer UID, Name, Manufacturer, Model Name  (TID 1004)
      HAS CONCEPT MOD  Procedure Reported = the source's procedure (or one named after its modality)
      CONTAINS CONTAINER Imaging Measurements
        CONTAINS CONTAINER Measurement Group                                    TID 1501
          HAS OBS CONTEXT  Tracking Identifier / Tracking Unique Identifier
          CONTAINS CODE    Finding = (233604007, SCT, "Pneumonia")
          HAS CONCEPT MOD  Algorithm Name / Algorithm Version / Algorithm Manufacturer     TID 4019
          CONTAINS IMAGE   Source -> the source image                           (images only)
          CONTAINS NUM     (PNEUMO01, 99PNEUMO, "Calibrated probability of pneumonia")    [result]
          CONTAINS NUM     (PNEUMO02, 99PNEUMO, "Decision threshold")                      [result]
          CONTAINS CODE    (PNEUMO05, 99PNEUMO, "Analysis outcome") = Analysed | Not analysed
                           | Not analysed: outside intended use
          CONTAINS CODE    Pneumonia = (52101004, SCT, "Present") | (2667000, SCT, "Absent")  [result]
          CONTAINS TEXT    (PNEUMO03, 99PNEUMO, "No result reason") = "<code>: <message>"  [no result]
          CONTAINS TEXT    (PNEUMO09, 99PNEUMO, "Non-conformant source attribute")         [per note]
          CONTAINS TEXT    (PNEUMO10, 99PNEUMO, "Region analysed")                          [framed model]
          CONTAINS TEXT    (PNEUMO11, 99PNEUMO, "Operating point")                          [result]
          CONTAINS TEXT    (PNEUMO04, 99PNEUMO, "Intended use")

The algorithm is also named in the Contributing Equipment Sequence, the private codes are declared
in the Coding Scheme Identification Sequence, and the series description carries the caution.
A source that is not an image (a presentation state, another SR) is referenced in the evidence
sequence only: an IMAGE content item may point at images only.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydicom.dataset import Dataset
from pydicom.valuerep import DA, TM

from pneumo import __version__
from pneumo.dicom.codes import (
    ABSENT,
    ANALYSED,
    ANALYSIS_OUTCOME,
    CHEST_XRAY,
    HEADER_NOTE,
    IMAGING_PROCEDURE,
    INTENDED_USE_CONCEPT,
    LUNG,
    MANUFACTURER,
    NO_RESULT_REASON,
    NO_UNITS,
    NOT_ANALYSED,
    OPERATING_POINT,
    OUTSIDE_INTENDED_USE,
    PNEUMONIA,
    PRESENT,
    PROBABILITY,
    PROCEDURES_BY_MODALITY,
    PROCESSING_EQUIPMENT,
    RADIOGRAPHY,
    REGION_ANALYSED,
    SR_SERIES_DESCRIPTION,
    SR_SERIES_NUMBER,
    THRESHOLD,
    Finding,
    ModelInfo,
    coding_scheme_identification,
    derived_uid,
    instance_number,
    sr_series_uid,
)
from pneumo.dicom.header import HeaderNote, tolerant_copy
from pneumo.dicom.intended_use import RADIOGRAPH_MODALITIES


def build_report(
    source: Dataset,
    model: ModelInfo,
    finding: Finding | None,
    error: tuple[str, str] | None = None,
    *,
    outside_intended_use: bool = False,
    notes: list[HeaderNote] | None = None,
) -> Dataset:
    """The Comprehensive 3D SR (TID 1500) for one source: its finding, or why there is none.

    Args:
        source: the source's header (pixels not needed); it goes through :func:`~pneumo.dicom.header.tolerant_copy`
            (idempotent), so whatever it holds, the report carries only conformant values.
        model: model name, version and intended use, written into every report.
        finding: the result, or ``None`` when no result could be given.
        error: ``(code, message)`` of the reason, when ``finding`` is ``None``.
        outside_intended_use: the reason is the intended-use gate ("not analysed: outside intended use").
        notes: source attributes that did not conform, stated in the report.
    """
    import highdicom as hd  # lazy: only the DICOM surfaces need it
    from pydicom.sr.codedict import codes

    relation = hd.sr.RelationshipTypeValues
    source, own_notes = tolerant_copy(source)
    notes = [*(notes or ()), *own_notes]
    is_image = "Rows" in source and "Columns" in source  # an image IOD; a GSPS, an SR or a PDF has neither
    algorithm = hd.sr.AlgorithmIdentification(name=model.name, version=model.version, manufacturer=MANUFACTURER)
    evaluations: list[Any] = []
    measurements: list[Any] = []
    if finding is not None:
        measurements = [
            hd.sr.Measurement(PROBABILITY, finding.probability, NO_UNITS),
            hd.sr.Measurement(THRESHOLD, finding.threshold, NO_UNITS),
        ]
        evaluations = [
            hd.sr.QualitativeEvaluation(ANALYSIS_OUTCOME, ANALYSED),
            hd.sr.QualitativeEvaluation(PNEUMONIA, PRESENT if finding.pneumonia else ABSENT),
        ]
    else:
        outcome = OUTSIDE_INTENDED_USE if outside_intended_use else NOT_ANALYSED
        evaluations = [hd.sr.QualitativeEvaluation(ANALYSIS_OUTCOME, outcome)]
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=derived_uid(str(source.SOPInstanceUID), "pneumo-tracking", model.name, model.version),
            identifier="pneumo pneumonia classification",
        ),
        finding_type=PNEUMONIA,
        algorithm_id=algorithm,
        finding_sites=[hd.sr.FindingSite(LUNG)] if finding is not None else None,
        measurements=measurements or None,
        qualitative_evaluations=evaluations,
        source_images=[hd.sr.SourceImageForMeasurementGroup(str(source.SOPClassUID), str(source.SOPInstanceUID))]
        if is_image
        else None,
    )
    texts: list[tuple[Any, str]] = []
    if finding is None:
        code, message = error or ("no_result", "No result was given.")
        texts.append((NO_RESULT_REASON, f"{code}: {message}"[:1024]))
    if finding is not None:
        described = ((REGION_ANALYSED, finding.region), (OPERATING_POINT, finding.operating_point))
        texts += [(concept, text[:1024]) for concept, text in described if text]
    texts += [(HEADER_NOTE, note.text()[:1024]) for note in notes or ()]
    texts.append((INTENDED_USE_CONCEPT, model.intended_use))
    for concept, text in texts:
        group[0].ContentSequence.append(hd.sr.TextContentItem(concept, text, relationship_type=relation.CONTAINS))

    device_uid = derived_uid("pneumo-device", model.name, model.version)
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=device_uid,
            name=model.name[:64],
            manufacturer_name=MANUFACTURER,
            model_name=f"{model.name} {model.version}"[:64],
        ),
    )
    content = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=procedure_of(source),
        imaging_measurements=[group],
    )
    study_uid = str(source.StudyInstanceUID)
    report = hd.sr.Comprehensive3DSR(
        evidence=[source],
        content=content[0],
        series_instance_uid=sr_series_uid(study_uid, model),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=derived_uid(str(source.SOPInstanceUID), "pneumo-sr", model.name, model.version),
        instance_number=instance_number(str(source.SOPInstanceUID), "sr"),
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=False,  # not verified by a clinician: decision support, not a diagnosis
        is_verified=False,
        series_description=SR_SERIES_DESCRIPTION,
        software_versions=__version__,
        contributing_equipment=[contributing_equipment(model)],
    )
    report.SpecificCharacterSet = "ISO_IR 192"
    report.CodingSchemeIdentificationSequence = [coding_scheme_identification()]
    now = datetime.now()
    report.ContentDate, report.ContentTime = DA(now.date()), TM(now.time().replace(microsecond=0))
    return report


def contributing_equipment(model: ModelInfo) -> Any:
    """The Contributing Equipment item that names the algorithm (IHE AI Results: who made this object)."""
    import highdicom as hd

    return hd.ContributingEquipment(
        manufacturer=MANUFACTURER,
        purpose_of_reference=PROCESSING_EQUIPMENT,
        manufacturer_model_name=model.name[:64],
        software_versions=[model.version[:64], f"pneumo {__version__}"[:64]],
        contribution_description="AI decision support: pneumonia classification (not for diagnostic use)",
    )


def procedure_of(source: Dataset) -> Any:
    """The procedure the report is about: the source's own code, else one named after its modality.

    A CT slice's report used to say "Plain chest X-ray"; the procedure is now what the source was.
    """
    import highdicom as hd

    for item in source.get("ProcedureCodeSequence", None) or []:
        try:
            return hd.sr.CodedConcept(
                str(item.CodeValue), str(item.CodingSchemeDesignator), str(item.CodeMeaning)[:64] or "Procedure"
            )
        except Exception:  # an incomplete code item: fall back to the modality
            break
    modality = str(source.get("Modality", "") or "").upper()
    if modality in RADIOGRAPH_MODALITIES:
        body_part = str(source.get("BodyPartExamined", "") or "").upper()
        return CHEST_XRAY if body_part in ("", "CHEST", "THORAX", "LUNG", "LUNGS") else RADIOGRAPHY
    return PROCEDURES_BY_MODALITY.get(modality, IMAGING_PROCEDURE)


def report_items(report: Dataset) -> dict[str, Dataset]:
    """Every content item of ``report`` by concept meaning, depth first (the last of a meaning wins)."""
    found: dict[str, Dataset] = {}

    def walk(items: Any) -> None:
        for item in items or []:
            if "ConceptNameCodeSequence" in item:
                found[str(item.ConceptNameCodeSequence[0].CodeMeaning)] = item
            walk(item.get("ContentSequence"))

    walk(report.get("ContentSequence"))
    return found
