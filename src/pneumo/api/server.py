"""Running the API under uvicorn, holding against slow and greedy clients, in one or N processes.

uvicorn bounds what a client sends (16 KB of headers, ``h11``'s limit) and closes an idle
keep-alive connection after ``timeout_keep_alive``, but it never closes a connection whose
request headers do not finish: a slowloris client opening thousands of them exhausts the file
descriptors and good requests time out. :class:`GuardedH11Protocol` (uvicorn's h11 protocol with
three additions) closes a connection whose request headers are not complete within
``header_timeout`` seconds (408), caps the connections of one client address, and caps all
connections: at the cap, the oldest connection still waiting for its headers is dropped to make
room, or else the new one. Slow *bodies* are cut by the body time limits of
:class:`pneumo.api.middleware.BodyLimit`. The settings travel on :class:`GuardedConfig`, so worker
processes (``--workers N``, which uvicorn spawns) get them too; the app itself is built in each
worker by :func:`app_from_env` from the JSON the parent puts in ``$PNEUMO_SERVE``.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from pneumo.api.observability import log_config
from pneumo.api.settings import ApiSettings

log = logging.getLogger("pneumo.api.server")

#: The environment variable carrying :class:`ServeOptions` (JSON) to the worker processes.
SERVE_ENV = "PNEUMO_SERVE"
_TIMEOUT_REPLY = b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
_per_client: Counter[str] = Counter()  # open connections by client address, in this process


class GuardedConfig(uvicorn.Config):
    """uvicorn's configuration plus the connection limits :class:`GuardedH11Protocol` enforces."""

    def __init__(
        self,
        app: Any,
        *,
        header_timeout: float = 10.0,
        max_connections: int = 1000,
        max_connections_per_client: int = 0,
        **kwargs: Any,
    ) -> None:
        self.header_timeout = header_timeout
        self.max_connections = max_connections
        self.max_connections_per_client = max_connections_per_client
        super().__init__(app, http=GuardedH11Protocol, **kwargs)


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a header timeout, a per-client connection cap and a total cap."""

    _header_timer: Any = None
    _peer: str | None = None
    _opened: float = 0.0

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self._opened = time.monotonic()
        self._peer = self.client[0] if self.client else None
        config: GuardedConfig = self.config  # type: ignore[assignment]
        if self._peer is not None:
            _per_client[self._peer] += 1
            cap = config.max_connections_per_client
            if cap and _per_client[self._peer] > cap:
                log.warning("Refused a connection from %s: it holds %d already", self._peer, cap)
                transport.close()
                return
        if config.max_connections and len(self.connections) > config.max_connections and not self._evict():
            log.warning("Refused a connection: %d are open, the most this server holds", config.max_connections)
            transport.close()
            return
        self._arm_header_timer()

    def _evict(self) -> bool:
        """Close the oldest other connection still waiting for its request headers; False when there is none."""
        waiting = [
            other
            for other in self.connections
            if other is not self and isinstance(other, GuardedH11Protocol) and other._header_timer is not None
        ]
        if not waiting:
            return False
        oldest = min(waiting, key=lambda other: other._opened)
        log.warning("Dropped the oldest connection still sending its headers (%s) to admit a new one", oldest._peer)
        oldest._timed_out()
        return True

    def _arm_header_timer(self) -> None:
        if self._header_timer is None and not self.transport.is_closing():
            timeout = self.config.header_timeout  # type: ignore[attr-defined]
            self._header_timer = self.loop.call_later(timeout, self._timed_out)

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _timed_out(self) -> None:
        self._header_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.write(_TIMEOUT_REPLY)
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is h11.IDLE:  # bytes of a request whose headers are not complete yet
            self._arm_header_timer()
        else:
            self._disarm_header_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._disarm_header_timer()  # idle until the next request: uvicorn's keep-alive timeout applies

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_timer()
        if self._peer is not None:
            _per_client[self._peer] -= 1
            if _per_client[self._peer] <= 0:
                del _per_client[self._peer]
            self._peer = None
        super().connection_lost(exc)


@dataclass
class ServeOptions:
    """Everything a worker process needs to build the API (``pneumo serve``'s options), JSON-able."""

    bundle: str | None = None
    max_upload_bytes: int | None = None
    max_batch_files: int = 16
    max_concurrent: int | None = None
    max_queue: int | None = None
    processes: int = 1
    settings: dict[str, Any] = field(default_factory=dict)

    def api_settings(self) -> ApiSettings:
        return ApiSettings.from_json(json.dumps(self.settings)) if self.settings else ApiSettings()


def app_from_env() -> Any:
    """The API built from ``$PNEUMO_SERVE`` (uvicorn's factory in each worker process)."""
    return build_app(ServeOptions(**json.loads(os.environ[SERVE_ENV])))


def build_app(options: ServeOptions) -> Any:
    """The API ``options`` describe."""
    import dataclasses

    from pneumo.api.routes import create_app
    from pneumo.core.decode import DEFAULT_LIMITS

    limits = DEFAULT_LIMITS
    if options.max_upload_bytes is not None:
        limits = dataclasses.replace(DEFAULT_LIMITS, max_bytes=options.max_upload_bytes)
    return create_app(
        Path(options.bundle) if options.bundle else None,
        limits,
        max_batch_files=options.max_batch_files,
        max_concurrent=options.max_concurrent,
        max_queue=options.max_queue,
        settings=options.api_settings(),
        processes=options.processes,
    )


def raise_file_limit(wanted: int) -> int:
    """Raise this process's open-file soft limit towards ``wanted`` (up to the hard limit); the limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


def _healthcheck_timeout() -> dict[str, int]:
    """A worker's start-up health check timeout long enough to load the model on a busy machine.

    uvicorn's default (5 s) restarts a worker that is still loading the model when the cores are
    busy, over and over; older uvicorn releases have no such check (and no such option).
    """
    import inspect

    return (
        {"timeout_worker_healthcheck": 120}
        if "timeout_worker_healthcheck" in inspect.signature(uvicorn.Config).parameters
        else {}
    )


def serve(
    options: ServeOptions,
    *,
    host: str,
    port: int,
    workers: int = 1,
    header_timeout: float = 10.0,
    keep_alive: int = 5,
    max_connections: int = 1000,
    max_connections_per_client: int = 0,
    log_json: bool = True,
    app: Any = None,
) -> None:
    """Run the API until interrupted: ``app`` when given (one process), else :func:`app_from_env` in each of
    ``workers`` processes, behind :class:`GuardedH11Protocol`."""
    files = raise_file_limit(max_connections + 256)
    connections = min(max_connections, max(16, files - 128))  # never reach the descriptor limit
    options.processes = workers
    os.environ[SERVE_ENV] = json.dumps(asdict(options))
    metrics_dir = None
    if workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        metrics_dir = tempfile.TemporaryDirectory(prefix="pneumo-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir.name  # every worker's values, added up at /metrics
    config = GuardedConfig(
        app if app is not None and workers == 1 else "pneumo.api.server:app_from_env",
        factory=app is None or workers > 1,
        host=host,
        port=port,
        workers=workers,
        timeout_keep_alive=keep_alive,
        h11_max_incomplete_event_size=16 * 1024,
        header_timeout=header_timeout,
        max_connections=connections,
        max_connections_per_client=max_connections_per_client,
        log_config=log_config(json_lines=log_json),
        access_log=False,  # pneumo writes one access line per request, with its id (observability)
        server_header=False,
        **_healthcheck_timeout(),
    )
    server = uvicorn.Server(config)
    try:
        if workers > 1:
            import inspect

            from uvicorn.supervisors import Multiprocess

            # older uvicorn releases take the worker's target; newer ones build the server from the config.
            target = {"target": server.run} if "target" in inspect.signature(Multiprocess).parameters else {}
            Multiprocess(config, sockets=[config.bind_socket()], **target).run()
        else:
            server.run()
    finally:
        if metrics_dir is not None:
            os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
            metrics_dir.cleanup()
