"""The objects the node writes: TID 1500 reports and the overlay, checked by dciodvfy and dsrdump.

Every kind of object the node sends is built by the real Analyser from a real DICOM file and then
handed to dicom3tools' ``dciodvfy`` (0 errors) and dcmtk's ``dsrdump`` (reads it, no error). Header
quirks that used to send an instance to ``failed/`` with no report now give a report that states
the raw value; an adult, a hand, a lateral film or a CT gets "not analysed: outside intended use".
"""

from __future__ import annotations

import io
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from app_helpers import dicom_bytes, xray_array
from orthanc_helpers import PATIENT, content_items
from peers import *  # noqa: F403  (the fixtures)
from peers import dcmtk, film
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import generate_uid

from pneumo.dicom.analysis import Analyser, Outcome, region_text
from pneumo.dicom.codes import PRIVATE_SCHEME, Finding, ModelInfo
from pneumo.dicom.header import tolerant_copy
from pneumo.dicom.intended_use import IntendedUse, patient_age_years
from pneumo.dicom.sc import build_overlay
from pneumo.dicom.sr import build_report
from pneumo.inference import Predictor

MODEL = ModelInfo("tiny-test", "9.9.9", "Decision support for frontal chest X-rays of children.")


def _analyse(predictor: Predictor, data: bytes, heatmap: bool = False) -> Outcome:
    return Analyser.from_predictor(predictor, heatmap).analyse(data)


def _encode(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _reason(report: Dataset) -> str | None:
    item = content_items(report).get("No result reason")
    return str(item.TextValue).split(":", 1)[0] if item is not None else None


def _outcome_code(report: Dataset) -> str:
    return str(content_items(report)["Analysis outcome"].ConceptCodeSequence[0].CodeMeaning)


def _not_an_image(sop_class: str, modality: str) -> bytes:
    """A non-image object of a chest study (a presentation state, someone else's SR): no Rows, no pixels."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = sop_class, generate_uid()
    meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = generate_uid(), generate_uid(), modality
    ds.PatientID, ds.Manufacturer = "P1", "someone else"
    return _encode(ds)


# --------------------------------------------------------------------------------------- validators


def _dciodvfy_errors(path: Path) -> list[str]:
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]


def _dsrdump_problems(path: Path) -> list[str]:
    run = subprocess.run([str(dcmtk("dsrdump")), str(path)], capture_output=True, text=True, timeout=60)
    problems = [line for line in run.stderr.splitlines() if line.startswith(("E:", "F:"))]
    return problems + ([f"dsrdump exit {run.returncode}"] if run.returncode else [])


def _every_kind(predictor: Predictor) -> dict[str, Dataset]:
    """One object of every kind the node writes, each made by the Analyser from a real file."""
    made: dict[str, Dataset] = {}
    result = _analyse(predictor, film(**PATIENT, AccessionNumber="A1"), heatmap=True)
    made["sr_result"], made["sc_overlay"] = result.objects
    broken = pydicom.dcmread(io.BytesIO(film()))
    broken.PixelData = broken.PixelData[:100]
    made["sr_corrupt_image"] = _analyse(predictor, _encode(broken)).objects[0]
    made["sr_outside_adult"] = _analyse(predictor, film(PatientAge="045Y")).objects[0]
    made["sr_outside_ct"] = _analyse(predictor, film(Modality="CT")).objects[0]
    gsps = _not_an_image(pydicom.uid.GrayscaleSoftcopyPresentationStateStorage, "PR")
    made["sr_for_gsps"] = _analyse(predictor, gsps).objects[0]
    made["sr_for_foreign_sr"] = _analyse(predictor, _not_an_image(pydicom.uid.EnhancedSRStorage, "SR")).objects[0]
    made["sr_header_quirks"] = _analyse(predictor, film(PatientSex="U", StudyTime="10:30:00")).objects[0]
    made["sr_framed"] = build_report(pydicom.dcmread(io.BytesIO(film())), MODEL, FRAMED)
    return made


#: A framed model's finding: the report says which part of the image was read and the operating point.
FRAMED = Finding(
    True, 0.91, 0.75, region=region_text({"x0": 0.09, "y0": 0.08, "x1": 0.89, "y1": 0.9, "found": True}),
    operating_point="Youden's J on the pooled robustness validation",
)  # fmt: skip


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dicom3tools' dciodvfy is not installed")
@pytest.mark.skipif(dcmtk("dsrdump") is None, reason="dcmtk's dsrdump is not installed")
def test_every_kind_of_object_passes_dciodvfy_and_dsrdump(predictor: Predictor, tmp_path: Path) -> None:
    """Before: the overlay failed dciodvfy (Laterality, Type 2C) and a GSPS's report was invalid for dsrdump."""
    for name, ds in _every_kind(predictor).items():
        path = tmp_path / f"{name}.dcm"
        ds.save_as(path, enforce_file_format=True)
        assert _dciodvfy_errors(path) == [], name
        if name.startswith("sr_"):
            assert _dsrdump_problems(path) == [], name


# ----------------------------------------------------------------------------------- the SR content


def test_result_report_follows_tid_1500_as_ihe_ai_results_uses_it(predictor: Predictor) -> None:
    report = _analyse(predictor, film(**PATIENT, AccessionNumber="A1")).objects[0]
    root = report.ContentSequence
    assert report.SOPClassUID == pydicom.uid.Comprehensive3DSRStorage
    assert report.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    assert report.ConceptNameCodeSequence[0].CodeValue == "126000"  # Imaging Measurement Report
    items = content_items(report)
    assert items["Observer Type"].ConceptCodeSequence[0].CodeMeaning == "Device"
    assert items["Device Observer Manufacturer"].TextValue == "pneumo"
    assert items["Procedure reported"].ConceptCodeSequence[0].CodeValue == "399208008"  # Plain chest X-ray
    assert items["Finding"].ConceptCodeSequence[0].CodeMeaning == "Pneumonia"
    assert _outcome_code(report) == "Analysed"
    assert items["Pneumonia"].ConceptCodeSequence[0].CodeMeaning in ("Present", "Absent")
    assert 0.0 <= float(items["Calibrated probability of pneumonia"].MeasuredValueSequence[0].NumericValue) <= 1.0
    assert "Imaging Measurements" in items and len(root) >= 4
    equipment = report.ContributingEquipmentSequence[0]
    assert (
        equipment.ManufacturerModelName == predictor.meta.name and predictor.meta.version in equipment.SoftwareVersions
    )
    schemes = {item.CodingSchemeDesignator: item for item in report.CodingSchemeIdentificationSequence}
    assert schemes[PRIVATE_SCHEME].CodingSchemeName and schemes[PRIVATE_SCHEME].CodingSchemeResponsibleOrganization
    assert "NOT FOR DIAGNOSTIC USE" in report.SeriesDescription
    assert (report.VerificationFlag, report.CompletionFlag) == ("UNVERIFIED", "COMPLETE")
    assert (report.PatientID, report.AccessionNumber) == (PATIENT["PatientID"], "A1")


def test_a_framed_models_report_says_which_region_it_read_and_its_operating_point() -> None:
    items = content_items(build_report(pydicom.dcmread(io.BytesIO(film())), MODEL, FRAMED))
    assert items["Region analysed"].TextValue == "Lung fields box: columns 9-89%, rows 8-90% of the image."
    assert items["Operating point"].TextValue == "Youden's J on the pooled robustness validation"
    unframed = content_items(build_report(pydicom.dcmread(io.BytesIO(film())), MODEL, Finding(True, 0.91, 0.75)))
    assert "Region analysed" not in unframed and "Operating point" not in unframed
    assert region_text({"x0": 0.0, "y0": 0.0, "x1": 1.0, "y1": 1.0, "found": False}).startswith("No lung fields")
    assert region_text(None) == ""


def test_non_image_sources_are_referenced_as_evidence_never_as_an_image(predictor: Predictor) -> None:
    """Before: a GSPS or a foreign SR was referenced by an IMAGE content item."""
    gsps = _not_an_image(pydicom.uid.GrayscaleSoftcopyPresentationStateStorage, "PR")
    report = _analyse(predictor, gsps).objects[0]
    items = content_items(report)
    assert "Source of Measurement" not in items and "Source" not in items
    evidence = report.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert evidence.ReferencedSOPClassUID == pydicom.uid.GrayscaleSoftcopyPresentationStateStorage
    assert _outcome_code(report) == "Not analysed: outside intended use" and _reason(report) == "unsupported_modality"


@pytest.mark.parametrize(
    ("modality", "meaning"),
    [("CT", "Computed tomography"), ("MR", "Magnetic resonance imaging"), ("DX", "Plain chest X-ray")],
)
def test_the_procedure_reported_is_the_sources(predictor: Predictor, modality: str, meaning: str) -> None:
    """Before: a CT's no-result report said "Plain chest X-ray"."""
    report = _analyse(predictor, film(Modality=modality)).objects[0]
    assert content_items(report)["Procedure reported"].ConceptCodeSequence[0].CodeMeaning == meaning


def test_instance_numbers_are_unique_across_source_series(predictor: Predictor) -> None:
    """Before: two sources with InstanceNumber 1 in different series gave two reports numbered 1."""
    study = generate_uid()
    reports = [_analyse(predictor, film(StudyInstanceUID=study, InstanceNumber=1)).objects[0] for _ in range(4)]
    assert len({r.SeriesInstanceUID for r in reports}) == 1
    assert len({int(r.InstanceNumber) for r in reports}) == 4


def test_the_same_source_and_model_give_the_same_report_identity() -> None:
    source = pydicom.dcmread(io.BytesIO(film()), stop_before_pixels=True)
    first, again = (build_report(source, MODEL, Finding(True, 0.83, 0.47)) for _ in range(2))
    assert (first.SOPInstanceUID, first.InstanceNumber) == (again.SOPInstanceUID, again.InstanceNumber)


def test_report_never_invents_identifiers_the_source_lacks() -> None:
    source = pydicom.dcmread(io.BytesIO(dicom_bytes(xray_array(), StudyInstanceUID="1.2.3", SeriesInstanceUID="1.2.4")))
    report = build_report(source, MODEL, Finding(False, 0.1, 0.5))
    assert report.PatientName == "" and report.PatientBirthDate == "" and report.AccessionNumber == ""
    assert content_items(report)["Pneumonia"].ConceptCodeSequence[0].CodeMeaning == "Absent"


def test_overlay_is_a_complete_secondary_capture_in_a_new_series() -> None:
    source = pydicom.dcmread(io.BytesIO(film(**PATIENT)), stop_before_pixels=True)
    overlay = np.zeros((80, 90, 3), np.uint8)
    overlay[..., 0] = 200
    capture = build_overlay(source, MODEL, overlay, "PNEUMONIA")
    assert capture.SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage
    assert capture.StudyInstanceUID == source.StudyInstanceUID and capture.SeriesInstanceUID != source.SeriesInstanceUID
    assert capture.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert capture.BodyPartExamined == "CHEST" and "Laterality" not in capture
    assert "NOT FOR DIAGNOSTIC USE" in capture.SeriesDescription and capture.ContributingEquipmentSequence
    assert (capture.pixel_array[..., 0] == 200).all()


# ---------------------------------------------------------------------------------- header quirks


@pytest.mark.parametrize(
    ("field", "value", "written"),
    [
        ("PatientSex", "U", ""),
        ("PatientSex", "m", "M"),
        ("StudyTime", "10:30:00", "103000"),
        ("PatientBirthDate", "19800000", ""),
        ("StudyDate", "2024-13-45", ""),
    ],
)
def test_a_non_conformant_value_still_gets_a_report_that_states_it(
    predictor: Predictor, field: str, value: str, written: str
) -> None:
    """Before: each of these sent the instance to failed/ as internal_error, with no report at all."""
    outcome = _analyse(predictor, film(**{field: value}))
    assert outcome.status == "result" and outcome.notes == (field,)
    report = outcome.objects[0]
    assert str(report.get(field, "")) == written
    note = content_items(report)["Non-conformant source attribute"].TextValue
    assert field in note and repr(value) in note


def test_a_single_iso_2022_character_set_is_read_as_its_plain_twin(predictor: Predictor) -> None:
    """Before: SpecificCharacterSet 'ISO 2022 IR 100' made pydicom refuse the header: internal_error."""
    outcome = _analyse(predictor, film(SpecificCharacterSet="ISO 2022 IR 100", PatientName="M\u00fcller^Hans"))
    assert outcome.status == "result"
    assert str(outcome.objects[0].PatientName) == "M\u00fcller^Hans"


def test_tolerant_copy_keeps_valid_values_and_is_idempotent() -> None:
    source = pydicom.dcmread(io.BytesIO(film(**{**PATIENT, "PatientSex": "m"})), stop_before_pixels=True)
    clean, notes = tolerant_copy(source)
    assert [n.keyword for n in notes] == ["PatientSex"] and clean.PatientSex == "M"
    assert clean.PatientID == PATIENT["PatientID"] and clean.PatientBirthDate == PATIENT["PatientBirthDate"]
    assert tolerant_copy(clean)[1] == []


# ----------------------------------------------------------------------------------- intended use


@pytest.mark.parametrize(
    ("fields", "code"),
    [
        ({"PatientAge": "045Y"}, "patient_too_old"),
        ({"PatientBirthDate": "19700101", "StudyDate": "20240101"}, "patient_too_old"),
        ({"BodyPartExamined": "HAND"}, "body_part_not_chest"),
        ({"ViewPosition": "LL"}, "lateral_view"),
        ({"ViewPosition": "LAO"}, "view_not_frontal"),
        ({"Modality": "CT"}, "unsupported_modality"),
    ],
)
def test_outside_intended_use_gets_a_report_saying_so_and_no_finding(
    predictor: Predictor, fields: dict[str, Any], code: str
) -> None:
    """Before: an adult (PatientAge 045Y) and a HAND film got a PNEUMONIA finding."""
    outcome = _analyse(predictor, film(**fields))
    assert (outcome.status, outcome.code, outcome.label) == ("outside_intended_use", code, None)
    report = outcome.objects[0]
    assert _outcome_code(report) == "Not analysed: outside intended use" and _reason(report) == code
    assert "Calibrated probability of pneumonia" not in content_items(report)


@pytest.mark.parametrize("fields", [{"PatientAge": "004Y"}, {"PatientAge": "018M"}, {"BodyPartExamined": "CHEST"}, {}])
def test_children_s_frontal_chest_films_pass_the_gate(predictor: Predictor, fields: dict[str, Any]) -> None:
    assert _analyse(predictor, film(**fields)).status == "result"


def test_the_age_limit_is_configurable() -> None:
    header = pydicom.dcmread(io.BytesIO(film(PatientAge="012Y")), stop_before_pixels=True)
    assert patient_age_years(header) == 12
    IntendedUse().check(header)
    with pytest.raises(Exception, match="12 years old"):
        IntendedUse(max_age_years=10).check(header)
