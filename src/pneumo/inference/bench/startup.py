"""Cold start and memory of the commands users run: part of ``pneumo bench`` (see :mod:`pneumo.inference.bench`).

Three figures, each measured in a fresh process exactly as a user starts it:

- ``predict_cli_wall_s``: ``pneumo predict one.jpeg`` from process start to exit (interpreter,
  imports, model load, one prediction), and that process's peak RSS;
- ``serve_ready_s``: ``pneumo serve`` from process start until ``GET /health`` answers 200;
- ``serve_rss_mb_after``: the server's resident memory after ``n`` predictions through
  ``POST /v1/predict`` (a leak or an unbounded cache shows here, not in a one-shot figure).

Whether the training stack was imported is recorded too (``torch_imported``): the inference path
must not import it, and importing it costs seconds and hundreds of MB.
"""

from __future__ import annotations

import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

#: Longest wait for ``pneumo serve`` to answer ``/health``.
SERVE_TIMEOUT_S = 120.0


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "pneumo.cli", *args]


def predict_cold_start(image: Path, bundle: Path | None, backend: str | None = None) -> dict[str, Any]:
    """Wall time and peak RSS of ``pneumo predict IMAGE`` in a fresh process, and whether torch was imported."""
    probe = (
        "import runpy, sys, json, resource\n"
        "sys.argv = ['pneumo', 'predict', *json.loads(sys.argv[1])]\n"
        "try:\n"
        "    runpy.run_module('pneumo.cli', run_name='__main__')\n"
        "except SystemExit as exit:\n"
        "    code = exit.code\n"
        "else:\n"
        "    code = 0\n"
        "print(json.dumps({'torch': 'torch' in sys.modules, 'code': code}), file=sys.stderr)\n"
    )
    args = [str(image)] + (["--model", str(bundle)] if bundle is not None else [])
    env = {**os.environ, **({"PNEUMO_BACKEND": backend} if backend else {})}
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", probe, json.dumps(args)], capture_output=True, text=True, env=env, check=False
    )
    wall = time.perf_counter() - start
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    tail = json.loads(proc.stderr.strip().splitlines()[-1]) if proc.stderr.strip() else {}
    return {
        "predict_cli_wall_s": round(wall, 3),
        "predict_cli_exit_code": tail.get("code", proc.returncode),
        "predict_cli_torch_imported": tail.get("torch"),
        # RUSAGE_CHILDREN: the largest child so far; the bench runs this before any other child.
        "predict_cli_peak_rss_mb": round(usage.ru_maxrss / 1024.0, 1),
    }


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _multipart(name: str, data: bytes) -> tuple[bytes, str]:
    """One-file multipart/form-data body (urllib has no encoder; the base install has no HTTP client library)."""
    boundary = uuid.uuid4().hex
    head = f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
    head += "Content-Type: application/octet-stream\r\n\r\n"
    return head.encode() + data + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def _rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024.0, 1)
    except OSError:  # not Linux
        return None
    return None


def serve_start_and_memory(
    image: Path, bundle: Path | None, predictions: int = 1000, backend: str | None = None
) -> dict[str, Any]:
    """Seconds until a fresh ``pneumo serve`` answers ``/health``, and its RSS after ``predictions`` uploads.

    The server's stderr goes to a file, not a pipe: it logs a line per request, and an unread pipe
    fills and blocks it.
    """
    with tempfile.TemporaryFile() as log_file:
        return _serve_start_and_memory(image, bundle, predictions, backend, log_file)


def _serve_start_and_memory(
    image: Path, bundle: Path | None, predictions: int, backend: str | None, log_file: Any
) -> dict[str, Any]:
    port = _free_port()
    args = ["serve", "--port", str(port)] + (["--model", str(bundle)] if bundle is not None else [])
    env = {**os.environ, **({"PNEUMO_BACKEND": backend} if backend else {})}
    start = time.perf_counter()
    server = subprocess.Popen(_cli(*args), stdout=subprocess.DEVNULL, stderr=log_file, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        ready = None
        while time.perf_counter() - start < SERVE_TIMEOUT_S and server.poll() is None:
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=1) as response:
                    if response.status == 200:
                        ready = time.perf_counter() - start
                        break
            except OSError:
                time.sleep(0.02)
        if ready is None:
            log_file.seek(0)
            error = log_file.read().decode(errors="replace")[-800:] if server.poll() is not None else "timeout"
            return {"serve_ready_s": None, "serve_error": error}
        rss_ready = _rss_mb(server.pid)
        body, content_type = _multipart(image.name, image.read_bytes())
        t0 = time.perf_counter()
        for _ in range(predictions):
            request = urllib.request.Request(
                f"{base}/v1/predict", data=body, headers={"Content-Type": content_type}, method="POST"
            )
            with urllib.request.urlopen(request, timeout=60) as response:
                response.read()
        elapsed = time.perf_counter() - t0
        return {
            "serve_ready_s": round(ready, 3),
            "serve_rss_mb_ready": rss_ready,
            "serve_predictions": predictions,
            "serve_rss_mb_after": _rss_mb(server.pid),
            "serve_sequential_requests_per_s": round(predictions / elapsed, 2),
        }
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
