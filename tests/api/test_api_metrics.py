"""Issue 22, observability: ``/metrics`` (Prometheus text format) and JSON logs with a request id.

Before: no metrics endpoint (404) and plain-text logs without any id to follow a request by.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from app_helpers import xray_bytes
from conftest import noise_image
from fastapi.testclient import TestClient
from model_helpers import SURFACE_META, tiny_bundle
from prometheus_client.parser import text_string_to_metric_families

from pneumo.api.observability import JsonFormatter, RequestIdFilter
from pneumo.api.routes import create_app
from pneumo.inference import Predictor

LOCAL = "http://127.0.0.1"


def _samples(client: TestClient) -> dict[tuple[str, frozenset], float]:
    """Every sample of ``/metrics``, by name and labels, parsed with prometheus-client's own parser."""
    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def _value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_bundle(tmp_path_factory.mktemp("bundle"), head="wide", **SURFACE_META)[0]


def test_requests_refusals_and_answers_are_counted(bundle: Path) -> None:
    client = TestClient(create_app(predictor=Predictor(bundle), max_batch_files=2), base_url=LOCAL)
    labels = []
    for i in range(5):
        answer = client.post("/v1/predict", files={"file": (f"{i}.jpeg", xray_bytes(f"m{i}", pneumonia=i % 2 == 0))})
        labels.append(answer.json()["label"])
    client.post("/v1/predict", files={"file": ("notes.txt", b"not an image")})
    batch = client.post("/v1/predict/batch", files=[("files", ("a.jpeg", xray_bytes("a"))), ("files", ("b.txt", b"t"))])
    labels.append(batch.json()["results"][0]["label"])
    client.post("/v1/predict/batch", files=[("files", (f"{i}.jpeg", b"x")) for i in range(3)])
    client.get("/no/such/path")
    samples = _samples(client)

    assert _value(samples, "pneumo_http_requests_total", route="/v1/predict", method="POST", status="200") == 5
    assert _value(samples, "pneumo_http_requests_total", route="/v1/predict", method="POST", status="415") == 1
    assert _value(samples, "pneumo_http_requests_total", route="/v1/predict/batch", method="POST", status="200") == 1
    assert _value(samples, "pneumo_http_requests_total", route="/v1/predict/batch", method="POST", status="413") == 1
    assert _value(samples, "pneumo_http_requests_total", route="other", method="GET", status="404") == 1
    assert _value(samples, "pneumo_http_request_duration_seconds_count", route="/v1/predict") == 6
    assert _value(samples, "pneumo_refusals_total", code="unsupported_format") == 2  # one request, one batch file
    assert _value(samples, "pneumo_refusals_total", code="too_many_files") == 1
    assert _value(samples, "pneumo_refusals_total", code="not_found") == 1
    for label in ("NORMAL", "PNEUMONIA"):
        assert _value(samples, "pneumo_predictions_total", label=label) == labels.count(label)
    assert _value(samples, "pneumo_positive_rate_rolling") == pytest.approx(labels.count("PNEUMONIA") / 6)
    assert _value(samples, "pneumo_probability_count") == 6
    assert _value(samples, "pneumo_requests_admitted") == 0


def test_busy_answers_and_queue_depth_are_visible(bundle: Path) -> None:
    app = create_app(predictor=Predictor(bundle), max_concurrent=1, max_queue=0)
    client = TestClient(app, base_url=LOCAL)
    with app.state.pneumo.gate.admit():
        assert _value(_samples(client), "pneumo_requests_admitted") == 1
        assert client.post("/v1/predict", files={"file": ("x.jpeg", xray_bytes("busy"))}).status_code == 503
    samples = _samples(client)
    assert _value(samples, "pneumo_busy_total") == 1
    assert _value(samples, "pneumo_refusals_total", code="server_busy") == 1
    assert _value(samples, "pneumo_requests_admitted") == 0


def test_ood_scores_are_a_distribution_around_the_threshold(gated_bundle: Path) -> None:
    """The drift signal: where accepted images fall relative to the gate's threshold; refusals by code."""
    predictor = Predictor(gated_bundle)
    assert predictor.meta.ood is not None
    client = TestClient(create_app(predictor=predictor), base_url=LOCAL)
    for i in range(4):
        upload = {"file": (f"{i}.png", xray_bytes(f"o{i}", fmt="PNG"))}
        assert client.post("/v1/predict", files=upload).status_code in (200, 422)
    noise = io.BytesIO()
    noise_image(3).save(noise, format="PNG")
    client.post("/v1/predict", files={"file": ("noise.png", noise.getvalue())})
    samples = _samples(client)
    accepted = _value(samples, "pneumo_predictions_total", label="NORMAL") + _value(
        samples, "pneumo_predictions_total", label="PNEUMONIA"
    )
    assert _value(samples, "pneumo_ood_score_count") == accepted >= 1
    threshold = predictor.meta.ood.threshold
    bounds = [float(dict(labels)["le"]) for name, labels in samples if name == "pneumo_ood_score_bucket"]
    assert any(bound == pytest.approx(threshold, rel=1e-3) for bound in bounds), (threshold, bounds)
    assert _value(samples, "pneumo_refusals_total", code="not_a_chest_xray") >= 1


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    """The ``pneumo`` logger's records as ``pneumo serve`` writes them: JSON lines, stamped with request ids."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RequestIdFilter())
    logger = logging.getLogger("pneumo")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield stream
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_every_answer_carries_a_request_id_and_one_json_log_line(bundle: Path, json_log: io.StringIO) -> None:
    client = TestClient(create_app(predictor=Predictor(bundle)), base_url=LOCAL)
    upload = {"file": ("x.jpeg", xray_bytes("id"))}
    mine = client.post("/v1/predict", files=upload, headers={"X-Request-ID": "ris-42"})
    fresh = client.post("/v1/predict", files={"file": ("x.txt", b"text")})
    hostile = client.get("/health", headers={"X-Request-ID": "bad id;" + "x" * 100})
    assert mine.headers["x-request-id"] == "ris-42"
    assert len(fresh.headers["x-request-id"]) == 32
    assert len(hostile.headers["x-request-id"]) == 32, "an id that is not a short token is replaced"
    by_id = {line["request_id"]: line for line in _lines(json_log) if line.get("event") == "request"}
    assert by_id["ris-42"]["status"] == 200 and by_id["ris-42"]["route"] == "/v1/predict"
    refused = by_id[fresh.headers["x-request-id"]]
    assert refused["status"] == 415 and refused["error_code"] == "unsupported_format"
    assert refused["duration_ms"] >= 0 and refused["client"] and refused["level"] == "INFO"


def test_log_lines_inside_a_request_carry_its_id(bundle: Path, json_log: io.StringIO) -> None:
    """A failure logged deep inside the request (here the 500 handler's traceback) names the request."""
    predictor = Predictor(bundle)
    client = TestClient(create_app(predictor=predictor), base_url=LOCAL, raise_server_exceptions=False)
    original = predictor.predict

    def crash(*_args: object, **_kwargs: object) -> None:
        raise RuntimeError("boom")

    predictor.predict = crash  # type: ignore[method-assign]
    try:
        response = client.post("/v1/predict", files={"file": ("x.jpeg", xray_bytes("crash"))})
    finally:
        predictor.predict = original  # type: ignore[method-assign]
    assert response.status_code == 500
    errors = [line for line in _lines(json_log) if line["level"] == "ERROR"]
    assert errors and errors[0]["request_id"] == response.headers["x-request-id"]
    assert "RuntimeError: boom" in errors[0]["exception"]
