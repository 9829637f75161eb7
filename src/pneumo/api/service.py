"""What the routes serve: the model, its limits, the backpressure gate and the metrics, and the work done for
each request (in a worker thread, inside a slot).

Set on ``app.state.pneumo`` by :func:`pneumo.api.routes.create_app`. Uploads are read inside the
slot: a queued request holds only its spooled upload (on disk past 1 MB), never its bytes in memory.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fastapi import UploadFile

from pneumo.api.backpressure import Backpressure
from pneumo.api.metrics import Metrics
from pneumo.api.schemas import Crop, Heatmap, ModelRef, PredictionResponse
from pneumo.core.decode import DecodedImage, Limits
from pneumo.core.errors import InputTooLargeError, PneumoError
from pneumo.inference.explain import ExplainUnavailableError
from pneumo.inference.model_info import png_bytes
from pneumo.inference.predictor import Prediction, Predictor

if TYPE_CHECKING:
    from pneumo.inference.explain import Explainer


@dataclass
class Service:
    """The model behind the API and what each request needs around it."""

    predictor: Predictor
    explainer: Explainer | None
    limits: Limits
    max_batch_files: int
    model_ref: ModelRef
    gate: Backpressure
    metrics: Metrics | None = None
    auth: bool = False

    def answer(
        self, prediction: Prediction, name: str | None, image: bytes | DecodedImage, heatmap: bool, opacity: float
    ) -> dict:
        """The JSON answer; with ``heatmap``, ``image`` (decoded already, or the upload's bytes) is explained."""
        body = PredictionResponse(
            file=name,
            label=prediction.label,
            probability=prediction.probability,
            threshold=prediction.threshold,
            probabilities=prediction.probabilities,
            format=prediction.format,
            metadata=prediction.metadata,
            ood_score=prediction.ood_score,
            crop=Crop.model_validate(prediction.crop) if prediction.crop is not None else None,
            borderline=prediction.borderline,
            operating_point=prediction.operating_point,
            model=self.model_ref,
        )
        if heatmap:
            decoded = image if isinstance(image, DecodedImage) else self.predictor.decode(image)
            body.heatmap = _heatmap(self.explainer, decoded, prediction.label, opacity)
        if self.metrics is not None:
            self.metrics.observe_answer(prediction.label, prediction.probability, prediction.ood_score)
        return body.model_dump()

    def predict_one(self, upload: UploadFile, heatmap: bool, opacity: float) -> dict:
        data, name = read_upload(upload, self.limits.max_bytes), upload.filename
        if isinstance(data, PneumoError):
            raise data
        decoded = self.predictor.decode(data)  # once, for the answer and its heatmap
        return self.answer(self.predictor.predict(decoded, name=name), name, decoded, heatmap, opacity)

    def predict_batch(self, uploads: list[UploadFile], heatmap: bool, opacity: float) -> dict:
        items = [(upload.filename, read_upload(upload, self.limits.max_bytes)) for upload in uploads]
        readable = [(i, data) for i, (_, data) in enumerate(items) if isinstance(data, bytes)]
        outcomes = self.predictor.predict_many([data for _, data in readable])
        by_index: dict[int, Prediction | PneumoError] = dict(zip([i for i, _ in readable], outcomes, strict=True))
        results: list[dict] = []
        for index, (name, data) in enumerate(items):
            outcome = data if isinstance(data, PneumoError) else by_index[index]
            try:
                if isinstance(outcome, PneumoError):
                    raise outcome
                assert isinstance(data, bytes)
                results.append(self.answer(outcome, name, data, heatmap, opacity))
            except PneumoError as err:
                results.append({"file": name, "error": err.to_dict()})
                if self.metrics is not None:
                    self.metrics.refused(err.code)
        return {"results": results}


def read_upload(upload: UploadFile, max_bytes: int) -> bytes | PneumoError:
    """The upload's bytes (blocking: in a worker thread), at most one byte past the limit; too large: its error."""
    upload.file.seek(0)
    data = upload.file.read(max_bytes + 1)
    if len(data) > max_bytes:
        return InputTooLargeError(
            f"{upload.filename or 'The upload'} is over the {max_bytes / 2**20:g} MB limit.", code="file_too_large"
        )
    return data


def _heatmap(explainer: Explainer | None, decoded: DecodedImage, label: str, opacity: float) -> Heatmap:
    if explainer is None:
        raise ExplainUnavailableError("Heatmaps are not available for this model.")
    explanation = explainer.explain(decoded, label)
    overlay = explanation.overlay(opacity)
    return Heatmap(
        png_base64=base64.b64encode(png_bytes(overlay)).decode("ascii"),
        target_label=explanation.target_label,
        layer=explanation.layer,
        width=overlay.width,
        height=overlay.height,
        opacity=opacity,
    )
