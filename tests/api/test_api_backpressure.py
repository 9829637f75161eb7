"""Backpressure against a real uvicorn server on loopback (issue 12): more worst-case uploads than it takes.

``pneumo serve --max-concurrent 1 --max-queue 1`` gets 8 simultaneous 36-megapixel float TIFFs.
Every answer must be 200 or a JSON 503 ``server_busy`` with ``Retry-After``; the server must stay
up, and its memory must stay within one request's decoding budget of where it started (before,
N such requests at once took N times the memory).
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from hostile_inputs import float_tiff
from model_helpers import SURFACE_META, tiny_bundle

CLIENTS = 8


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    raise AssertionError(f"{field} not in /proc/{pid}/status")


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen]]:
    bundle = tiny_bundle(tmp_path / "bundle", head="wide", **SURFACE_META)[0]
    port = _free_port()
    log = (tmp_path / "serve.log").open("w")
    args = ["serve", "--model", str(bundle), "--port", str(port), "--max-concurrent", "1", "--max-queue", "1"]
    process = subprocess.Popen(
        [sys.executable, "-m", "pneumo.cli", *args], stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        assert process.poll() is None, (tmp_path / "serve.log").read_text()
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.5)
    else:
        pytest.fail("pneumo serve did not come up")
    yield url, process
    os.killpg(process.pid, signal.SIGTERM)
    process.wait(timeout=30)


async def _burst(url: str, data: bytes) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=300) as client:
        return await asyncio.gather(
            *(
                client.post(f"{url}/v1/predict", files={"file": (f"big{i}.tiff", data, "image/tiff")})
                for i in range(CLIENTS)
            )
        )


def test_more_worst_case_uploads_than_the_bound_get_200_or_503(server: tuple[str, subprocess.Popen]) -> None:
    url, process = server
    data = float_tiff()
    # one request first: imports and the model's first pass are the server's cost, not the burst's
    assert httpx.post(f"{url}/v1/predict", files={"file": ("w.tiff", data)}, timeout=300).status_code == 200
    Path(f"/proc/{process.pid}/clear_refs").write_text("5")  # reset the server's high-water mark
    rss_before = _status_kb(process.pid, "VmRSS:")

    responses = asyncio.run(_burst(url, data))

    statuses = sorted(response.status_code for response in responses)
    assert set(statuses) <= {200, 503}, statuses
    assert 200 in statuses and 503 in statuses, statuses
    for response in responses:
        if response.status_code == 503:
            assert response.json()["error"]["code"] == "server_busy"
            assert int(response.headers["retry-after"]) >= 1
        else:
            assert response.json()["label"] in ("NORMAL", "PNEUMONIA")
    assert process.poll() is None
    assert httpx.get(f"{url}/health", timeout=10).status_code == 200
    extra_mb = (_status_kb(process.pid, "VmHWM:") - rss_before) / 1024
    assert extra_mb <= 300 + 100, f"{extra_mb:.0f} MB: one request's budget plus the queued uploads"
