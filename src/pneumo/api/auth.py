"""API keys: stored hashed in a file the operator names, sent as ``Authorization: Bearer``, with scopes.

A key is ``pnk_`` followed by 43 random URL-safe characters (256 bits from :mod:`secrets`). The
key file keeps only its SHA-256 (a key that random cannot be guessed from its hash, so a slow
password hash would only cost CPU on every request without adding safety), with a name and
scopes::

    {"format": "pneumo-api-keys/1",
     "keys": [{"name": "pacs-bridge", "scopes": ["predict"], "sha256": "9f2c...", "created": "2026-..."}]}

Scopes: ``predict`` (``POST /v1/predict``, ``/v1/predict/batch``) and ``read`` (``GET /v1/model``,
``GET /metrics``). :class:`AuthGuard` checks the key and the scope before a byte of the body is
read, so an unauthenticated client cannot make the server parse an upload. ``pneumo serve keys
add NAME --scope predict --file KEYS`` creates a key and prints it once.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import stat
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from pneumo.api.middleware import error_response
from pneumo.core.errors import PneumoError

#: Every scope a key may hold.
SCOPES = ("predict", "read")
KEY_PREFIX = "pnk_"
_FORMAT = "pneumo-api-keys/1"
_MAX_FILE_BYTES = 1 << 20  # 1 MB: thousands of keys; a larger "key file" is a mistake
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.@")


class KeyFileError(PneumoError):
    """The API key file is missing, unreadable or malformed, or a key request is invalid."""

    code = "key_file_error"


@dataclass(frozen=True)
class ApiKey:
    """One key as stored: its name, scopes and hash (never the key itself)."""

    name: str
    scopes: frozenset[str]
    sha256: str
    created: str = ""


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()


def _check_name(name: str) -> str:
    if not name or len(name) > 64 or not set(name) <= _NAME_CHARS:
        raise KeyFileError(
            f"Key name {name!r} is not allowed: use 1-64 letters, digits, '-', '_', '.' or '@' (e.g. pacs-bridge)."
        )
    return name


def _check_scopes(scopes: Iterable[str]) -> frozenset[str]:
    chosen = frozenset(scopes)
    unknown = chosen - set(SCOPES)
    if not chosen or unknown:
        raise KeyFileError(
            f"Scopes {sorted(chosen)} are not valid: give one or more of {', '.join(SCOPES)} (--scope predict)."
        )
    return chosen


def read_key_file(path: Path) -> list[ApiKey]:
    """The keys stored in ``path``.

    Raises:
        KeyFileError: the file is absent, not a regular file, over 1 MB, or not a key file.
    """
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):
            raise KeyFileError(f"The API key file {path} is not a regular file; give the file `keys add` wrote.")
        if info.st_size > _MAX_FILE_BYTES:
            raise KeyFileError(f"The API key file {path} is {info.st_size} bytes, over 1 MB: not a key file.")
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise KeyFileError(
            f"The API key file {path} does not exist. Create a key: pneumo serve keys add NAME --scope predict "
            f"--file {path}"
        ) from None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:
        raise KeyFileError(f"The API key file {path} cannot be read as JSON ({err}).") from None
    try:
        if document.get("format") != _FORMAT:
            raise ValueError(f"format is {document.get('format')!r}, expected {_FORMAT!r}")
        return [
            ApiKey(
                name=_check_name(str(entry["name"])),
                scopes=_check_scopes(entry["scopes"]),
                sha256=_check_hash(entry["sha256"]),
                created=str(entry.get("created", "")),
            )
            for entry in document["keys"]
        ]
    except (AttributeError, KeyError, TypeError, ValueError, KeyFileError) as err:
        detail = err.message if isinstance(err, KeyFileError) else str(err)
        raise KeyFileError(f"The API key file {path} is malformed ({detail}).") from None


def _check_hash(value: object) -> str:
    if not isinstance(value, str) or len(value) != 64 or not set(value) <= set("0123456789abcdef"):
        raise ValueError("sha256 must be 64 lowercase hex digits")
    return value


def write_key_file(path: Path, keys: Iterable[ApiKey]) -> None:
    """Write ``keys`` to ``path`` (mode 0600), through a temporary file and a rename."""
    document = {
        "format": _FORMAT,
        "keys": [
            {"name": key.name, "scopes": sorted(key.scopes), "sha256": key.sha256, "created": key.created}
            for key in keys
        ],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write(json.dumps(document, indent=2) + "\n")
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def add_key(path: Path, name: str, scopes: Iterable[str]) -> str:
    """Create a key named ``name`` with ``scopes`` in ``path`` (created if absent); returns the key, shown once.

    Raises:
        KeyFileError: bad name or scopes, a key of that name exists, or the file is malformed.
    """
    keys = read_key_file(path) if path.exists() else []
    _check_name(name)
    if any(key.name == name for key in keys):
        raise KeyFileError(f"A key named {name!r} exists in {path}; remove it first or choose another name.")
    token = KEY_PREFIX + secrets.token_urlsafe(32)
    created = datetime.now(UTC).isoformat(timespec="seconds")
    write_key_file(path, [*keys, ApiKey(name, _check_scopes(scopes), _hash(token), created)])
    return token


def remove_key(path: Path, name: str) -> None:
    """Delete the key named ``name`` from ``path`` (a running server stops accepting it within a second)."""
    keys = read_key_file(path)
    kept = [key for key in keys if key.name != name]
    if len(kept) == len(keys):
        raise KeyFileError(f"No key named {name!r} in {path}; `pneumo serve keys list --file {path}` lists them.")
    write_key_file(path, kept)


class KeyStore:
    """The keys of one key file, re-read when the file changes (checked at most once a second).

    Args:
        path: the key file; it must exist and hold at least one key, so a typo cannot open the API.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._keys = read_key_file(self.path)
        if not self._keys:
            raise KeyFileError(f"The API key file {self.path} holds no key; add one with `pneumo serve keys add`.")
        self._stamp = self._file_stamp()
        self._checked = time.monotonic()

    def _file_stamp(self) -> tuple[int, int, int]:
        info = os.stat(self.path)
        return info.st_mtime_ns, info.st_size, info.st_ino

    def _refresh(self) -> None:
        now = time.monotonic()
        if now - self._checked < 1.0:
            return
        with self._lock:
            self._checked = now
            try:
                stamp = self._file_stamp()
                if stamp != self._stamp:
                    self._keys, self._stamp = read_key_file(self.path), stamp
            except (OSError, KeyFileError):
                self._keys = []  # a key file that vanished or broke admits nobody until it is fixed

    def lookup(self, token: str) -> ApiKey | None:
        """The stored key ``token`` is, or None (compared in constant time against every hash)."""
        self._refresh()
        digest = _hash(token)
        found = None
        for key in self._keys:
            if hmac.compare_digest(key.sha256, digest):
                found = key
        return found


#: Paths served to anyone: liveness for load balancers, and the API's own description (no data).
PUBLIC_PATHS = ("/health", "/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect")
PUBLIC_PREFIXES = ("/static-offline-docs/",)


class AuthGuard:
    """Pure ASGI middleware: a valid ``Authorization: Bearer`` key holding the route's scope, or 401/403.

    Runs before the body is read. ``scopes`` maps a route path to the scope it needs; a path
    that is neither public nor listed needs a valid key of any scope (unknown paths answer 404
    only to an authenticated client). The key's name goes into ``scope["state"]["principal"]``
    for the logs.
    """

    def __init__(self, app: ASGIApp, store: KeyStore, scopes: dict[str, str]) -> None:
        self.app, self.store, self.scopes = app, store, scopes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = str(scope.get("path", ""))
        scheme, _, token = Headers(scope=scope).get("authorization", "").partition(" ")
        key = self.store.lookup(token.strip()) if scheme.lower() == "bearer" and token.strip() else None
        if key is not None:
            scope.setdefault("state", {})["principal"] = key.name
        needed = self.scopes.get(path)
        if path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES):
            await self.app(scope, receive, send)
            return
        if key is None:
            response = error_response(
                401,
                "unauthorized",
                "This API needs an API key: send it as 'Authorization: Bearer <key>'. The server's operator creates "
                "keys with `pneumo serve keys add`.",
                {"WWW-Authenticate": 'Bearer realm="pneumo"'},
            )
        elif needed is not None and needed not in key.scopes:
            response = error_response(
                403,
                "insufficient_scope",
                f"The API key {key.name!r} has the scopes {sorted(key.scopes)}; {path} needs {needed!r}. Ask the "
                "operator for a key with that scope.",
                {"WWW-Authenticate": f'Bearer realm="pneumo", error="insufficient_scope", scope="{needed}"'},
            )
        else:
            await self.app(scope, receive, send)
            return
        await response(scope, receive, send)
