"""The API's two pure ASGI middlewares: body caps enforced as bytes stream in, canonical paths.

Pure ASGI (not Starlette's ``BaseHTTPMiddleware``) so a body can be refused from its
``Content-Length`` before a byte is read, and a chunked body cut off at the cap.
"""

from __future__ import annotations

from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """The API's one error body: ``{"error": {"code", "message"}}``."""
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


class BodyTooLarge(Exception):
    """Raised into the application when the body it is reading passes the cap."""


class BodyLimit:
    """Pure ASGI middleware: refuse a request body over its path's cap with a JSON 413, as it streams in.

    A declared ``Content-Length`` over the cap is refused before a byte is read; a chunked body
    is counted while it is received and cut off at the cap (whatever the application answered
    to the broken body is replaced by the 413). Paths without a cap get ``default_cap``.
    """

    def __init__(self, app: ASGIApp, caps: dict[str, int], default_cap: int = 64 * 1024) -> None:
        self.app = app
        self.caps = caps
        self.default_cap = default_cap

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        cap = self.caps.get(str(scope["path"]).rstrip("/"), self.default_cap)
        refusal = error_response(
            413, "request_too_large", f"The request body is over this endpoint's {cap / 2**20:.1f} MB limit."
        )
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > cap:
            await refusal(scope, receive, send)
            return
        received, exceeded, started = 0, False, False

        async def limited_receive() -> Message:
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > cap:
                    exceeded = True
                    raise BodyTooLarge
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if exceeded:
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not exceeded:
                raise
        if exceeded and not started:
            await refusal(scope, receive, send)


class CanonicalPath:
    """Pure ASGI middleware: ``/v1/predict/`` is ``/v1/predict`` (Starlette would answer a 307 with no body)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = str(scope.get("path", ""))
        if scope["type"] == "http" and len(path) > 1 and path.endswith("/"):
            scope = {**scope, "path": path.rstrip("/") or "/", "raw_path": None}
        await self.app(scope, receive, send)
