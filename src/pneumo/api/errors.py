"""How every failure of the API answers: the same ``{"error": {"code", "message"}}`` body, never a traceback."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from pneumo.api.middleware import error_response
from pneumo.core.errors import PneumoError, ServerBusyError

log = logging.getLogger("pneumo.api")

_HTTP_CODES = {400: "invalid_request", 404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}


def _multipart_refusal(request: Request, detail: str, max_batch_files: int) -> JSONResponse | None:
    """The 413 for a form over the parser's limits (Starlette says so in a 400 detail), or None."""
    if detail.startswith("Too many files"):
        if request.url.path.rstrip("/") == "/v1/predict":
            message = (
                "The request holds more than one file; /v1/predict takes exactly one under the field 'file'. "
                "Send several files to /v1/predict/batch under the field 'files'."
            )
        else:
            message = f"The request holds more than {max_batch_files} files; send at most {max_batch_files} per batch."
        return error_response(413, "too_many_files", message)
    if detail.startswith("Too many fields"):
        message = "The request holds more text fields than this endpoint reads (it takes files; options are query)."
        return error_response(413, "too_many_fields", message)
    if "exceeded maximum size" in detail:
        message = f"A text field of the request is over the size this endpoint reads ({detail})."
        return error_response(413, "field_too_large", message)
    return None


def install_error_handlers(app: FastAPI, max_batch_files: int) -> None:
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

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        if exc.status_code == 400:  # Starlette's form parser: over its limits, or not valid multipart (docs: 422)
            refusal = _multipart_refusal(request, str(exc.detail), max_batch_files)
            if refusal is not None:
                return refusal
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
