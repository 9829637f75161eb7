"""The HTTP API a hospital system calls (FastAPI): a thin layer over the one :class:`Predictor`.

Endpoints: ``GET|HEAD /health``, ``GET /v1/model``, ``POST /v1/predict`` (one file in the multipart
field ``file``, ``?heatmap=true`` adds a Grad-CAM overlay as a base64 PNG) and ``POST
/v1/predict/batch`` (multipart field ``files``, one result or error object per file, in order).
The routes are declared once on :data:`router`; :func:`create_app` binds them to a model. OpenAPI
docs at ``/docs`` and ``/redoc``, served from local assets (fastapi-offline); the reference text
is in ``docs/api.md``. A trailing slash names the same route (no redirect).

Every error answers ``{"error": {"code", "message"}}``: a :class:`PneumoError` with its own
``http_status`` (400/413/415/422, 503 ``server_busy`` with ``Retry-After``), a malformed request
422, an unknown path 404. Request bodies are capped per route while they stream in
(``api_middleware.BodyLimit``: a 1 GB upload is refused from its ``Content-Length`` or after the cap, never
buffered); each route's cap is derived from its declaration (one file, or ``max_batch_files`` for
a list of files), so a new upload route is capped by default. At most ``max_concurrent`` requests
decode and predict at once and ``max_queue`` wait (:mod:`pneumo.api.backpressure`), so memory stays
bounded under any load. No input a user sends can cause a 500; anything unexpected is logged
with its traceback and answered as a JSON 500 without one. (FastAPI's own ``max_body_size``
answers an oversize ``Content-Length`` in plain text, hence the small middleware here.)
"""

# No ``from __future__ import annotations`` here: FastAPI reads the endpoints' annotations at run
# time, and some of them close over create_app's arguments.
import base64
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, get_origin

from fastapi import APIRouter, Depends, FastAPI, File, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from fastapi_offline import FastAPIOffline
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

import pneumo
from pneumo.api.backpressure import Backpressure, default_workers
from pneumo.api.middleware import BodyLimit, CanonicalPath, error_response
from pneumo.core.decode import DEFAULT_LIMITS, Limits
from pneumo.core.errors import InputTooLargeError, PneumoError, ServerBusyError
from pneumo.inference.explain import DEFAULT_OPACITY, ExplainUnavailableError
from pneumo.inference.model_info import png_bytes, public_model_info
from pneumo.inference.predictor import Prediction, Predictor

if TYPE_CHECKING:
    from pneumo.inference.explain import Explainer

log = logging.getLogger(__name__)

#: Room for the multipart boundaries and part headers around each file in a request body.
MULTIPART_OVERHEAD = 16 * 1024
#: Most files one batch request may carry (the body cap is this many times the file limit).
DEFAULT_MAX_BATCH_FILES = 16

_HTTP_CODES = {400: "invalid_request", 404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}


# ------------------------------------------------------------------------------------ schemas


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


class PredictionResponse(BaseModel):
    file: str | None = Field(None, description="The uploaded file name.")
    label: str = Field(description="PNEUMONIA when probability >= threshold, else NORMAL.")
    probability: float = Field(description="Calibrated probability of pneumonia.")
    threshold: float = Field(description="Decision threshold in force (chosen on validation data).")
    probabilities: dict[str, float] = Field(description="Calibrated probability of every label of the model.")
    format: str | None = Field(None, description="Decoded format: jpeg, png, dicom, ...")
    metadata: dict[str, str] = Field(default_factory=dict, description="DICOM header fields, when DICOM.")
    ood_score: float | None = Field(None, description="Distance to the training X-rays (OOD gate), if any.")
    model: ModelRef
    heatmap: Heatmap | None = None


class FileError(BaseModel):
    file: str | None
    error: ErrorDetail


class BatchResponse(BaseModel):
    results: list[PredictionResponse | FileError] = Field(description="One entry per uploaded file, in order.")


_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": text}
    for status, text in (
        (400, "Unreadable input"),
        (413, "Upload over the size limit"),
        (415, "Not a JPEG, PNG or DICOM file"),
        (422, "Malformed request, unusable DICOM, or not a chest X-ray"),
        (503, "Busy: as many requests as the server takes at once are running or waiting (Retry-After)"),
    )
}


# ------------------------------------------------------------------------------------- service


@dataclass
class _Service:
    """What the routes serve: set on ``app.state.pneumo`` by :func:`create_app`, read through :func:`_service`."""

    predictor: Predictor
    explainer: "Explainer | None"
    limits: Limits
    max_batch_files: int
    model_ref: ModelRef
    gate: Backpressure

    def answer(self, prediction: Prediction, name: str | None, data: bytes, heatmap: bool, opacity: float) -> dict:
        body = PredictionResponse(
            file=name,
            label=prediction.label,
            probability=prediction.probability,
            threshold=prediction.threshold,
            probabilities=prediction.probabilities,
            format=prediction.format,
            metadata=prediction.metadata,
            ood_score=prediction.ood_score,
            model=self.model_ref,
        )
        if heatmap:
            body.heatmap = _heatmap(self.explainer, self.predictor, data, prediction.label, opacity)
        return body.model_dump()

    # Both run in a worker thread and read the uploads there, inside the slot: a queued request
    # holds only its spooled upload (on disk past 1 MB), never its bytes in memory.

    def predict_one(self, upload: UploadFile, heatmap: bool, opacity: float) -> dict:
        with self.gate.slot():
            data, name = _read_upload(upload, self.limits.max_bytes), upload.filename
            if isinstance(data, PneumoError):
                raise data
            return self.answer(self.predictor.predict(data, name=name), name, data, heatmap, opacity)

    def predict_batch(self, uploads: list[UploadFile], heatmap: bool, opacity: float) -> dict:
        with self.gate.slot():
            items = [(upload.filename, _read_upload(upload, self.limits.max_bytes)) for upload in uploads]
            readable = [(i, data) for i, (_, data) in enumerate(items) if isinstance(data, bytes)]
            outcomes = self.predictor.predict_many([data for _, data in readable])
            by_index: dict[int, Prediction | PneumoError] = dict(zip([i for i, _ in readable], outcomes, strict=True))
            results: list[dict] = []
            for index, (name, data) in enumerate(items):
                outcome = data if isinstance(data, PneumoError) else by_index[index]
                if isinstance(outcome, PneumoError):
                    results.append({"file": name, "error": outcome.to_dict()})
                    continue
                assert isinstance(data, bytes)
                try:
                    results.append(self.answer(outcome, name, data, heatmap, opacity))
                except PneumoError as err:
                    results.append({"file": name, "error": err.to_dict()})
            return {"results": results}


def _service(request: Request) -> _Service:
    return request.app.state.pneumo


Service = Annotated[_Service, Depends(_service)]

# ------------------------------------------------------------------------------------- routes

#: The API's routes, declared once at import time; :func:`create_app` includes them.
router = APIRouter()


@router.head("/health", include_in_schema=False)  # load balancers probe with HEAD
@router.get("/health", summary="Liveness and the model in use")
def health(service: Service) -> dict[str, Any]:
    return {"status": "ok", "version": pneumo.__version__, "model": service.model_ref.model_dump()}


@router.get("/v1/model", summary="Metadata of the model bundle in use")
def model_info(service: Service) -> dict[str, Any]:
    info = public_model_info(service.predictor.describe())
    info["heatmaps"] = service.explainer is not None
    info["limits"] = {
        "max_upload_bytes": service.limits.max_bytes,
        "max_pixels": service.limits.max_pixels,
        "max_batch_files": service.max_batch_files,
        "max_concurrent": service.gate.workers,
        "max_queue": service.gate.queue,
    }
    return info


@router.post("/v1/predict", summary="Classify one chest X-ray", response_model=PredictionResponse, responses=_ERRORS)
async def predict(
    request: Request,
    service: Service,
    file: Annotated[UploadFile, File(description="JPEG, PNG or DICOM file.")],
    heatmap: Annotated[bool, Query(description="Add a Grad-CAM overlay (base64 PNG).")] = False,
    opacity: Annotated[float, Query(ge=0.0, le=1.0, description="Heatmap opacity.")] = DEFAULT_OPACITY,
) -> dict:
    uploads = (await request.form()).getlist("file")  # FastAPI keeps only the last of repeated fields
    if len(uploads) > 1:
        raise InputTooLargeError(
            f"The request holds {len(uploads)} files under the field 'file'; /v1/predict takes exactly one. "
            "Send several files to /v1/predict/batch under the field 'files'.",
            code="too_many_files",
        )
    with service.gate.admit():
        return await run_in_threadpool(service.predict_one, file, heatmap, opacity)


@router.post(
    "/v1/predict/batch", summary="Classify several chest X-rays", response_model=BatchResponse, responses=_ERRORS
)
async def predict_many(
    service: Service,
    files: Annotated[list[UploadFile], File(description="JPEG, PNG or DICOM files (see /v1/model for how many).")],
    heatmap: Annotated[bool, Query(description="Add a Grad-CAM overlay to every result.")] = False,
    opacity: Annotated[float, Query(ge=0.0, le=1.0, description="Heatmap opacity.")] = DEFAULT_OPACITY,
) -> dict:
    if len(files) > service.max_batch_files:
        raise InputTooLargeError(
            f"The request holds {len(files)} files; send at most {service.max_batch_files} per batch.",
            code="too_many_files",
        )
    with service.gate.admit():
        return await run_in_threadpool(service.predict_batch, files, heatmap, opacity)


# ---------------------------------------------------------------------------------------- app


def create_app(
    bundle: Path | None = None,
    limits: Limits = DEFAULT_LIMITS,
    *,
    max_batch_files: int = DEFAULT_MAX_BATCH_FILES,
    predictor: Predictor | None = None,
    max_concurrent: int | None = None,
    max_queue: int | None = None,
) -> FastAPI:
    """Build the API around one model bundle (loaded now, so a bad bundle fails at start-up).

    Args:
        bundle: model bundle folder; None uses the bundle shipped with pneumo.
        limits: input limits; ``limits.max_bytes`` is the per-file upload limit (413 above it).
        max_batch_files: most files in one ``/v1/predict/batch`` request.
        predictor: an already loaded predictor to serve (its own limits apply to decoding).
        max_concurrent: requests decoded and predicted at once; default from cores and memory
            (:func:`pneumo.api.backpressure.default_workers`).
        max_queue: requests waiting for a slot beyond that; more answer 503 ``server_busy``.

    Raises:
        BundleError: the bundle is missing or broken.
    """
    from pneumo.inference.cam import make_explainer

    predictor = predictor or Predictor(bundle, limits=limits)
    try:
        explainer: Explainer | None = make_explainer(predictor)
    except PneumoError as err:
        log.warning("Heatmaps disabled: %s", err.message)
        explainer = None
    meta = predictor.meta
    workers = max_concurrent or default_workers()
    gate = Backpressure(workers, max_queue if max_queue is not None else 8 * workers)

    # The Swagger UI and ReDoc assets come from the fastapi-offline package: /docs works offline.
    app = FastAPIOffline(
        title="pneumo",
        version=pneumo.__version__,
        description=(
            "Pneumonia detection on pediatric chest X-rays (JPEG, PNG, DICOM). Decision support for frontal "
            'chest X-rays of children, not a diagnosis. Errors answer {"error": {"code", "message"}}.'
        ),
    )
    app.state.pneumo = _Service(
        predictor,
        explainer,
        limits,
        max_batch_files,
        ModelRef(name=meta.name, version=meta.version, arch=meta.arch),
        gate,
    )
    app.include_router(router)
    _install_error_handlers(app)
    app.add_middleware(BodyLimit, caps=_body_caps(limits.max_bytes + MULTIPART_OVERHEAD, max_batch_files))
    app.add_middleware(CanonicalPath)
    return app


def _body_caps(file_cap: int, max_batch_files: int) -> dict[str, int]:
    """The body cap of every route that takes a body, read from its declaration (no table of paths).

    A route with a list-of-files parameter may carry ``max_batch_files`` files, any other route
    with a body one; routes without a body keep the middleware's small default.
    """
    caps: dict[str, int] = {}
    for route in router.routes:  # the API's routes (an included router is not listed in app.routes)
        if isinstance(route, APIRoute) and route.dependant.body_params:
            many = any(get_origin(param.field_info.annotation) is list for param in route.dependant.body_params)
            caps[route.path] = file_cap * (max_batch_files if many else 1)
    return caps


def _read_upload(upload: UploadFile, max_bytes: int) -> bytes | PneumoError:
    """The upload's bytes (blocking: in a worker thread), at most one byte past the limit; too large: its error."""
    upload.file.seek(0)
    data = upload.file.read(max_bytes + 1)
    if len(data) > max_bytes:
        return InputTooLargeError(
            f"{upload.filename or 'The upload'} is over the {max_bytes / 2**20:g} MB limit.", code="file_too_large"
        )
    return data


def _heatmap(explainer: "Explainer | None", predictor: Predictor, data: bytes, label: str, opacity: float) -> Heatmap:
    if explainer is None:
        raise ExplainUnavailableError("Heatmaps are not available for this model.")
    explanation = explainer.explain(predictor.decode(data), label)
    overlay = explanation.overlay(opacity)
    return Heatmap(
        png_base64=base64.b64encode(png_bytes(overlay)).decode("ascii"),
        target_label=explanation.target_label,
        layer=explanation.layer,
        width=overlay.width,
        height=overlay.height,
        opacity=opacity,
    )


def _install_error_handlers(app: FastAPI) -> None:
    """Answer every failure with the same ``{"error": {"code", "message"}}`` body."""

    async def pneumo_error(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, PneumoError)
        headers = {"Retry-After": str(exc.retry_after)} if isinstance(exc, ServerBusyError) else None
        return error_response(exc.http_status, exc.code, exc.message, headers)

    async def validation_error(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        problems = "; ".join(
            f"{'.'.join(str(part) for part in error.get('loc', ()))}: {error.get('msg', 'invalid')}"
            for error in exc.errors()
        )
        return error_response(422, "invalid_request", f"The request is malformed ({problems}). See /docs.")

    async def http_error(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        if exc.status_code == 400:  # Starlette's form parser: a body that is not valid multipart (docs: 422)
            message = f"The request body is not valid multipart/form-data ({exc.detail}). See /docs."
            return error_response(422, "invalid_request", message)
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, str(exc.detail), getattr(exc, "headers", None))

    async def unexpected_error(_request: Request, exc: Exception) -> JSONResponse:
        log.error("Unexpected error answering a request", exc_info=exc)
        return error_response(500, "internal_error", "The server failed to answer this request; the error was logged.")

    app.add_exception_handler(PneumoError, pneumo_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, unexpected_error)
