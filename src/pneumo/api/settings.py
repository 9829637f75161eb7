"""The API's security and time settings, in one frozen record (``pneumo serve`` options map onto it).

Kept JSON-able (:meth:`ApiSettings.to_json`), because ``pneumo serve --workers N`` hands the
settings to every worker process through the environment.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from pneumo.api.security import LOOPBACK_HOSTS


@dataclass(frozen=True)
class ApiSettings:
    """Authentication, browser defences, time limits and parser limits of one API.

    Attributes:
        api_keys: the API key file (:mod:`pneumo.api.auth`); None serves without authentication,
            which ``pneumo serve`` allows on loopback, or elsewhere with ``--insecure-no-auth`` only.
        allowed_hosts: ``Host`` names answered (``*.example.org`` patterns; ``*`` for any).
        cors_origins: web origins allowed to call the API from a browser (none by default).
        body_idle_timeout: seconds a request body may pause between chunks (408 beyond).
        body_deadline: seconds a request body may take to arrive in full (408 beyond).
        queue_timeout: seconds a request may wait for an analysis slot (503 beyond).
        deadline: seconds a client waits for its answer, once its body is in (503 beyond).
        max_inflight_bytes: bytes of request bodies received at once, all requests together (503 beyond).
        max_form_fields: text fields a form may hold (the API reads files only; 413 beyond).
        max_field_bytes: size of one text field (413 beyond).
    """

    api_keys: Path | None = None
    allowed_hosts: tuple[str, ...] = LOOPBACK_HOSTS
    cors_origins: tuple[str, ...] = ()
    body_idle_timeout: float = 15.0
    body_deadline: float = 120.0
    queue_timeout: float = 30.0
    deadline: float = 60.0
    max_inflight_bytes: int = 1 << 30
    max_form_fields: int = 8
    max_field_bytes: int = 16 * 1024

    def to_json(self) -> str:
        values = dataclasses.asdict(self)
        values["api_keys"] = str(self.api_keys) if self.api_keys is not None else None
        return json.dumps(values)

    @classmethod
    def from_json(cls, text: str) -> ApiSettings:
        values = json.loads(text)
        values["api_keys"] = Path(values["api_keys"]) if values.get("api_keys") else None
        values["allowed_hosts"] = tuple(values.get("allowed_hosts", LOOPBACK_HOSTS))
        values["cors_origins"] = tuple(values.get("cors_origins", ()))
        return cls(**values)
