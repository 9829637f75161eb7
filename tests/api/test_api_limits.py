"""Issue 22, items 2 and 4: the multipart parser's limits hold before anything is buffered, and every request
has a time bound (slow bodies, waiting for a worker, waiting for the answer).

Before: 990 parts of 330 KB to ``/v1/predict/batch`` were parsed into memory before the 413
``too_many_files`` (+324 MB a request), and text fields instead of files added 220 MB. Here the
app counts the body bytes it pulled when it refused: a refusal must come after the first parts
over the limit, not after the whole body.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest
from app_helpers import xray_bytes
from fastapi.testclient import TestClient
from model_helpers import SURFACE_META, tiny_bundle

from pneumo.api.routes import create_app
from pneumo.api.settings import ApiSettings
from pneumo.core.decode import Limits
from pneumo.inference import Predictor

LOCAL = "http://127.0.0.1"
PART = 10_000  # bytes per part: 90 of them fit under the batch cap of 3 x (300 KB + overhead)


@pytest.fixture(scope="module")
def predictor(tmp_path_factory: pytest.TempPathFactory) -> Predictor:
    bundle = tiny_bundle(tmp_path_factory.mktemp("bundle"), head="wide", **SURFACE_META)[0]
    return Predictor(bundle, limits=Limits(max_bytes=300_000))


async def _drive(
    app: Any, path: str, body: bytes, chunk: int = 4096, stall: float = 0.0, boundary: bytes = b"pneumoboundary"
) -> tuple[int, dict, int]:
    """Send ``body`` to ``app`` in ``chunk``-byte messages, as a server does; (status, JSON answer, bytes pulled).

    The test client hands a body over in one message; a server hands it over as it arrives, and
    what matters is how much of it the app had pulled when it refused. ``stall``: seconds the
    client pauses after its first chunk (a slow body).
    """
    chunks = [body[start : start + chunk] for start in range(0, len(body), chunk)]
    pulled, index, sent = 0, 0, []

    async def receive() -> dict:
        nonlocal pulled, index
        if index < len(chunks):
            if index == 1 and stall:
                await asyncio.sleep(stall)
            index += 1
            pulled += len(chunks[index - 1])
            return {"type": "http.request", "body": chunks[index - 1], "more_body": index < len(chunks)}
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append((message, pulled))

    headers = [(b"host", b"127.0.0.1"), (b"content-type", b"multipart/form-data; boundary=" + boundary)]
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
        "state": {},
    }
    await app(scope, receive, send)
    start = next((message, when) for message, when in sent if message["type"] == "http.response.start")
    answer = b"".join(message.get("body", b"") for message, _ in sent if message["type"] == "http.response.body")
    return int(start[0]["status"]), json.loads(answer), start[1]


def _multipart(parts: list[tuple[str, str | None, bytes]], boundary: str = "pneumoboundary") -> bytes:
    out = []
    for name, filename, data in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out.append(f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + data + b"\r\n")
    return b"".join(out) + f"--{boundary}--\r\n".encode()


def _post_streamed(predictor: Predictor, path: str, body: bytes) -> tuple[int, dict, int]:
    app = create_app(limits=predictor.limits, predictor=predictor, max_batch_files=3)
    return asyncio.run(_drive(app, path, body))


def test_a_part_flood_is_refused_at_the_first_file_over_the_limit(predictor: Predictor) -> None:
    body = _multipart([("files", f"{i}.jpeg", b"\xff" * PART) for i in range(90)])
    status, answer, pulled = _post_streamed(predictor, "/v1/predict/batch", body)
    assert status == 413 and answer["error"]["code"] == "too_many_files"
    assert pulled < 6 * PART, f"{pulled} of {len(body)} bytes pulled before the refusal"


def test_a_second_file_on_the_single_file_route_is_refused_as_it_arrives(predictor: Predictor) -> None:
    body = _multipart([("file", f"{i}.jpeg", b"\xff" * PART) for i in range(25)])
    status, answer, pulled = _post_streamed(predictor, "/v1/predict", body)
    assert status == 413 and answer["error"]["code"] == "too_many_files"
    assert "/v1/predict/batch" in answer["error"]["message"]
    assert pulled < 4 * PART


def test_a_text_field_flood_is_refused_before_it_is_buffered(predictor: Predictor) -> None:
    body = _multipart([(f"field{i}", None, b"x" * PART) for i in range(90)])
    status, answer, pulled = _post_streamed(predictor, "/v1/predict/batch", body)
    assert status == 413 and answer["error"]["code"] == "too_many_fields"
    assert pulled < 12 * PART


def test_one_large_text_field_is_cut_at_the_field_limit(predictor: Predictor) -> None:
    body = _multipart([("files", None, b"x" * 200_000)])
    status, answer, pulled = _post_streamed(predictor, "/v1/predict/batch", body)
    assert status == 413 and answer["error"]["code"] == "field_too_large"
    assert pulled < 40_000


def test_files_within_the_limits_still_work(predictor: Predictor) -> None:
    body = _multipart([("files", f"{i}.jpeg", xray_bytes(f"ok{i}")) for i in range(3)])
    status, answer, _ = _post_streamed(predictor, "/v1/predict/batch", body)
    assert status == 200
    assert [row["file"] for row in answer["results"]] == ["0.jpeg", "1.jpeg", "2.jpeg"]


# ----------------------------------------------------------------------------------- time bounds


def test_a_body_that_stalls_is_cut_off_with_408(predictor: Predictor) -> None:
    """Before: a body that stopped arriving held its request (and connection) forever."""
    settings = ApiSettings(body_idle_timeout=0.3)
    app = create_app(limits=predictor.limits, predictor=predictor, settings=settings)
    body = b'--b\r\nContent-Disposition: form-data; name="file"; filename="x.jpeg"\r\n\r\n' + b"\xff" * 9000
    status, answer, _ = asyncio.run(_drive(app, "/v1/predict", body, stall=3.0, boundary=b"b"))
    assert status == 408 and answer["error"]["code"] == "request_timeout"


def test_an_answer_over_the_deadline_is_a_503_with_retry_after(
    predictor: Predictor, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: no request had a time limit; a client waited as long as the work took.

    The work is made to take 1 s: with a real prediction and a tiny deadline, a loaded machine can
    deschedule the event loop until the answer is in, and asyncio then returns the finished answer.
    """
    answer = predictor.predict

    def slow(*args: Any, **kwargs: Any) -> Any:
        time.sleep(1.0)
        return answer(*args, **kwargs)

    monkeypatch.setattr(predictor, "predict", slow)
    settings = ApiSettings(deadline=0.2)
    app = create_app(limits=predictor.limits, predictor=predictor, settings=settings)
    client = TestClient(app, base_url=LOCAL)
    response = client.post("/v1/predict", files={"file": ("x.jpeg", xray_bytes("late"))})
    assert response.status_code == 503 and response.json()["error"]["code"] == "deadline_exceeded"
    assert int(response.headers["retry-after"]) >= 1
    deadline = time.monotonic() + 30
    while app.state.pneumo.gate.admitted and time.monotonic() < deadline:
        time.sleep(0.05)  # the work finishes in its slot, then gives its place back
    assert app.state.pneumo.gate.admitted == 0


def test_a_request_that_waits_too_long_for_a_worker_is_refused(predictor: Predictor) -> None:
    settings = ApiSettings(queue_timeout=0.2)
    app = create_app(limits=predictor.limits, predictor=predictor, max_concurrent=1, max_queue=4, settings=settings)
    gate = app.state.pneumo.gate
    client = TestClient(app, base_url=LOCAL)
    held = gate._slots.acquire("someone", 5)  # the one worker is busy (as with a decode that never ends)
    assert held is not None
    try:
        response = client.post("/v1/predict", files={"file": ("x.jpeg", xray_bytes("queued"))})
    finally:
        gate._slots.release("someone", held, 0.1)
    assert response.status_code == 503 and response.json()["error"]["code"] == "server_busy"
    assert "no analysis slot freed" in response.json()["error"]["message"]
    assert client.post("/v1/predict", files={"file": ("x.jpeg", xray_bytes("free"))}).status_code == 200


def test_uploads_in_flight_are_bounded_across_requests(predictor: Predictor) -> None:
    """A ceiling on body bytes being received at once: a flood of large uploads gets 503, not the disk."""
    settings = ApiSettings(max_inflight_bytes=150_000)
    client = TestClient(create_app(limits=predictor.limits, predictor=predictor, settings=settings), base_url=LOCAL)
    big = client.post("/v1/predict", files={"file": ("big.jpeg", b"\xff" * 200_000)})
    assert big.status_code == 503 and big.json()["error"]["code"] == "server_busy"
    assert int(big.headers["retry-after"]) >= 1
    assert client.post("/v1/predict", files={"file": ("x.jpeg", xray_bytes("small"))}).status_code == 200


def test_the_answer_waits_for_no_event_loop_thread(predictor: Predictor) -> None:
    """Requests waiting for a worker wait in the gate's own threads, never in the event loop."""
    app = create_app(limits=predictor.limits, predictor=predictor, max_concurrent=1, max_queue=2)

    async def three_at_once() -> list[int]:
        import httpx

        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url=LOCAL) as client:
            uploads = [client.post("/v1/predict", files={"file": (f"{i}.jpeg", xray_bytes(f"c{i}"))}) for i in range(3)]
            return [r.status_code for r in await asyncio.gather(*uploads)]

    assert asyncio.run(three_at_once()) == [200, 200, 200]


def test_settings_travel_as_json(tmp_path: Path) -> None:
    settings = ApiSettings(api_keys=tmp_path / "k.json", allowed_hosts=("a.example",), deadline=5.0)
    assert ApiSettings.from_json(settings.to_json()) == settings
