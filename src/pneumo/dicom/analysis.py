"""What pneumo answers for one DICOM instance, whichever way it came (DIMSE or DICOMweb), and the audit log.

:class:`Analyser` runs the one inference path (:class:`~pneumo.inference.predictor.Predictor`: decoding,
limits, OOD gate, error codes) on the bytes of an instance, adds the header checks only DICOM
can make (a lateral view, identifiers missing), and turns the answer or the refusal into the
objects to store at the PACS (:mod:`pneumo.dicom.sr`). :class:`AuditLog` records one JSON line
per finished instance with no patient or study identifier in it.
"""

from __future__ import annotations

import io
import json
import logging
import os
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydicom.dataset import Dataset

from pneumo.core.errors import DicomError, PneumoError
from pneumo.dicom.sr import Finding, ModelInfo, build_overlay, build_report, is_own_output

if TYPE_CHECKING:
    from pneumo.inference.explain import Explainer
    from pneumo.inference.predictor import Predictor

log = logging.getLogger(__name__)

#: ViewPosition values that say the film is not frontal (DICOM defined terms LL/RL, and vendor spellings).
LATERAL_VIEWS = frozenset({"LL", "RL", "LAT", "LATERAL", "LEFT LATERAL", "RIGHT LATERAL"})
#: Identifiers without which no report can be placed in the source's study.
REQUIRED_IDENTIFIERS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")


@dataclass
class Outcome:
    """What happened to one received instance: the audit line and the objects to send back."""

    status: str  # "result", "no_result", "rejected" (no report possible) or "ignored" (pneumo's own output)
    sop_instance_uid: str | None
    code: str | None = None
    label: str | None = None
    probability: float | None = None
    threshold: float | None = None
    objects: list[Dataset] = field(default_factory=list)
    overlay_error: str | None = None

    def audit(self, model: ModelInfo, channel: str) -> dict[str, Any]:
        """The JSON-lines audit record: no names, no patient or study identifiers, only the SOP Instance UID."""
        return {
            "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "channel": channel,
            "sop_instance_uid": self.sop_instance_uid,
            "status": self.status,
            "result": self.label,
            "probability": self.probability,
            "threshold": self.threshold,
            "error_code": self.code,
            "overlay_error": self.overlay_error,
            "model": model.name,
            "model_version": model.version,
            "sent": [str(ds.SOPInstanceUID) for ds in self.objects],
        }


class AuditLog:
    """Append-only JSON lines, one per finished instance, safe to call from several threads."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._lock = threading.Lock()
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict[str, Any]) -> None:
        if self.path is None:
            return
        with self._lock, self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def finished_uids(self) -> set[str]:
        """SOP Instance UIDs already answered (used by the DICOMweb poll to skip them)."""
        if self.path is None or not self.path.is_file():
            return set()
        done: set[str] = set()
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a crash: that instance is simply redone
                continue
            if record.get("status") in ("result", "no_result") and record.get("sop_instance_uid"):
                done.add(str(record["sop_instance_uid"]))
        return done


class Analyser:
    """Turns the bytes of one DICOM instance into an :class:`Outcome` through the one :class:`Predictor`.

    Args:
        predictor: the loaded model (its decoding, limits, OOD gate and error codes apply).
        model: name, version and intended use written into the reports.
        heatmap: also build the heatmap Secondary Capture (CAM from the ONNX graph).
    """

    def __init__(self, predictor: Predictor, model: ModelInfo, heatmap: bool = False) -> None:
        self.predictor = predictor
        self.model = model
        self.explainer: Explainer | None = None
        if heatmap:  # CAM from the ONNX graph: the node never imports torch
            from pneumo.inference.cam import make_explainer

            self.explainer = make_explainer(predictor)

    @classmethod
    def from_predictor(cls, predictor: Predictor, heatmap: bool = False) -> Analyser:
        from pneumo.inference.model_info import INTENDED_USE

        meta = predictor.meta
        return cls(predictor, ModelInfo(meta.name, meta.version, INTENDED_USE), heatmap)

    def analyse(self, data: bytes) -> Outcome:
        header = read_header(data)
        if isinstance(header, Outcome):
            return header
        uid = str(header.SOPInstanceUID)
        if is_own_output(header, self.model):
            return Outcome("ignored", uid, code="own_output")
        try:
            check_view(header)
            prediction = self.predictor.predict(data)
        except PneumoError as err:
            report = build_report(header, self.model, None, (err.code, err.message))
            return Outcome("no_result", uid, code=err.code, objects=[report])
        except Exception:  # a bug in pneumo, not the file: the report says so, details go to the log only
            log.exception("internal error while classifying a received instance")
            reason = ("internal_error", "pneumo failed on this image; the error was logged for the administrator.")
            return Outcome(
                "no_result", uid, code="internal_error", objects=[build_report(header, self.model, None, reason)]
            )
        finding = Finding(prediction.label == "PNEUMONIA", prediction.probability, prediction.threshold)
        outcome = Outcome(
            "result",
            uid,
            label=prediction.label,
            probability=prediction.probability,
            threshold=prediction.threshold,
            objects=[build_report(header, self.model, finding)],
        )
        if self.explainer is not None:
            try:
                explanation = self.explainer.explain(self.predictor.decode(data), target_label=prediction.label)
                overlay = np.asarray(explanation.overlay())
                outcome.objects.append(build_overlay(header, self.model, overlay, prediction.label))
            except PneumoError as err:  # the finding stands without its picture; the audit line says why
                outcome.overlay_error = err.code
        return outcome


def read_header(data: bytes) -> Dataset | Outcome:
    """The header of ``data`` without pixels, or a ``rejected`` outcome when no report could be placed."""
    import pydicom

    try:
        header = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
        missing = [key for key in REQUIRED_IDENTIFIERS if not str(header.get(key, "") or "")]
    except Exception:  # any parse failure means the same: this is not a dataset pneumo can answer
        return Outcome("rejected", None, code="unreadable_dataset")
    if missing:
        uid = str(header.get("SOPInstanceUID", "") or "") or None
        return Outcome("rejected", uid, code="missing_identifiers")
    return header


def check_view(header: Dataset) -> None:
    """Refuse a film whose header says it is a lateral view (the model saw frontal films only)."""
    view = str(header.get("ViewPosition", "") or "").strip().upper()
    if view in LATERAL_VIEWS:
        raise DicomError(
            f"The DICOM header says this is a lateral view (ViewPosition {view}); pneumo reads frontal "
            "(AP or PA) chest films only. Send the frontal film of the study.",
            code="lateral_view",
        )
