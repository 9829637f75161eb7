"""What pneumo answers for one DICOM instance, whichever way it came (DIMSE or DICOMweb).

:class:`Analyser` reads the header within bounds (:func:`pneumo.dicom.header.read_header`), skips
pneumo's own output, copies the header tolerantly (a non-conformant value is noted, never fatal),
applies the intended-use gate (:mod:`pneumo.dicom.intended_use`), runs the one inference path
(:class:`~pneumo.inference.predictor.Predictor`: decoding, limits, OOD gate, error codes) and turns
the answer, or the reason there is none, into the objects to store at the PACS: a TID 1500 report
(:mod:`pneumo.dicom.sr`) and, with heatmaps on, a Secondary Capture (:mod:`pneumo.dicom.sc`) whose
map comes from the ONNX graph (:func:`pneumo.inference.cam.make_explainer`; the node never imports torch).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydicom.dataset import Dataset

from pneumo.core.errors import PneumoError
from pneumo.dicom.codes import Finding, ModelInfo, is_own_output
from pneumo.dicom.header import COPIED_TYPE2, HeaderError, HeaderNote, read_header, tolerant_copy
from pneumo.dicom.intended_use import IntendedUse, OutsideIntendedUse
from pneumo.dicom.sc import build_overlay
from pneumo.dicom.sr import build_report

if TYPE_CHECKING:
    from pneumo.inference.explain import Explainer
    from pneumo.inference.predictor import Predictor

log = logging.getLogger(__name__)

#: Outcome statuses: a finding, no finding (and why), outside the intended use, no report possible, pneumo's own.
STATUSES = ("result", "no_result", "outside_intended_use", "rejected", "ignored")


@dataclass
class Outcome:
    """What happened to one received instance: the objects to send back and what the audit line says."""

    status: str
    sop_instance_uid: str | None
    code: str | None = None
    label: str | None = None
    probability: float | None = None
    threshold: float | None = None
    objects: list[Dataset] = field(default_factory=list)
    overlay_error: str | None = None
    #: Keywords of source attributes that did not conform (their values stay out of the audit log).
    notes: tuple[str, ...] = ()

    def audit_fields(self) -> dict[str, Any]:
        """The fields of this outcome in the audit shape (:mod:`pneumo.dicom.audit`)."""
        detail = {key: value for key, value in (("overlay_error", self.overlay_error), ("notes", self.notes)) if value}
        return {
            "sop_instance_uid": self.sop_instance_uid,
            "outcome": self.status,
            "reason": self.code,
            "result_uids": [str(ds.SOPInstanceUID) for ds in self.objects],
            "result": self.label,
            "probability": self.probability,
            "threshold": self.threshold,
            "detail": detail or None,
        }


class Analyser:
    """Turns one DICOM instance (a file or its bytes) into an :class:`Outcome` through the one Predictor.

    Args:
        predictor: the loaded model (its decoding, limits, OOD gate and error codes apply).
        model: name, version and intended use written into the reports.
        heatmap: also build the heatmap Secondary Capture (CAM from the ONNX graph).
        intended_use: the header gate; default :class:`IntendedUse` (children, frontal chest radiographs).
    """

    def __init__(
        self,
        predictor: Predictor,
        model: ModelInfo,
        heatmap: bool = False,
        intended_use: IntendedUse | None = None,
    ) -> None:
        self.predictor = predictor
        self.model = model
        self.intended_use = intended_use or IntendedUse()
        self.explainer: Explainer | None = None
        if heatmap:  # CAM from the ONNX graph: the node never imports torch
            from pneumo.inference.cam import make_explainer

            self.explainer = make_explainer(predictor)

    @classmethod
    def from_predictor(
        cls, predictor: Predictor, heatmap: bool = False, intended_use: IntendedUse | None = None
    ) -> Analyser:
        from pneumo.inference.model_info import INTENDED_USE

        meta = predictor.meta
        return cls(predictor, ModelInfo(meta.name, meta.version, INTENDED_USE), heatmap, intended_use)

    def analyse(self, source: Path | bytes) -> Outcome:
        """The outcome for ``source``; a header that cannot be read gives a ``rejected`` outcome.

        Raises:
            Exception: only when not even a no-result report can be built (the pipeline retries, then
                dead-letters the instance with the reason).
        """
        try:
            header = read_header(source, self.predictor.limits)
        except HeaderError as err:
            return Outcome("rejected", err.sop_instance_uid, code=err.code)
        uid = str(header.SOPInstanceUID)
        if is_own_output(header, self.model):
            return Outcome("ignored", uid, code="own_output")
        clean, notes = tolerant_copy(header)
        del header
        noted = tuple(note.keyword for note in notes)
        try:
            self.intended_use.check(clean)
        except OutsideIntendedUse as err:
            report = self._report(clean, None, (err.code, err.message), notes, outside=True)
            return Outcome("outside_intended_use", uid, code=err.code, objects=[report], notes=noted)
        try:
            decoded = self.predictor.decode(source)  # once: the heatmap reads the same image
            prediction = self.predictor.predict(decoded)
        except PneumoError as err:
            report = self._report(clean, None, (err.code, err.message), notes)
            return Outcome("no_result", uid, code=err.code, objects=[report], notes=noted)
        except Exception:  # a bug in pneumo, not the file: the report says so, details go to the log only
            log.exception("internal error while classifying a received instance")
            reason = ("internal_error", "pneumo failed on this image; the error was logged for the administrator.")
            report = self._report(clean, None, reason, notes)
            return Outcome("no_result", uid, code="internal_error", objects=[report], notes=noted)
        finding = Finding(
            prediction.label == "PNEUMONIA",
            prediction.probability,
            prediction.threshold,
            region=region_text(prediction.crop),
            operating_point=prediction.operating_point,
        )
        outcome = Outcome(
            "result",
            uid,
            label=prediction.label,
            probability=prediction.probability,
            threshold=prediction.threshold,
            objects=[self._report(clean, finding, None, notes)],
            notes=noted,
        )
        if self.explainer is not None:
            try:
                explanation = self.explainer.explain(decoded, target_label=prediction.label)
                overlay = np.asarray(explanation.overlay())
                del explanation
                outcome.objects.append(build_overlay(clean, self.model, overlay, prediction.label))
            except PneumoError as err:  # the finding stands without its picture; the audit line says why
                outcome.overlay_error = err.code
        return outcome

    def _report(
        self,
        clean: Dataset,
        finding: Finding | None,
        error: tuple[str, str] | None,
        notes: list[HeaderNote],
        outside: bool = False,
    ) -> Dataset:
        """The report; should the full one fail (an attribute highdicom refuses), one with identifiers only."""
        try:
            return build_report(clean, self.model, finding, error, outside_intended_use=outside, notes=notes)
        except Exception:
            log.exception("The report could not be built from the source's attributes; sending one without them.")
            bare = Dataset()
            for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "PatientID"):
                setattr(bare, keyword, clean.get(keyword, ""))
            for keyword in COPIED_TYPE2:
                setattr(bare, keyword, "")
            bare.SpecificCharacterSet = "ISO_IR 192"
            dropped = [HeaderNote("(patient and study attributes)", "not copied", "")]
            return build_report(bare, self.model, finding, error, outside_intended_use=outside, notes=dropped)


def region_text(crop: dict[str, float | bool] | None) -> str:
    """A framed model's crop in words, for the report ("" for a model that reads the whole image)."""
    if crop is None:
        return ""
    if not crop.get("found"):
        return "No lung fields found: the whole image was analysed."
    x0, y0, x1, y1 = (100 * float(crop[k]) for k in ("x0", "y0", "x1", "y1"))
    return f"Lung fields box: columns {x0:.0f}-{x1:.0f}%, rows {y0:.0f}-{y1:.0f}% of the image."
