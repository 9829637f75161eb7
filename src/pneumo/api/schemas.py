"""The API's response bodies (pydantic): what ``/docs`` shows and what every answer is validated against."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class ErrorDetail(BaseModel):
    code: str = Field(description="Stable machine-readable error code, e.g. unsupported_format.")
    message: str = Field(description="What was received, what was expected and what to do.")


class ErrorResponse(BaseModel):
    error: ErrorDetail


class ModelRef(BaseModel):
    name: str
    version: str
    arch: str


class Heatmap(BaseModel):
    png_base64: str = Field(description="The image with the Grad-CAM heatmap laid over it, PNG, base64.")
    target_label: str = Field(description="The answer whose evidence the heatmap shows.")
    layer: str = Field(description="The model layer the map was taken from.")
    width: int
    height: int
    opacity: float


class Crop(BaseModel):
    x0: float = Field(description="Left edge of the part the model saw, as a fraction of the width.")
    y0: float = Field(description="Top edge, as a fraction of the height.")
    x1: float = Field(description="Right edge, as a fraction of the width.")
    y1: float = Field(description="Bottom edge, as a fraction of the height.")
    found: bool = Field(description="False: no lungs were found and the model saw the full frame.")


class PredictionResponse(BaseModel):
    file: str | None = Field(None, description="The uploaded file name.")
    label: str = Field(description="PNEUMONIA when probability >= threshold, else NORMAL.")
    probability: float = Field(description="Calibrated probability of pneumonia.")
    threshold: float = Field(description="Decision threshold in force (chosen on validation data).")
    probabilities: dict[str, float] = Field(description="Calibrated probability of every label of the model.")
    format: str | None = Field(None, description="Decoded format: jpeg, png, dicom, ...")
    metadata: dict[str, str] = Field(default_factory=dict, description="DICOM header fields, when DICOM.")
    ood_score: float | None = Field(None, description="Distance to the training X-rays (OOD gate), if any.")
    crop: Crop | None = Field(None, description="The lung box the model saw, when the model frames films to it.")
    borderline: bool = Field(
        False, description="Probability and label sit on opposite sides of 50%: show it as a borderline answer."
    )
    operating_point: str = Field("", description="How the threshold was chosen on validation data.")
    model: ModelRef
    heatmap: Heatmap | None = None


class FileError(BaseModel):
    file: str | None
    error: ErrorDetail


class BatchResponse(BaseModel):
    results: list[PredictionResponse | FileError] = Field(description="One entry per uploaded file, in order.")


#: The error answers every prediction route documents (``responses=`` of its declaration).
ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": text}
    for status, text in (
        (400, "Unreadable input"),
        (401, "No API key, or an unknown one (WWW-Authenticate: Bearer)"),
        (403, "The API key lacks the route's scope, or the request came from an origin that is not allowed"),
        (408, "The request body arrived too slowly"),
        (413, "Upload over the size limit, or too many files, fields or parts"),
        (415, "Not a JPEG, PNG or DICOM file"),
        (422, "Malformed request, unusable DICOM, or not a chest X-ray"),
        (503, "Busy, or over the request's deadline: retry after Retry-After seconds"),
    )
}
