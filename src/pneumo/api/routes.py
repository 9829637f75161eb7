"""The HTTP API a hospital system calls (FastAPI): a thin layer over the one :class:`Predictor`.

Endpoints: ``GET|HEAD /health``, ``GET /v1/model``, ``POST /v1/predict`` (one file in the multipart
field ``file``, ``?heatmap=true`` adds a Grad-CAM overlay as a base64 PNG), ``POST
/v1/predict/batch`` (multipart field ``files``, one result or error object per file, in order)
and ``GET /metrics`` (Prometheus). The routes are declared once on :data:`router`, each with the
API-key scope it needs; :func:`create_app` binds them to a model. OpenAPI docs at ``/docs`` and
``/redoc``, served from local assets (fastapi-offline); the reference text is in ``docs/api.md``.
A trailing slash names the same route (no redirect).

Every request passes, outermost first: request id, access log and metrics
(:mod:`~pneumo.api.observability`); security headers, ``Host`` and ``Origin`` checks and CORS
(:mod:`~pneumo.api.security`); the API key (:mod:`~pneumo.api.auth`), before a byte of the body
is read; body caps, time limits and the in-flight ceiling (:mod:`~pneumo.api.middleware`); the
multipart parser's limits on files, fields and field size, enforced while it parses (FastAPI's
``form_limits``); then backpressure and the answer deadline (:mod:`~pneumo.api.backpressure`).
Every error answers ``{"error": {"code", "message"}}`` (:mod:`~pneumo.api.errors`).
"""

# No ``from __future__ import annotations`` here: FastAPI reads the endpoints' annotations at run
# time, and some of them close over create_app's arguments.
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, get_origin

from fastapi import APIRouter, Depends, FastAPI, File, Query, Request, Response, UploadFile
from fastapi.routing import APIRoute
from fastapi.security import HTTPBearer
from fastapi_offline import FastAPIOffline
from starlette.middleware.cors import CORSMiddleware
from starlette.types import Scope

import pneumo
from pneumo.api.auth import AuthGuard, KeyStore
from pneumo.api.backpressure import Backpressure, default_workers
from pneumo.api.errors import install_error_handlers
from pneumo.api.metrics import CONTENT_TYPE, Metrics
from pneumo.api.middleware import BodyLimit, CanonicalPath, InflightBytes
from pneumo.api.observability import REQUEST_ID_HEADER, RequestContext
from pneumo.api.schemas import ERRORS, BatchResponse, ModelRef, PredictionResponse
from pneumo.api.security import HostGuard, OriginGuard, SecurityHeaders
from pneumo.api.service import Service
from pneumo.api.settings import ApiSettings
from pneumo.core.decode import DEFAULT_LIMITS, Limits
from pneumo.core.errors import PneumoError
from pneumo.inference.explain import DEFAULT_OPACITY
from pneumo.inference.model_info import public_model_info
from pneumo.inference.predictor import Predictor

if TYPE_CHECKING:
    from pneumo.inference.explain import Explainer

log = logging.getLogger(__name__)

#: Room for the multipart boundaries and part headers around each file in a request body.
MULTIPART_OVERHEAD = 16 * 1024
#: Most files one batch request may carry (the body cap is this many times the file limit).
DEFAULT_MAX_BATCH_FILES = 16
#: The OpenAPI extension naming the API-key scope a route needs (read by :func:`route_scopes`).
SCOPE_KEY = "x-pneumo-scope"

# Declares the bearer scheme in the OpenAPI document ("Authorize" in /docs); AuthGuard enforces it.
_bearer = HTTPBearer(auto_error=False, description="An API key: `pneumo serve keys add NAME --scope SCOPE`.")


def _needs(scope: str) -> dict[str, Any]:
    """What a route declares to need ``scope``: the OpenAPI extension and the bearer scheme."""
    return {"openapi_extra": {SCOPE_KEY: scope}, "dependencies": [Depends(_bearer)]}


def _service(request: Request) -> Service:
    return request.app.state.pneumo


ServiceDep = Annotated[Service, Depends(_service)]

#: The API's routes, declared once at import time; :func:`create_app` includes them.
router = APIRouter()


@router.head("/health", include_in_schema=False)  # load balancers probe with HEAD
@router.get("/health", summary="Liveness (and, to an authenticated caller or without keys, the model in use)")
def health(request: Request, service: ServiceDep) -> dict[str, Any]:
    if service.auth and not request.scope.get("state", {}).get("principal"):
        return {"status": "ok"}  # anyone may probe liveness; what runs here is for key holders
    return {"status": "ok", "version": pneumo.__version__, "model": service.model_ref.model_dump()}


@router.get("/v1/model", summary="Metadata of the model bundle in use", **_needs("read"))
def model_info(service: ServiceDep) -> dict[str, Any]:
    info = public_model_info(service.predictor.describe())
    info["heatmaps"] = service.explainer is not None
    info["limits"] = {
        "max_upload_bytes": service.limits.max_bytes,
        "max_pixels": service.limits.max_pixels,
        "max_batch_files": service.max_batch_files,
        "max_concurrent": service.gate.workers,
        "max_queue": service.gate.queue,
        "deadline_seconds": service.gate.deadline,
    }
    return info


@router.get("/metrics", summary="Prometheus metrics: traffic, refusals, queue depth, drift", **_needs("read"))
def metrics(service: ServiceDep) -> Response:
    if service.metrics is None:
        return Response(b"", media_type=CONTENT_TYPE)
    return Response(service.metrics.exposition(), media_type=CONTENT_TYPE)


@router.post(
    "/v1/predict",
    summary="Classify one chest X-ray",
    response_model=PredictionResponse,
    responses=ERRORS,
    form_limits={"max_files": 1},  # a second file is refused as soon as its part header arrives
    **_needs("predict"),
)
async def predict(
    request: Request,
    service: ServiceDep,
    file: Annotated[UploadFile, File(description="JPEG, PNG or DICOM file.")],
    heatmap: Annotated[bool, Query(description="Add a Grad-CAM overlay (base64 PNG).")] = False,
    opacity: Annotated[float, Query(ge=0.0, le=1.0, description="Heatmap opacity.")] = DEFAULT_OPACITY,
) -> dict:
    return await service.gate.run(service.predict_one, file, heatmap, opacity, client=_client(request))


@router.post(
    "/v1/predict/batch",
    summary="Classify several chest X-rays",
    response_model=BatchResponse,
    responses=ERRORS,
    **_needs("predict"),
)
async def predict_many(
    request: Request,
    service: ServiceDep,
    files: Annotated[list[UploadFile], File(description="JPEG, PNG or DICOM files (see /v1/model for how many).")],
    heatmap: Annotated[bool, Query(description="Add a Grad-CAM overlay to every result.")] = False,
    opacity: Annotated[float, Query(ge=0.0, le=1.0, description="Heatmap opacity.")] = DEFAULT_OPACITY,
) -> dict:
    return await service.gate.run(service.predict_batch, files, heatmap, opacity, client=_client(request))


def _client(request: Request) -> str:
    """Who is asking, for fair scheduling: the API key's name, else the client's address."""
    principal = request.scope.get("state", {}).get("principal")
    if principal:
        return f"key:{principal}"
    return f"addr:{request.client.host}" if request.client else "addr:?"


def create_app(
    bundle: Path | None = None,
    limits: Limits = DEFAULT_LIMITS,
    *,
    max_batch_files: int = DEFAULT_MAX_BATCH_FILES,
    predictor: Predictor | None = None,
    max_concurrent: int | None = None,
    max_queue: int | None = None,
    settings: ApiSettings | None = None,
    processes: int = 1,
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
        settings: authentication, allowed hosts and origins, time and parser limits; default
            :class:`ApiSettings` (no keys, loopback host names only, no cross-origin caller).
        processes: server processes sharing this machine (``pneumo serve --workers``), for the default
            ``max_concurrent``.

    Raises:
        BundleError: the bundle is missing or broken.
        KeyFileError: ``settings.api_keys`` names a key file that is missing, malformed or empty.
    """
    from pneumo.inference.cam import make_explainer

    settings = settings or ApiSettings()
    keys = KeyStore(settings.api_keys) if settings.api_keys is not None else None
    predictor = predictor or Predictor(bundle, limits=limits)
    try:
        explainer: Explainer | None = make_explainer(predictor)
    except PneumoError as err:
        log.warning("Heatmaps disabled: %s", err.message)
        explainer = None
    meta = predictor.meta
    workers = max_concurrent or default_workers(processes=processes)
    metrics = Metrics(meta.ood.threshold if meta.ood else None, positive_label=meta.labels[-1])
    gate = Backpressure(
        workers,
        max_queue if max_queue is not None else 4 * workers,
        queue_timeout=settings.queue_timeout,
        deadline=settings.deadline,
        on_change=metrics.admitted.set,
    )

    # The Swagger UI and ReDoc assets come from the fastapi-offline package: /docs works offline.
    app = FastAPIOffline(
        title="pneumo",
        version=pneumo.__version__,
        description=(
            "Pneumonia detection on pediatric chest X-rays (JPEG, PNG, DICOM). Decision support for frontal "
            'chest X-rays of children, not a diagnosis. Errors answer {"error": {"code", "message"}}.'
        ),
    )
    app.state.pneumo = Service(
        predictor,
        explainer,
        limits,
        max_batch_files,
        ModelRef(name=meta.name, version=meta.version, arch=meta.arch),
        gate,
        metrics,
        auth=keys is not None,
    )
    form_limits = {
        "max_files": max_batch_files,
        "max_fields": settings.max_form_fields,
        "max_part_size": settings.max_field_bytes,
    }
    app.include_router(router, form_limits=form_limits)  # type: ignore[arg-type]
    install_error_handlers(app, max_batch_files)
    caps = _body_caps(limits.max_bytes + MULTIPART_OVERHEAD, max_batch_files)
    _install_middleware(app, settings, keys, metrics, caps)
    return app


def _install_middleware(
    app: FastAPI, settings: ApiSettings, keys: KeyStore | None, metrics: Metrics, caps: dict[str, int]
) -> None:
    """The middleware stack, innermost first (Starlette wraps each new one around the previous ones)."""
    inflight = InflightBytes(settings.max_inflight_bytes)
    app.add_middleware(
        BodyLimit,
        caps=caps,
        inflight=inflight,
        idle_timeout=settings.body_idle_timeout,
        deadline=settings.body_deadline,
    )
    if keys is not None:
        app.add_middleware(AuthGuard, store=keys, scopes=route_scopes())
    app.add_middleware(CanonicalPath)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", REQUEST_ID_HEADER],
            expose_headers=[REQUEST_ID_HEADER, "Retry-After"],
        )
    app.add_middleware(OriginGuard, allowed_origins=settings.cors_origins)
    app.add_middleware(HostGuard, allowed_hosts=settings.allowed_hosts)
    app.add_middleware(SecurityHeaders)
    app.add_middleware(RequestContext, metrics=metrics, route_of=_route_of(app))


def route_scopes() -> dict[str, str]:
    """The API-key scope each route needs, read from its declaration (:data:`SCOPE_KEY`)."""
    return {
        route.path: route.openapi_extra[SCOPE_KEY]
        for route in router.routes
        if isinstance(route, APIRoute) and route.openapi_extra and SCOPE_KEY in route.openapi_extra
    }


def _route_of(app: FastAPI) -> Any:
    """A function naming the route template a request matched (``other`` when none): the metrics' label."""
    from starlette.routing import Match

    def route_of(scope: Scope) -> str:
        path = str(scope.get("path", "")).rstrip("/") or "/"
        for route in (*router.routes, *app.router.routes):  # included routes are not listed in app.routes
            match, _ = route.matches({**scope, "path": path})
            if match is not Match.NONE:
                return str(getattr(route, "path", "other"))
        return "other"

    return route_of


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
