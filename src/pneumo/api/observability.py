"""Request ids, structured JSON logs and the per-request metrics of the API.

:class:`RequestContext` is the outermost middleware: it gives every request an id (the
client's ``X-Request-ID`` when it is a short token, else a new one), returns it in the
``X-Request-ID`` response header, sets it for every log line written while the request is
handled (worker threads included; :class:`RequestIdFilter` stamps it on each record), and, when
the answer is complete, writes one JSON access line and counts the request in
:class:`~pneumo.api.metrics.Metrics`. :class:`JsonFormatter` writes each log record as one JSON
object, with the request id and any ``extra`` fields.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pneumo.api.metrics import Metrics
from pneumo.api.middleware import error_response

#: The id of the request being handled, for log lines (None outside a request).
REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("pneumo_request_id", default=None)
REQUEST_ID_HEADER = "X-Request-ID"
#: Bytes of an unread request body of declared length the server still reads to its end after answering early.
DRAIN_LIMIT = 64 * 2**20
_CLIENT_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}

access_log = logging.getLogger("pneumo.api.access")
log = logging.getLogger("pneumo.api")


class RequestIdFilter(logging.Filter):
    """Stamps each record with the id of the request being handled when it was logged (a handler's filter)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = REQUEST_ID.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, request id, and the record's ``extra`` fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None) or REQUEST_ID.get()
        if request_id:
            entry["request_id"] = request_id
        for key, value in record.__dict__.items():
            if key not in _STANDARD and key not in entry:
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def log_config(level: str = "info", json_lines: bool = True) -> dict[str, Any]:
    """A ``logging.config.dictConfig`` for ``pneumo serve``: pneumo's and uvicorn's loggers, JSON or text."""
    formatter = {"()": JsonFormatter} if json_lines else {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}
    handler = {
        "class": "logging.StreamHandler",
        "formatter": "default",
        "filters": ["request_id"],
        "stream": "ext://sys.stderr",
    }
    loggers = {name: {"handlers": ["default"], "level": level.upper(), "propagate": False} for name in ("pneumo",)}
    loggers |= {name: {"handlers": ["default"], "level": "INFO", "propagate": False} for name in ("uvicorn",)}
    loggers["uvicorn.access"] = {"handlers": [], "level": "WARNING", "propagate": False}  # our access line instead
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"default": formatter},
        "filters": {"request_id": {"()": RequestIdFilter}},
        "handlers": {"default": handler},
        "loggers": loggers,
    }


class RequestContext:
    """Pure ASGI middleware: request id, one access log line and the request's metrics.

    Args:
        app: the application.
        metrics: where requests are counted; None counts nothing.
        route_of: the route template a request matched (``other`` when none), for metric labels.
    """

    def __init__(self, app: ASGIApp, metrics: Metrics | None, route_of: Callable[[Scope], str]) -> None:
        self.app, self.metrics, self.route_of = app, metrics, route_of

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        offered = headers.get(REQUEST_ID_HEADER, "")
        request_id = offered if _CLIENT_ID.fullmatch(offered) else uuid.uuid4().hex
        # An answer sent before a large or endless body is in (401, 413, 408) closes the connection: left
        # open, the server reads and discards the rest, hundreds of MB for a flood, on its event loop. A
        # body of known, moderate length is read to its end, so its client gets the JSON answer.
        declared = headers.get("content-length", "")
        body_pending = declared not in ("", "0") or "transfer-encoding" in headers
        close_if_pending = not declared.isdigit() or int(declared) > DRAIN_LIMIT

        async def tracked_receive() -> Message:
            nonlocal body_pending
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_pending = False
            return message

        token = REQUEST_ID.set(request_id)
        start = time.perf_counter()
        status, error_body, is_json, started = 500, bytearray(), False, False

        async def send_with_id(message: Message) -> None:
            nonlocal status, is_json, started
            if message["type"] == "http.response.start":
                started = True
                status = int(message["status"])
                answer = MutableHeaders(scope=message)
                answer[REQUEST_ID_HEADER] = request_id
                if body_pending and close_if_pending:
                    answer["Connection"] = "close"
                is_json = answer.get("content-type", "").startswith("application/json")
            elif message["type"] == "http.response.body" and status >= 400 and is_json and len(error_body) < 8192:
                error_body.extend(message.get("body", b"")[:8192])
            await send(message)

        try:
            await self.app(scope, tracked_receive, send_with_id)
        except Exception:  # a bug: answered here, inside the id and the metrics, not by Starlette's outer handler
            log.error("Unexpected error answering a request", exc_info=True)
            if not started:
                message = "The server failed to answer this request; the error was logged."
                await error_response(500, "internal_error", message)(scope, tracked_receive, send_with_id)
        finally:
            seconds = time.perf_counter() - start
            code = _error_code(bytes(error_body)) if status >= 400 else None
            route = self.route_of(scope)
            if self.metrics is not None:
                self.metrics.observe_request(route, str(scope["method"]), status, seconds, code)
            client = scope.get("client")
            access_log.info(
                "%s %s %d",
                scope["method"],
                route,
                status,
                extra={
                    "request_id": request_id,
                    "event": "request",
                    "method": scope["method"],
                    "route": route,
                    "status": status,
                    "error_code": code,
                    "duration_ms": round(seconds * 1000, 1),
                    "client": client[0] if client else None,
                    "principal": (scope.get("state") or {}).get("principal"),
                },
            )
            REQUEST_ID.reset(token)


def _error_code(body: bytes) -> str | None:
    try:
        code = json.loads(body)["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return "unknown"
    return str(code) if isinstance(code, str) else "unknown"
