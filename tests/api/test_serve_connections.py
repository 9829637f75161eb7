"""``pneumo serve`` against slow and greedy clients, as a real process on loopback (issue 22, item 5;
issue 23: ``--workers N``).

Before: a connection whose request headers never finished was never closed (slowloris); at the
file-descriptor limit, two good predictions out of three timed out. Here the server runs with a
small descriptor limit (``RLIMIT_NOFILE`` 160, so the cap is reached with a few hundred sockets
instead of 20,000), and good requests must still be answered while a slowloris client holds
every connection it can.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from app_helpers import xray_bytes
from model_helpers import SURFACE_META, tiny_bundle


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_bundle(tmp_path_factory.mktemp("bundle"), head="wide", **SURFACE_META)[0]


@pytest.fixture
def start(tmp_path: Path, bundle: Path) -> Iterator[Callable[..., str]]:
    """Start ``pneumo serve`` with extra options (and optionally a descriptor limit); its base URL."""
    processes: list[subprocess.Popen] = []

    def launch(*options: str, nofile: int | None = None) -> str:
        port = _free_port()
        log = (tmp_path / f"serve-{port}.log").open("w")

        def limit() -> None:
            if nofile is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

        process = subprocess.Popen(
            [sys.executable, "-m", "pneumo.cli", "serve", "--model", str(bundle), "--port", str(port), *options],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=limit,
        )
        processes.append(process)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert process.poll() is None, (tmp_path / f"serve-{port}.log").read_text()
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    return url
            except httpx.HTTPError:
                time.sleep(0.3)
        pytest.fail("pneumo serve did not come up")

    yield launch
    for process in processes:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def _half_request(port: int) -> socket.socket:
    """A slowloris connection: a request line and one header, never finished."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
    return sock


def _predict(url: str, name: str) -> int:
    try:
        return httpx.post(f"{url}/v1/predict", files={"file": (name, xray_bytes(name))}, timeout=20).status_code
    except httpx.HTTPError:
        return 0


def test_unfinished_headers_are_answered_408_and_closed(start: Callable[..., str]) -> None:
    url = start("--header-timeout", "1")
    sock = _half_request(_port(url))
    received = b""
    while chunk := sock.recv(4096):  # before: blocked until the socket timeout (the server never closed it)
        received += chunk
    sock.close()
    assert received.startswith(b"HTTP/1.1 408")


def test_good_requests_are_served_while_slowloris_holds_every_descriptor(start: Callable[..., str]) -> None:
    url = start("--header-timeout", "30", nofile=160)
    port = _port(url)
    held: list[socket.socket] = []
    try:
        for _ in range(300):  # far more than the 160 descriptors the server may open
            try:
                held.append(_half_request(port))
            except OSError:
                break
        statuses = [_predict(url, f"good{i}") for i in range(3)]
    finally:
        for sock in held:
            sock.close()
    assert statuses == [200, 200, 200], statuses
    assert len(held) >= 150


def test_a_stalled_body_on_a_real_connection_gets_408(start: Callable[..., str]) -> None:
    url = start("--body-timeout", "1")
    sock = socket.create_connection(("127.0.0.1", _port(url)), timeout=20)
    body = b'--b\r\nContent-Disposition: form-data; name="file"; filename="x.jpeg"\r\n\r\n\xff\xd8'
    head = (
        "POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=b\r\n"
        f"Content-Length: {len(body) + 100_000}\r\n\r\n"
    )
    sock.sendall(head.encode() + body)  # then nothing more
    received = b""
    while chunk := sock.recv(4096):
        received += chunk
    sock.close()
    assert received.startswith(b"HTTP/1.1 408") and b'"request_timeout"' in received


@pytest.mark.slow
def test_workers_share_the_load_and_the_metrics(start: Callable[..., str], tmp_path: Path) -> None:
    """``--workers 2``: two processes answer; /metrics adds up what both counted, whichever answers it."""
    from pneumo.api.auth import add_key

    keys = tmp_path / "keys.json"
    token = add_key(keys, "test", ["predict", "read"])
    url = start("--workers", "2", "--api-keys", str(keys))
    auth = {"Authorization": f"Bearer {token}"}
    with httpx.Client(headers=auth, timeout=30) as client:
        for i in range(8):
            fresh = httpx.post(f"{url}/v1/predict", files={"file": (f"{i}.jpeg", xray_bytes(f"w{i}"))}, headers=auth)
            assert fresh.status_code == 200, fresh.text
        scraped = [client.get(f"{url}/metrics").text for _ in range(4)]
    wanted = 'pneumo_http_requests_total{method="POST",route="/v1/predict",status="200"}'
    for text in scraped:
        line = next(line for line in text.splitlines() if line.startswith(wanted))
        assert float(line.rsplit(" ", 1)[1]) == 8.0, line
    log = next(tmp_path.glob("serve-*.log")).read_text()
    started = [json.loads(line) for line in log.splitlines() if "Started server process" in line]
    assert len(started) == 2, log[-2000:]  # JSON lines from uvicorn too, one per worker process


def test_a_refused_part_flood_closes_the_connection_instead_of_draining_it(start: Callable[..., str]) -> None:
    """Before: a 990-part body was read whole before its 413; left open, the server would then read and
    discard the rest of a flood on its event loop. Now: 413 at the 17th file, and the connection is closed."""
    url = start()
    sock = socket.create_connection(("127.0.0.1", _port(url)), timeout=20)
    sock.sendall(
        b"POST /v1/predict/batch HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n"
        b"Content-Type: multipart/form-data; boundary=b\r\n\r\n"
    )
    for i in range(40):  # the body never ends: no terminating chunk is sent
        part = f'--b\r\nContent-Disposition: form-data; name="files"; filename="{i}.jpeg"\r\n\r\n'.encode()
        part += b"\xff" * 1000 + b"\r\n"
        sock.sendall(f"{len(part):x}\r\n".encode() + part + b"\r\n")
    received = b""
    try:
        while chunk := sock.recv(4096):  # EOF: the server closed the connection
            received += chunk
    except ConnectionResetError:
        # Also a close: a socket closed with the flood's rest still unread in its receive queue is reset,
        # not ended with a FIN (RFC 1122, 4.2.2.13); which one comes depends on how much arrived before it.
        pass
    sock.close()
    head = received.split(b"\r\n\r\n", 1)[0].lower()
    assert head.startswith(b"http/1.1 413") and b"connection: close" in head
    assert b'"too_many_files"' in received
