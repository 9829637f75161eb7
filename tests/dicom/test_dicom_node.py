"""pneumo as a DICOM node and DICOMweb client, tested against a real Orthanc on loopback.

The report building is checked on its own first (no server); then Orthanc receives pydicom-made
films, routes them to pneumo's Storage SCP (``/modalities/pneumo/store``) or serves them over
DICOMweb, and every assertion reads back what Orthanc stored, through its REST API.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from app_helpers import dicom_bytes, pneumo_log_handlers_restored, xray_array
from orthanc_helpers import (
    EXPECTED_CODES,
    ORTHANC_AET,
    PNEUMO_AET,
    ROUTE_LUA,
    Orthanc,
    content_items,
    free_port,
    orthanc_available,
    study_fields,
    study_files,
)
from peers import *  # noqa: F403  (the fixtures)
from pydicom.uid import generate_uid
from typer.testing import CliRunner

from pneumo.cli import app
from pneumo.dicom.analysis import Analyser
from pneumo.dicom.audit import AuditLog
from pneumo.dicom.codes import ModelInfo
from pneumo.dicom.dicomweb import DicomWebWorker, connect
from pneumo.dicom.node import Destination, DicomNode, NodeConfig, RetryPolicy
from pneumo.dicom.policy import AccessPolicy, CallerRule
from pneumo.inference import Predictor

MODEL = ModelInfo("tiny-test", "9.9.9", "Decision support for frontal chest X-rays of children.")
IDENTIFIERS = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "AccessionNumber")
needs_orthanc = pytest.mark.skipif(orthanc_available() is not None, reason=str(orthanc_available()))


def _node(pacs: Orthanc, predictor: Predictor, spool: Path, heatmap: bool = False, **config: object) -> DicomNode:
    destination = Destination(ORTHANC_AET, "127.0.0.1", pacs.dicom_port)
    access = AccessPolicy(callers=(CallerRule.parse(ORTHANC_AET),))
    options = {"port": pacs.pneumo_port, "ae_title": PNEUMO_AET, "access": access, **config}
    return DicomNode(NodeConfig(destination, spool, **options), Analyser.from_predictor(predictor, heatmap))  # type: ignore[arg-type]


def _source(**fields: object) -> pydicom.Dataset:
    study = {"StudyInstanceUID": generate_uid(), "SeriesInstanceUID": generate_uid(), **fields}
    return pydicom.dcmread(io.BytesIO(dicom_bytes(xray_array(), **study)), stop_before_pixels=True)


def _reason(report: pydicom.Dataset) -> str | None:
    item = content_items(report).get("No result reason")
    return str(item.TextValue).split(":", 1)[0] if item is not None else None


def _probability(report: pydicom.Dataset) -> float:
    item = content_items(report)["Calibrated probability of pneumonia"]
    return float(item.MeasuredValueSequence[0].NumericValue)


def _check_reports(
    pacs: Orthanc, predictor: Predictor, study: dict, files: dict[str, bytes], reports: list[pydicom.Dataset]
) -> None:
    """Each source file has exactly one report with the right finding or reason, references and identifiers."""
    by_source = {str(r.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
                     .ReferencedSOPSequence[0].ReferencedSOPInstanceUID): r for r in reports}  # fmt: skip
    assert len(reports) == len(files) == len(by_source)
    for name, data in files.items():
        source = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
        report = by_source[str(source.SOPInstanceUID)]
        items = content_items(report)
        assert report.SOPClassUID == pydicom.uid.Comprehensive3DSRStorage and report.Modality == "SR"
        if "Rows" in source:
            assert (
                items["Source of Measurement"].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
                == source.SOPInstanceUID
            )
        assert report.SeriesInstanceUID != source.SeriesInstanceUID, "reports go into a new series"
        for keyword in IDENTIFIERS:
            assert str(report.get(keyword, "")) == str(study[keyword]), f"{name}: {keyword} not copied"
        assert items["Algorithm Name"].TextValue == predictor.meta.name
        assert items["Algorithm Version"].TextValue == predictor.meta.version
        assert "not a diagnosis" in items["Intended use"].TextValue
        expected = EXPECTED_CODES[name]
        assert _reason(report) == expected, name
        if expected is None:
            truth = predictor.predict(data)
            probability = _probability(report)
            threshold = float(items["Decision threshold"].MeasuredValueSequence[0].NumericValue)
            assert probability == pytest.approx(truth.probability, abs=1e-6)
            assert threshold == pytest.approx(predictor.threshold)
            said_yes = items["Pneumonia"].ConceptCodeSequence[0].CodeMeaning == "Present"
            assert said_yes == (truth.label == "PNEUMONIA")
        else:
            assert "Pneumonia" not in items and "Decision threshold" not in items


# ------------------------------------------------------------------------------- without a server


@pytest.mark.parametrize("text", ["ORTHANC@127.0.0.1", "@host:104", "TOO_LONG_AE_TITLE_X@h:1", "A@h:70000", "A@h:x"])
def test_destination_must_be_aet_at_host_port(text: str) -> None:
    with pytest.raises(ValueError, match="AET@HOST:PORT"):
        Destination.parse(text)
    assert Destination.parse("ORTHANC@127.0.0.1:4242") == Destination("ORTHANC", "127.0.0.1", 4242)


def test_own_reports_are_never_classified(predictor: Predictor) -> None:
    analyser = Analyser.from_predictor(predictor)
    report = analyser.analyse(dicom_bytes(xray_array(), StudyInstanceUID=generate_uid(), SeriesInstanceUID="1.2.3"))
    buffer = io.BytesIO()
    report.objects[0].save_as(buffer, enforce_file_format=True)
    assert analyser.analyse(buffer.getvalue()).status == "ignored"


def test_unreadable_spool_file_is_kept_aside_and_audited(predictor: Predictor, tmp_path: Path) -> None:
    config = NodeConfig(Destination("NOBODY", "127.0.0.1", free_port()), tmp_path / "spool", audit_log=tmp_path / "a")
    node = DicomNode(config, Analyser.from_predictor(predictor))
    path = node.spool.adopt(b"not a DICOM file at all", "1.2.3.4", node.spool.incoming)
    with node:
        rejected = tmp_path / "spool" / "rejected" / "1.2.3.4.dcm"
        deadline = time.monotonic() + 30
        while not rejected.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
    assert not path.exists() and rejected.read_bytes().startswith(b"not a")
    line = json.loads((tmp_path / "a").read_text())
    assert (line["event"], line["outcome"], line["reason"], line["result_uids"]) == (
        "instance_analysed",
        "rejected",
        "unreadable_dataset",
        [],
    )


# ---------------------------------------------------------------------------- DIMSE, through Orthanc


@needs_orthanc
def test_every_routed_instance_gets_its_report_and_overlay(pacs: Orthanc, predictor: Predictor, tmp_path: Path) -> None:
    study = study_fields()
    files = study_files(study)
    ids = [pacs.upload(data) for data in files.values()]
    audit = tmp_path / "audit.jsonl"
    with _node(pacs, predictor, tmp_path / "spool", heatmap=True, audit_log=audit):
        answer = pacs.route_to_pneumo(ids)
        reports = pacs.wait_for(study["StudyInstanceUID"], "SR", len(files))
        overlays = pacs.wait_for(study["StudyInstanceUID"], "OT", 4)
    assert answer["InstancesCount"] == len(files) and answer["FailedInstancesCount"] == 0
    _check_reports(pacs, predictor, study, files, reports)

    results = {str(pydicom.dcmread(io.BytesIO(files[n])).SOPInstanceUID) for n, c in EXPECTED_CODES.items() if not c}
    assert {str(o.SourceImageSequence[0].ReferencedSOPInstanceUID) for o in overlays} == results
    assert all(o.StudyInstanceUID == study["StudyInstanceUID"] and o.PatientID == study["PatientID"] for o in overlays)
    assert len({o.SeriesInstanceUID for o in overlays} | {r.SeriesInstanceUID for r in reports}) == 2

    lines = [json.loads(line) for line in audit.read_text().splitlines()]
    analysed = [line for line in lines if line["event"] == "instance_analysed"]
    assert sorted(line["reason"] or "" for line in analysed) == sorted(c or "" for c in EXPECTED_CODES.values())
    assert all(line["model_version"] == "9.9.9" and line["channel"] == "dimse" for line in lines)
    text = audit.read_text()
    assert not any(
        str(study[key]) in text for key in ("PatientName", "PatientID", "AccessionNumber", "StudyInstanceUID")
    )
    assert not list((tmp_path / "spool" / "incoming").iterdir()), "answered instances leave the spool"
    assert not list((tmp_path / "spool" / "outgoing").iterdir()), "delivered results leave the spool"


@needs_orthanc
def test_monochrome1_and_monochrome2_films_get_the_same_probability(pacs: Orthanc, predictor: Predictor) -> None:
    study = study_fields()
    files = study_files(study)
    with _node(pacs, predictor, pacs.folder / "spool-mono"):
        pacs.route_to_pneumo([pacs.upload(files[name]) for name in ("mono1_12bit", "mono2_12bit")])
        reports = pacs.wait_for(study["StudyInstanceUID"], "SR", 2)
    values = [
        content_items(r)["Calibrated probability of pneumonia"].MeasuredValueSequence[0].NumericValue for r in reports
    ]
    assert len(values) == 2 and float(values[0]) == pytest.approx(float(values[1]), abs=1e-6)


@needs_orthanc
def test_unlisted_calling_ae_title_is_rejected(pacs: Orthanc, predictor: Predictor, tmp_path: Path) -> None:
    from pynetdicom import AE

    with _node(pacs, predictor, tmp_path / "spool"):
        intruder = AE(ae_title="INTRUDER")
        intruder.add_requested_context(pydicom.uid.DigitalXRayImageStorageForPresentation)
        assoc = intruder.associate("127.0.0.1", pacs.pneumo_port, ae_title=PNEUMO_AET)
        assert assoc.is_rejected and not assoc.is_established
        welcome = AE(ae_title=ORTHANC_AET)
        welcome.add_requested_context(pydicom.uid.DigitalXRayImageStorageForPresentation)
        assoc = welcome.associate("127.0.0.1", pacs.pneumo_port, ae_title=PNEUMO_AET)
        assert assoc.is_established
        assoc.release()


@needs_orthanc
def test_dataset_without_study_uid_is_refused_with_a_status_and_kept(
    pacs: Orthanc, predictor: Predictor, tmp_path: Path
) -> None:
    from pynetdicom import AE

    ds = pydicom.dcmread(io.BytesIO(dicom_bytes(xray_array(), SeriesInstanceUID=generate_uid())))
    with _node(pacs, predictor, tmp_path / "spool", audit_log=tmp_path / "audit.jsonl"):
        sender = AE(ae_title=ORTHANC_AET)
        sender.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
        assoc = sender.associate("127.0.0.1", pacs.pneumo_port, ae_title=PNEUMO_AET)
        status = assoc.send_c_store(ds)
        assoc.release()
    assert status.Status == 0xC210
    assert [p.name for p in (tmp_path / "spool" / "rejected").iterdir()] == [f"{ds.SOPInstanceUID}.dcm"]
    lines = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    refused = [line for line in lines if line["event"] == "instance_refused"]
    assert [(line["reason"], line["calling_ae"]) for line in refused] == [("missing_identifiers", ORTHANC_AET)]


@needs_orthanc
def test_accepted_instances_survive_a_restart(pacs: Orthanc, predictor: Predictor, tmp_path: Path) -> None:
    """The first node cannot reach its destination; a restarted node answers from the spool."""
    study = study_fields()
    files = study_files(study)
    ids = [pacs.upload(files[name]) for name in ("mono2_8bit", "lateral")]
    spool = tmp_path / "spool"
    dead = Destination(ORTHANC_AET, "127.0.0.1", free_port())
    node = DicomNode(
        NodeConfig(dead, spool, port=pacs.pneumo_port, ae_title=PNEUMO_AET, retry=RetryPolicy(100, 0.2, 0.5)),
        Analyser.from_predictor(predictor),
    )
    with node:
        assert pacs.route_to_pneumo(ids)["FailedInstancesCount"] == 0, "accepted while the destination is down"
        time.sleep(1.0)
    assert len(list((spool / "incoming").glob("*.dcm"))) + len(list((spool / "outgoing").iterdir())) == 2
    assert pacs.instances_of(study["StudyInstanceUID"], "SR") == []
    with _node(pacs, predictor, spool):
        reports = pacs.wait_for(study["StudyInstanceUID"], "SR", 2)
    assert sorted(str(_reason(r)) for r in reports) == ["None", "lateral_view"]
    assert not list((spool / "incoming").glob("*.dcm")) and not list((spool / "outgoing").iterdir())


@pytest.mark.slow  # a fresh interpreter imports torch: 10-20 s on a busy 2-core machine
@needs_orthanc
def test_listen_command_runs_until_sigterm(pacs: Orthanc, bundle: Path, tmp_path: Path) -> None:
    study = study_fields()
    source = dicom_bytes(xray_array(), InstanceNumber=1, SeriesInstanceUID=generate_uid(), **study)
    command = [sys.executable, "-m", "pneumo.cli", "dicom", "listen", "--port", str(pacs.pneumo_port)]
    command += ["--destination", f"{ORTHANC_AET}@127.0.0.1:{pacs.dicom_port}", "--allow-caller", ORTHANC_AET]
    command += ["--spool", str(tmp_path / "spool"), "--audit-log", str(tmp_path / "audit.jsonl"), "-m", str(bundle)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}
    process = subprocess.Popen(command, stderr=subprocess.PIPE, env=env, text=True)
    try:
        assert process.stderr is not None
        line = process.stderr.readline()
        while line and "pneumo DICOM node" not in line:
            line = process.stderr.readline()
        pacs.route_to_pneumo([pacs.upload(source)])
        assert len(pacs.wait_for(study["StudyInstanceUID"], "SR", 1)) == 1
    finally:
        process.send_signal(signal.SIGTERM)
        _, rest = process.communicate(timeout=60)
    assert process.returncode == 0, rest
    lines = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert [line["outcome"] for line in lines if line["event"] == "instance_analysed"] == ["result"]


@needs_orthanc
def test_documented_lua_rule_routes_new_films_automatically(predictor: Predictor, tmp_path: Path) -> None:
    with Orthanc(tmp_path, pneumo_port=free_port(), lua=ROUTE_LUA) as routing:
        study = study_fields()
        with _node(routing, predictor, tmp_path / "spool"):
            routing.upload(dicom_bytes(xray_array(), InstanceNumber=1, SeriesInstanceUID=generate_uid(), **study))
            reports = routing.wait_for(study["StudyInstanceUID"], "SR", 1, timeout=60)
            time.sleep(1.0)  # had the report been routed back, a second one would come now
            assert len(routing.instances_of(study["StudyInstanceUID"], "SR")) == 1
    assert len(reports) == 1 and _reason(reports[0]) is None


# ------------------------------------------------------------------------------------------ DICOMweb


@needs_orthanc
def test_dicomweb_answers_each_instance_once(pacs: Orthanc, predictor: Predictor, tmp_path: Path) -> None:
    study = study_fields()
    files = study_files(study)
    for data in files.values():
        pacs.upload(data)
    audit = AuditLog(tmp_path / "audit.jsonl")
    worker = DicomWebWorker(connect(f"{pacs.url}/dicom-web"), Analyser.from_predictor(predictor, True), audit)
    seen: list[str] = []
    counts = worker.run([study["StudyInstanceUID"]], on_outcome=lambda outcome: seen.append(outcome.status))
    assert sum(counts.values()) == len(seen) == len(files)
    assert counts == {"result": 4, "outside_intended_use": 2, "no_result": 2}
    _check_reports(pacs, predictor, study, files, pacs.instances_of(study["StudyInstanceUID"], "SR"))
    assert len(pacs.instances_of(study["StudyInstanceUID"], "OT")) == 4
    assert not worker.run([study["StudyInstanceUID"]]), "own reports and answered instances are skipped"
    restarted = DicomWebWorker(connect(f"{pacs.url}/dicom-web"), Analyser.from_predictor(predictor), audit)
    assert not restarted.run([study["StudyInstanceUID"]]), "the audit log remembers across restarts"


@needs_orthanc
def test_dicomweb_worker_keeps_no_past_outcomes(pacs: Orthanc, predictor: Predictor, tmp_path: Path) -> None:
    """Before: every outcome (overlay pixels included) stayed in a list: +2.9 MB per instance, never given back."""
    import gc
    import weakref

    study = study_fields()
    for number in range(3):
        pacs.upload(dicom_bytes(xray_array(), SeriesInstanceUID=generate_uid(), InstanceNumber=number, **study))
    audit = AuditLog(tmp_path / "audit.jsonl")
    worker = DicomWebWorker(connect(f"{pacs.url}/dicom-web"), Analyser.from_predictor(predictor, True), audit)
    kept: list[weakref.ref] = []
    counts = worker.run([study["StudyInstanceUID"]], on_outcome=lambda outcome: kept.append(weakref.ref(outcome)))
    gc.collect()
    assert counts == {"result": 3} and len(kept) == 3
    assert all(ref() is None for ref in kept), "no outcome outlives its instance"
    assert len(pacs.instances_of(study["StudyInstanceUID"], "OT")) == 3


@needs_orthanc
def test_dicomweb_command_finds_new_studies_since_a_date(pacs: Orthanc, bundle: Path, tmp_path: Path) -> None:
    study = {**study_fields(), "StudyDate": "20991231"}
    pacs.upload(dicom_bytes(xray_array(), SeriesInstanceUID=generate_uid(), **study))
    args = ["dicomweb", "--url", f"{pacs.url}/dicom-web", "--since", "20991231", "-m", str(bundle)]
    with pneumo_log_handlers_restored():
        result = CliRunner().invoke(app, [*args, "--audit-log", str(tmp_path / "audit.jsonl")])
    assert result.exit_code == 0, result.output
    assert "1 instance(s) answered" in result.output
    assert len(pacs.instances_of(study["StudyInstanceUID"], "SR")) == 1


def test_dicomweb_command_needs_a_study_or_a_date() -> None:
    with pneumo_log_handlers_restored():
        result = CliRunner().invoke(app, ["dicomweb", "--url", "http://127.0.0.1:9/dicom-web"])
    assert result.exit_code == 2 and "--study" in result.output


# ------------------------------------------------------------------- the shipped model, real films


def _document_page() -> np.ndarray:
    """A scanned text page: a radiograph's modality and header, but no chest in it."""
    page = np.full((512, 512), 245, np.uint8)
    rng = np.random.default_rng(3)
    for row in range(30, 480, 22):
        page[row : row + 8, 40 : int(rng.integers(200, 470))] = 25
    return page


@pytest.mark.slow
@needs_orthanc
def test_shipped_model_reports_real_films_and_refuses_a_non_xray(
    pacs: Orthanc, shared_data: Path, tmp_path: Path
) -> None:
    from PIL import Image

    predictor = Predictor(None)  # the default bundle, with its not-a-chest-X-ray gate
    study = study_fields()
    series = generate_uid()
    films = {
        path.parent.name: np.asarray(Image.open(path).convert("L"))
        for path in (
            sorted((shared_data / "fullres_samples" / "NORMAL").glob("*.jpeg"))[0],
            sorted((shared_data / "fullres_samples" / "PNEUMONIA").glob("*.jpeg"))[0],
        )
    }
    films["document"] = _document_page()
    files = {
        name: dicom_bytes(
            np.round(pixels.astype(np.float64) / 255 * 4095).astype(np.uint16),
            bits_stored=12,
            SeriesInstanceUID=series,
            InstanceNumber=number,
            **study,
        )
        for number, (name, pixels) in enumerate(films.items(), start=1)
    }
    with _node(pacs, predictor, tmp_path / "spool", heatmap=True):
        pacs.route_to_pneumo([pacs.upload(data) for data in files.values()])
        reports = pacs.wait_for(study["StudyInstanceUID"], "SR", 3)
        overlays = pacs.wait_for(study["StudyInstanceUID"], "OT", 2)
    by_source = {
        str(content_items(r)["Source of Measurement"].ReferencedSOPSequence[0].ReferencedSOPInstanceUID): r
        for r in reports
    }
    for name, data in files.items():
        report = by_source[str(pydicom.dcmread(io.BytesIO(data)).SOPInstanceUID)]
        if name == "document":
            assert _reason(report) == "not_a_chest_xray"
        else:
            assert _reason(report) is None, f"the real {name} film was refused"
            assert _probability(report) == pytest.approx(predictor.predict(data).probability, abs=1e-5)
            assert content_items(report)["Algorithm Version"].TextValue == predictor.meta.version
    assert len(overlays) == 2


def test_listen_command_refuses_a_malformed_destination() -> None:
    with pneumo_log_handlers_restored():
        result = CliRunner().invoke(app, ["dicom", "listen", "--destination", "ORTHANC:4242"])
    assert result.exit_code == 2 and "AET@HOST:PORT" in result.output
