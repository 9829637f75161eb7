"""Browser-facing defences of the API: trusted Host names, cross-origin requests refused, security headers.

- **Host** (:class:`HostGuard`): a request whose ``Host`` header is not an allowed name is
  refused (400 ``invalid_host``). A web page that rebinds its own DNS name to 127.0.0.1 (DNS
  rebinding) reaches a workstation's API with its own name in ``Host``; it gets nothing.
  Starlette's ``TrustedHostMiddleware`` does the same check but answers in plain text, and every
  error of this API is JSON, hence the few lines here.
- **Origin** (:class:`OriginGuard`): a browser sends ``Origin`` with every cross-origin POST. A
  multipart POST is a "simple" request, sent without a CORS preflight, so CORS alone only hides
  the answer: the upload was still processed. Any request whose ``Origin`` is neither this
  server nor an allowed CORS origin is refused (403 ``origin_not_allowed``) before its body is
  read. Allowed origins (``--cors-origin``) also get CORS headers (Starlette's
  ``CORSMiddleware``); none are allowed by default.
- **Headers** (:class:`SecurityHeaders`): ``nosniff``, no framing, no referrer, ``no-store``
  (answers describe patients' images) and a Content-Security-Policy (``default-src 'none'`` for
  JSON, the docs pages' own assets for ``/docs`` and ``/redoc``).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from urllib.parse import urlsplit

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pneumo.api.middleware import error_response

#: Host names a server bound to loopback answers to by default.
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def host_name(value: str) -> str:
    """The name part of a ``Host`` header (``[::1]:8000`` -> ``::1``), lower-case."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:].split("]", 1)[0]
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def host_allowed(name: str, patterns: Sequence[str]) -> bool:
    """Whether ``name`` matches one of ``patterns`` (exact names, ``*.example.org``, or ``*`` for any)."""
    return any(pattern == "*" or fnmatch.fnmatchcase(name, pattern.lower()) for pattern in patterns)


class HostGuard:
    """Pure ASGI middleware: refuse a request whose ``Host`` is not allowed (400 ``invalid_host``)."""

    def __init__(self, app: ASGIApp, allowed_hosts: Sequence[str]) -> None:
        self.app, self.allowed = app, tuple(allowed_hosts)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and "*" not in self.allowed:
            name = host_name(Headers(scope=scope).get("host", ""))
            if not host_allowed(name, self.allowed):
                response = error_response(
                    400,
                    "invalid_host",
                    f"This server does not answer to the host name {name[:100]!r}. Its operator allows names with "
                    "`pneumo serve --allowed-host NAME`.",
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class OriginGuard:
    """Pure ASGI middleware: refuse a cross-origin request (``Origin`` not this server's, not allowed) with 403.

    Preflights (``OPTIONS``) pass through to the CORS middleware, which answers them.
    """

    def __init__(self, app: ASGIApp, allowed_origins: Sequence[str]) -> None:
        self.app = app
        self.allowed = {origin.rstrip("/").lower() for origin in allowed_origins}

    def _same_origin(self, origin: str, scope: Scope) -> bool:
        parts = urlsplit(origin)
        return bool(parts.netloc) and parts.netloc.lower() == Headers(scope=scope).get("host", "").strip().lower()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        origin = Headers(scope=scope).get("origin") if scope["type"] == "http" else None
        if origin is not None and scope["method"] != "OPTIONS" and "*" not in self.allowed:
            clean = origin.strip().rstrip("/").lower()
            if clean not in self.allowed and not self._same_origin(clean, scope):
                response = error_response(
                    403,
                    "origin_not_allowed",
                    f"Requests from web pages of {origin[:100]!r} are not allowed. The server's operator allows an "
                    "origin with `pneumo serve --cors-origin URL`.",
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


_JSON_POLICY = "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
# Swagger UI and ReDoc pages start their scripts inline and load their assets from this server.
_DOCS_POLICY = (
    "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; worker-src 'self' blob:; frame-ancestors 'none'; base-uri 'none'"
)
_DOCS_PATHS = ("/docs", "/redoc", "/docs/oauth2-redirect")


class SecurityHeaders:
    """Pure ASGI middleware: the headers that keep a browser from misusing an answer, on every response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        policy = _DOCS_POLICY if scope.get("path") in _DOCS_PATHS else _JSON_POLICY

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers.setdefault("X-Content-Type-Options", "nosniff")
                headers.setdefault("X-Frame-Options", "DENY")
                headers.setdefault("Referrer-Policy", "no-referrer")
                headers.setdefault("Cache-Control", "no-store")
                headers.setdefault("Cross-Origin-Resource-Policy", "same-origin")
                headers.setdefault("Content-Security-Policy", policy)
            await send(message)

        await self.app(scope, receive, send_with_headers)
