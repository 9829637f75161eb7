"""Who may use the page: a password (stored as a scrypt hash), or the user a trusted reverse proxy names.

Two ways, chosen by the operator (``pneumo app --password-file FILE`` or ``--auth-header NAME``;
the page reads them from :data:`PASSWORD_FILE_ENV` and :data:`AUTH_HEADER_ENV`):

- **Password.** ``pneumo app password FILE`` stores ``scrypt$N$r$p$salt$hash`` (a memory-hard
  hash: a leaked file does not give the password away cheaply). The page asks for it once per
  browser session; wrong answers are slowed down.
- **Reverse proxy.** The hospital's proxy (nginx ``auth_request``, oauth2-proxy, Apache
  ``mod_auth_*``) signs the user in and forwards the name in a header (e.g.
  ``X-Forwarded-User``); the page serves only requests that carry it. This is safe only when the
  page listens on loopback behind that proxy, so that no one can reach it without passing the
  proxy, which also strips the header from what clients send (``docs/api.md`` shows the set-up).

Without either, ``pneumo app`` serves loopback only, unless ``--insecure-no-auth`` is given.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from pneumo.core.errors import PneumoError

PASSWORD_FILE_ENV = "PNEUMO_APP_PASSWORD_FILE"
AUTH_HEADER_ENV = "PNEUMO_APP_AUTH_HEADER"
_SCRYPT = {"n": 2**14, "r": 8, "p": 1}  # ~16 MB and ~50 ms per check: slow for a guesser, fine for a person


class AppAuthError(PneumoError):
    """The page's authentication is misconfigured (unreadable or malformed password file, bad header name)."""

    code = "app_auth_error"


def hash_password(password: str) -> str:
    """``password`` as ``scrypt$N$r$p$salt$hash`` (base64), for the password file."""
    if len(password) < 8:
        raise AppAuthError("The password must have at least 8 characters.")
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, dklen=32, **_SCRYPT)
    encode = base64.b64encode
    return f"scrypt${_SCRYPT['n']}${_SCRYPT['r']}${_SCRYPT['p']}${encode(salt).decode()}${encode(digest).decode()}"


def verify_password(password: str, stored: str) -> bool:
    """Whether ``password`` matches ``stored`` (:func:`hash_password`'s output), in constant time."""
    try:
        scheme, n, r, p, salt, digest = stored.strip().split("$")
        if scheme != "scrypt" or int(n) > 2**20 or int(r) > 32 or int(p) > 16:
            return False
        expected = base64.b64decode(digest, validate=True)
        actual = hashlib.scrypt(
            password.encode(), salt=base64.b64decode(salt, validate=True), n=int(n), r=int(r), p=int(p), dklen=32
        )
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(actual, expected)


def write_password_file(path: Path, password: str) -> None:
    """Store ``password``'s hash in ``path`` (mode 0600)."""
    line = hash_password(password) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w", encoding="ascii") as handle:
        handle.write(line)


@dataclass(frozen=True)
class AppAuth:
    """How the page checks its users: a password hash, or the name of a header a trusted proxy sets."""

    password_hash: str | None = None
    header: str | None = None

    def user_from_headers(self, headers: Mapping[str, str]) -> str | None:
        """The signed-in user the proxy names in :attr:`header`, or None."""
        if self.header is None:
            return None
        wanted = self.header.lower()
        value = next((v for k, v in headers.items() if k.lower() == wanted), "")
        return value.strip()[:200] or None


def auth_from_env(environ: Mapping[str, str] | None = None) -> AppAuth | None:
    """The page's authentication as the operator configured it, or None when none is.

    Raises:
        AppAuthError: the password file cannot be read or holds no scrypt hash.
    """
    environ = os.environ if environ is None else environ
    header = environ.get(AUTH_HEADER_ENV, "").strip() or None
    password_file = environ.get(PASSWORD_FILE_ENV, "").strip()
    if header is not None and not header.replace("-", "").isalnum():
        raise AppAuthError(f"The header name {header!r} is not valid; use letters, digits and '-'.")
    password_hash = None
    if password_file:
        try:
            password_hash = Path(password_file).read_text(encoding="ascii")[:512].strip()
        except (OSError, UnicodeDecodeError) as err:
            raise AppAuthError(f"The password file {password_file} cannot be read ({err}).") from None
        if not password_hash.startswith("scrypt$"):
            raise AppAuthError(
                f"The password file {password_file} holds no password hash; write it with `pneumo app password FILE`."
            )
    if header is None and password_hash is None:
        return None
    return AppAuth(password_hash=password_hash, header=header)
