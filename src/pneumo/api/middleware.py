"""The API's body middleware: caps and time limits enforced as bytes stream in, and canonical paths.

Pure ASGI (not Starlette's ``BaseHTTPMiddleware``) so a body can be refused from its
``Content-Length`` before a byte is read, a chunked body cut off at the cap, and a body that
trickles in (one byte every few seconds: a slow-body attack holds a connection and a parser
forever) cut off at its time limit.
"""

from __future__ import annotations

import asyncio
import threading
import time

from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """The API's one error body: ``{"error": {"code", "message"}}``."""
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


class BodyRefused(Exception):
    """Raised into the application when the body it is reading passes a cap or a time limit."""


class InflightBytes:
    """Bytes of request bodies being received at once, across requests, under a ceiling.

    Uploads are spooled (to disk past 1 MB each) while they are parsed; without a ceiling,
    hundreds of slow uploads at once fill the disk and memory of the spool even though each one
    is under its own cap.
    """

    def __init__(self, ceiling: int) -> None:
        self.ceiling = ceiling
        self._used = 0
        self._lock = threading.Lock()

    def take(self, amount: int) -> bool:
        with self._lock:
            if self._used + amount > self.ceiling:
                return False
            self._used += amount
            return True

    def give(self, amount: int) -> None:
        with self._lock:
            self._used -= amount


class BodyLimit:
    """Pure ASGI middleware: a request body over its path's cap, too slow, or over the server's in-flight
    ceiling is refused with a JSON error as it streams in.

    A declared ``Content-Length`` over the cap is refused before a byte is read (413); a chunked
    body is counted while it is received and cut off at the cap. A body whose next chunk does not
    arrive within ``idle_timeout`` seconds, or that is not complete within ``deadline`` seconds,
    is cut off with 408 ``request_timeout`` and the connection closed. Whatever the application
    answered to the broken body is replaced by the refusal. Paths without a cap get ``default_cap``.
    """

    def __init__(
        self,
        app: ASGIApp,
        caps: dict[str, int],
        default_cap: int = 64 * 1024,
        *,
        idle_timeout: float = 15.0,
        deadline: float = 120.0,
        inflight: InflightBytes | None = None,
    ) -> None:
        self.app = app
        self.caps = caps
        self.default_cap = default_cap
        self.idle_timeout, self.deadline = idle_timeout, deadline
        self.inflight = inflight

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        cap = self.caps.get(str(scope["path"]).rstrip("/"), self.default_cap)
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > cap:
            await self._refusal(413, cap)(scope, receive, send)
            return
        reserved = int(declared) if declared.isdigit() else 0
        if self.inflight is not None and not self.inflight.take(reserved):
            await self._refusal(503, cap)(scope, receive, send)
            return
        received, refusal, started = 0, 0, False
        ends = time.monotonic() + self.deadline

        async def limited_receive() -> Message:
            nonlocal received, refusal, reserved
            left = ends - time.monotonic()
            try:
                message = await asyncio.wait_for(receive(), min(self.idle_timeout, max(left, 0.001)))
            except TimeoutError:
                refusal = 408
                raise BodyRefused from None
            if message["type"] == "http.request":
                chunk = len(message.get("body", b""))
                received += chunk
                if received > cap:
                    refusal = 413
                    raise BodyRefused
                if self.inflight is not None and received > reserved:  # chunked: reserve as it arrives
                    if not self.inflight.take(received - reserved):
                        refusal = 503
                        raise BodyRefused
                    reserved = received
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if refusal:
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not refusal:
                raise
        finally:
            if self.inflight is not None:
                self.inflight.give(reserved)
        if refusal and not started:
            await self._refusal(refusal, cap)(scope, receive, send)

    def _refusal(self, status: int, cap: int) -> JSONResponse:
        # A slow body's connection is done: waiting for the rest would hold it as long as the client likes.
        # Other refusals leave the choice to RequestContext (read a moderate rest, close on a flood).
        close = {"Connection": "close"}
        if status == 408:
            message = (
                f"The request body arrived too slowly (no data for {self.idle_timeout:g} s, or not complete within "
                f"{self.deadline:g} s). Send the request again on a working connection."
            )
            return error_response(408, "request_timeout", message, close)
        if status == 503:
            message = "The server is receiving as many uploads as it holds at once. Retry in a few seconds."
            return error_response(503, "server_busy", message, {"Retry-After": "2"})
        message = f"The request body is over this endpoint's {cap / 2**20:.1f} MB limit."
        return error_response(413, "request_too_large", message)


class CanonicalPath:
    """Pure ASGI middleware: ``/v1/predict/`` is ``/v1/predict`` (Starlette would answer a 307 with no body)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = str(scope.get("path", ""))
        if scope["type"] == "http" and len(path) > 1 and path.endswith("/"):
            scope = {**scope, "path": path.rstrip("/") or "/", "raw_path": None}
        await self.app(scope, receive, send)
