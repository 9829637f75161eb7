"""Tests of pneumo.api.routes (FastAPI TestClient): every endpoint, status code and error body; the serve command."""

from __future__ import annotations

import base64
import io
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from app_helpers import dicom_bytes, pneumo_log_handlers_restored, xray_array, xray_bytes
from conftest import noise_image
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from model_helpers import SURFACE_META, tiny_bundle
from PIL import Image
from typer.testing import CliRunner

from pneumo.api.routes import create_app
from pneumo.cli import app as cli_app
from pneumo.core.decode import DEFAULT_LIMITS, Limits
from pneumo.inference import Predictor
from pneumo.inference.cam import CAM_LAYER
from pneumo.modeling.torch_backend import torch_predictor

MAX_BYTES = 300_000
#: The API answers loopback host names only by default (DNS rebinding): tests call it as 127.0.0.1.
LOCAL = "http://127.0.0.1"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_bundle(tmp_path_factory.mktemp("bundle"), head="wide", **SURFACE_META)[0]


@pytest.fixture(scope="module")
def predictor(bundle: Path) -> Predictor:
    return Predictor(bundle, limits=Limits(max_bytes=MAX_BYTES))


@pytest.fixture(scope="module")
def client(predictor: Predictor) -> Iterator[TestClient]:
    app = create_app(limits=predictor.limits, predictor=predictor, max_batch_files=3)
    with TestClient(app, base_url=LOCAL, raise_server_exceptions=False) as test_client:
        yield test_client


def _upload(name: str, data: bytes, mime: str = "application/octet-stream") -> dict[str, Any]:
    return {"file": (name, data, mime)}


def _assert_error(response: Any, status: int, code: str) -> dict[str, str]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}
    assert body["error"]["code"] == code
    assert "Traceback" not in body["error"]["message"]
    return body["error"]


def test_health(client: TestClient) -> None:
    response = client.get("/health")
    assert response.status_code == 200
    assert response.json()["status"] == "ok"
    assert response.json()["model"] == {"name": "tiny-test", "version": "9.9.9", "arch": "efficientnet_lite0"}


def test_model_metadata(client: TestClient) -> None:
    info = client.get("/v1/model").json()
    assert info["arch"] == "efficientnet_lite0"
    assert info["labels"] == ["NORMAL", "PNEUMONIA"]
    assert info["threshold"] == 0.5
    assert info["preprocess"]["input_size"] == 64
    assert info["metrics"] == {"roc_auc": 0.5, "sensitivity": 0.25}
    limits = info["limits"]
    assert limits.pop("max_concurrent") >= 1 and limits.pop("max_queue") >= 0 and limits.pop("deadline_seconds") > 0
    assert limits == {"max_upload_bytes": MAX_BYTES, "max_pixels": DEFAULT_LIMITS.max_pixels, "max_batch_files": 3}
    assert info["heatmaps"] is True and info["ood"] == {"enabled": False}
    assert "not a diagnosis" in info["intended_use"]
    assert "bundle_dir" not in info, "the server's file paths are not the client's business"


def test_predict_matches_the_predictor(client: TestClient, predictor: Predictor) -> None:
    data = xray_bytes("api")
    response = client.post("/v1/predict", files=_upload("chest.jpeg", data, "image/jpeg"))
    assert response.status_code == 200, response.text
    body = response.json()
    expected = predictor.predict(data)
    assert body["file"] == "chest.jpeg"
    assert body["label"] == expected.label
    assert body["probability"] == pytest.approx(expected.probability, abs=1e-6)
    assert body["label"] == ("PNEUMONIA" if body["probability"] >= body["threshold"] else "NORMAL")
    assert sum(body["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    assert body["model"] == {"name": "tiny-test", "version": "9.9.9", "arch": "efficientnet_lite0"}
    assert body["format"] == "jpeg" and body["heatmap"] is None
    assert body["borderline"] is expected.borderline and body["operating_point"] == expected.operating_point
    assert body["crop"] is None  # the tiny bundle does not frame its films


def test_the_default_model_says_which_lung_box_it_read() -> None:
    """The shipped bundle frames films to their lungs: the answer carries the box, as the predictor gives it."""
    predictor = Predictor()
    assert predictor.meta.preprocess.framed
    film = sorted((Path(__file__).resolve().parents[2] / "examples" / "films" / "NORMAL").iterdir())[0]
    data = film.read_bytes()
    with TestClient(create_app(predictor=predictor), base_url=LOCAL) as client:
        response = client.post("/v1/predict", files=_upload(film.name, data, "image/jpeg"))
    assert response.status_code == 200, response.text
    body = response.json()
    expected = predictor.predict(data)
    assert body["crop"] == pytest.approx(expected.crop) and body["crop"]["found"] is True
    assert 0 <= body["crop"]["x0"] < body["crop"]["x1"] <= 1 and 0 <= body["crop"]["y0"] < body["crop"]["y1"] <= 1
    assert body["operating_point"] == predictor.meta.threshold_rule != ""


def test_predict_png16_and_dicom(client: TestClient) -> None:
    png16 = io.BytesIO()
    Image.fromarray(xray_array("png16", bits=16).astype(np.uint16)).save(png16, format="PNG")
    response = client.post("/v1/predict", files=_upload("deep.png", png16.getvalue(), "image/png"))
    assert response.status_code == 200 and response.json()["format"] == "png"
    dicom = dicom_bytes(xray_array("dcm"), ViewPosition="AP", PatientAge="003Y")
    body = client.post("/v1/predict", files=_upload("IM0001", dicom)).json()
    assert body["format"] == "dicom"
    assert body["metadata"]["ViewPosition"] == "AP" and body["metadata"]["PatientAge"] == "003Y"


def test_predict_with_heatmap(client: TestClient, predictor: Predictor) -> None:
    data = xray_bytes("heat", size=120)
    response = client.post("/v1/predict?heatmap=true&opacity=0.6", files=_upload("x.jpg", data))
    assert response.status_code == 200, response.text
    body = response.json()
    heatmap = body["heatmap"]
    overlay = Image.open(io.BytesIO(base64.b64decode(heatmap["png_base64"])))
    assert overlay.format == "PNG" and overlay.mode == "RGB"
    # Laid over the image the model read (a JPEG is draft-decoded: Predictor.draft_size).
    assert overlay.size == (heatmap["width"], heatmap["height"]) == predictor.decode(data).image.size
    assert heatmap["target_label"] == body["label"] and heatmap["opacity"] == 0.6
    assert heatmap["layer"] == CAM_LAYER  # CAM from the served graph: the API never imports torch


@pytest.mark.parametrize(
    ("data", "status", "code"),
    [
        (b"just some text, not an image", 415, "unsupported_format"),
        (b"", 400, "empty_file"),
        (xray_bytes("cut")[:300], 400, "corrupt_image"),  # header only: no scan data at all
        (xray_bytes("cut")[:-200], 400, "truncated_image"),
        (dicom_bytes(xray_array(), modality="CT"), 422, "unsupported_modality"),
        (dicom_bytes(xray_array(), with_pixels=False), 422, "dicom_no_pixel_data"),
    ],
)
def test_bad_inputs_get_4xx_json(client: TestClient, data: bytes, status: int, code: str) -> None:
    response = client.post("/v1/predict", files=_upload("bad.bin", data))
    assert response.status_code == status, response.text
    _assert_error(response, status, code)


def test_file_over_the_limit_gets_413(client: TestClient) -> None:
    """Over the per-file limit but within the multipart allowance: refused by the endpoint."""
    error = _assert_error(
        client.post("/v1/predict", files=_upload("big.jpg", b"\xff" * (MAX_BYTES + 10))), 413, "file_too_large"
    )
    assert "MB" in error["message"]


def test_body_far_over_the_limit_is_refused_from_its_length(client: TestClient) -> None:
    _assert_error(
        client.post("/v1/predict", files=_upload("huge.jpg", b"\xff" * (3 * MAX_BYTES))), 413, "request_too_large"
    )


def test_chunked_body_over_the_limit_is_cut_off(client: TestClient) -> None:
    def body() -> Iterator[bytes]:
        yield b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="x.jpg"\r\n\r\n'
        for _ in range(40):
            yield b"\xff" * 20_000

    headers = {"content-type": "multipart/form-data; boundary=xyz"}
    _assert_error(client.post("/v1/predict", content=body(), headers=headers), 413, "request_too_large")


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status", "code"),
    [
        ("post", "/v1/predict", {}, 422, "invalid_request"),
        ("post", "/v1/predict", {"data": {"file": "not a file"}}, 422, "invalid_request"),
        ("post", "/v1/predict?opacity=2", {"files": _upload("x.jpg", b"x")}, 422, "invalid_request"),
        ("post", "/v1/predict?heatmap=maybe", {"files": _upload("x.jpg", b"x")}, 422, "invalid_request"),
        ("get", "/v1/predict", {}, 405, "method_not_allowed"),
        ("get", "/v2/nothing", {}, 404, "not_found"),
        ("post", "/v1/predict/batch", {}, 422, "invalid_request"),
    ],
)
def test_malformed_requests(client: TestClient, method: str, path: str, kwargs: dict, status: int, code: str) -> None:
    _assert_error(getattr(client, method)(path, **kwargs), status, code)


def test_not_a_chest_xray_is_422(gated_bundle: Path) -> None:
    """A real non-X-ray (noise) through the real OOD gate of a calibrated bundle: refused with 422."""
    buffer = io.BytesIO()
    noise_image(5).save(buffer, format="PNG")
    with TestClient(create_app(gated_bundle), base_url=LOCAL) as gated:
        error = _assert_error(
            gated.post("/v1/predict", files=_upload("noise.png", buffer.getvalue())), 422, "not_a_chest_xray"
        )
        assert "noise.png" in error["message"] and "chest X-ray" in error["message"]
        assert gated.get("/v1/model").json()["ood"]["enabled"] is True


def test_unexpected_failure_is_a_json_500_without_details(
    client: TestClient, predictor: Predictor, monkeypatch: pytest.MonkeyPatch
) -> None:
    def crash(source: Any, name: str | None = None) -> Any:
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(predictor, "predict", crash)
    response = client.post("/v1/predict", files=_upload("x.jpg", xray_bytes()))
    error = _assert_error(response, 500, "internal_error")
    assert "secret" not in response.text and "RuntimeError" not in error["message"]


def test_batch_keeps_order_and_reports_each_error(client: TestClient) -> None:
    files = [
        ("files", ("one.jpg", xray_bytes("one"), "image/jpeg")),
        ("files", ("two.txt", b"not an image", "text/plain")),
        ("files", ("three.dcm", dicom_bytes(xray_array("three")), "application/dicom")),
    ]
    response = client.post("/v1/predict/batch", files=files)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["file"] for r in results] == ["one.jpg", "two.txt", "three.dcm"]
    assert results[0]["label"] in ("NORMAL", "PNEUMONIA") and results[2]["format"] == "dicom"
    assert results[1] == {
        "file": "two.txt",
        "error": {"code": "unsupported_format", "message": results[1]["error"]["message"]},
    }


def test_batch_with_heatmaps_and_an_oversize_file(client: TestClient) -> None:
    files = [
        ("files", ("big.jpg", b"\xff" * (MAX_BYTES + 1), "image/jpeg")),
        ("files", ("ok.jpg", xray_bytes("ok"), "image/jpeg")),
    ]
    results = client.post("/v1/predict/batch?heatmap=true", files=files).json()["results"]
    assert results[0]["error"]["code"] == "file_too_large"
    assert results[1]["heatmap"]["png_base64"]


def test_batch_over_the_file_count_is_refused(client: TestClient) -> None:
    files = [("files", (f"{i}.jpg", xray_bytes(str(i)), "image/jpeg")) for i in range(4)]
    _assert_error(client.post("/v1/predict/batch", files=files), 413, "too_many_files")


def test_openapi_docs(client: TestClient) -> None:
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/health", "/v1/model", "/v1/predict", "/v1/predict/batch"} <= set(paths)
    assert "413" in paths["/v1/predict"]["post"]["responses"]


_SEEDS = [xray_bytes("fuzz"), xray_bytes("fuzz", fmt="PNG"), dicom_bytes(xray_array("fuzz"))]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.sampled_from(_SEEDS), cut=st.integers(0, 4000), noise=st.binary(max_size=64), at=st.integers(0, 400))
def test_no_user_input_causes_a_500(client: TestClient, seed: bytes, cut: int, noise: bytes, at: int) -> None:
    """Truncated and corrupted JPEG/PNG/DICOM files get a 2xx or 4xx, never a 500."""
    data = seed[: max(0, len(seed) - cut)]
    data = data[:at] + noise + data[at + len(noise) :]
    response = client.post("/v1/predict", files=_upload("fuzz.bin", data))
    assert response.status_code < 500, response.text


# ------------------------------------------------------------------------------------- pneumo serve


def test_serve_command_runs_uvicorn_on_the_app(bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pneumo.api import server

    seen: dict[str, Any] = {}
    monkeypatch.setattr(server, "serve", lambda options, **kwargs: seen.update(options=options, **kwargs))
    args = ["serve", "--model", str(bundle), "--port", "8123", "--max-upload-mb", "0.25", "--max-batch-files", "2"]
    result = _invoke(args)
    assert result.exit_code == 0, result.output
    assert isinstance(seen["app"], FastAPI)
    assert (seen["host"], seen["port"]) == ("127.0.0.1", 8123)
    limits = TestClient(seen["app"], base_url=LOCAL).get("/v1/model").json()["limits"]
    assert limits["max_upload_bytes"] == 2**18 and limits["max_batch_files"] == 2


def test_serve_command_refuses_a_missing_bundle(tmp_path: Path) -> None:
    result = _invoke(["serve", "--model", str(tmp_path / "nope")])
    assert result.exit_code == 2
    assert "bundle" in result.output.lower()


def test_without_a_heatmap_explainer_the_api_serves_answers_and_refuses_heatmaps(bundle: Path) -> None:
    """A backend without a feature map (here eager PyTorch) has no CAM: answers still come, heatmaps are a 501."""
    predictor = torch_predictor(bundle)
    client = TestClient(create_app(limits=predictor.limits, predictor=predictor), base_url=LOCAL)
    assert client.get("/v1/model").json()["heatmaps"] is False
    assert client.post("/v1/predict", files=_upload("x.jpg", xray_bytes())).status_code == 200
    response = client.post("/v1/predict?heatmap=true", files=_upload("x.jpg", xray_bytes()))
    _assert_error(response, 501, "explain_unavailable")


def _invoke(args: list[str]) -> Any:
    with pneumo_log_handlers_restored():
        return CliRunner().invoke(cli_app, args)


# ------------------------------------------------------------------ issue 12: nothing dropped, nothing leaked


def test_two_files_under_the_single_file_field_are_refused(client: TestClient) -> None:
    """F4: the first file used to be dropped silently (200 with the second file's answer)."""
    files = [("file", ("first.jpg", xray_bytes("first"), "image/jpeg")), ("file", ("second.jpg", xray_bytes("2")))]
    error = _assert_error(client.post("/v1/predict", files=files), 413, "too_many_files")
    assert "/v1/predict/batch" in error["message"]


def test_no_server_path_in_model_metadata_written_or_served(tmp_path: Path) -> None:
    """F5: the training config's folders were served as absolute paths; now names only, in the file and the API."""
    training = {
        "data": "/srv/hospital/secret/chest_xray",
        "out": "/home/alice/runs/lite0",
        "config": {"cache_dir": "/var/cache/pneumo", "paths": ["/opt/x/weights.pth", "relative/name"]},
        "url": "https://example.org/x",
    }
    folder = tiny_bundle(tmp_path / "bundle", training=training, head="wide", **SURFACE_META)[0]
    written = (folder / "bundle.json").read_text()
    client = TestClient(create_app(predictor=Predictor(folder)), base_url=LOCAL)
    for text in (written, client.get("/v1/model").text, client.get("/health").text):
        for secret in ("/srv", "/home", "/var", "/opt", str(tmp_path)):
            assert secret not in text
    info = client.get("/v1/model").json()
    assert info["training"]["data"] == "chest_xray" and info["training"]["out"] == "lite0"
    assert info["training"]["config"]["paths"] == ["weights.pth", "relative/name"]
    assert info["training"]["url"] == "https://example.org/x"


def test_bundles_written_before_the_fix_are_stripped_when_served(tmp_path: Path) -> None:
    folder = tiny_bundle(tmp_path / "old", head="wide", **SURFACE_META)[0]
    meta = json.loads((folder / "bundle.json").read_text())
    meta["training"] = {"data": "/work/shared/data/chest_xray_224"}
    (folder / "bundle.json").write_text(json.dumps(meta))
    info = TestClient(create_app(predictor=Predictor(folder)), base_url=LOCAL).get("/v1/model").json()
    assert info["training"]["data"] == "chest_xray_224"


def test_the_shipped_bundle_holds_no_server_path() -> None:
    from pneumo.core.bundle import META_FILE, default_bundle_path

    text = (default_bundle_path() / META_FILE).read_text()
    assert '"/' not in text and "/work" not in text


def test_trailing_slash_answers_as_the_canonical_route(client: TestClient) -> None:
    """F9: ``/v1/predict/`` answered a 307 with an empty body."""
    response = client.post("/v1/predict/", files=_upload("x.jpg", xray_bytes("slash")), follow_redirects=False)
    assert response.status_code == 200 and response.json()["file"] == "x.jpg"
    assert client.get("/health/", follow_redirects=False).json()["status"] == "ok"
    _assert_error(client.get("/nothing/here/", follow_redirects=False), 404, "not_found")


def test_head_health(client: TestClient) -> None:
    """F9: ``HEAD /health`` answered 405."""
    response = client.head("/health")
    assert response.status_code == 200 and response.content == b""


@pytest.mark.parametrize(
    "body",
    [b"--xyz\r\nContent-Disposition: form-data; name=file\r\n\r\nabc", b"not multipart at all", b"--xyz--garbage"],
)
def test_malformed_multipart_is_422_as_documented(client: TestClient, body: bytes) -> None:
    """F9: a body that does not parse as multipart answered 400; docs/api.md says 422 ``invalid_request``."""
    response = client.post("/v1/predict", content=body, headers={"content-type": "multipart/form-data; boundary=xyz"})
    _assert_error(response, 422, "invalid_request")


def test_docs_pages_load_their_assets_from_this_server(client: TestClient) -> None:
    """F9: /docs loaded Swagger UI from a CDN and stayed blank offline."""
    for page in ("/docs", "/redoc"):
        html = client.get(page).text
        assert "cdn.jsdelivr.net" not in html and "https://" not in html.split("<body>")[-1]
        assets = re.findall(r'(?:src|href)="(/[^"]+\.(?:js|css))"', html)
        assert assets, html
        for asset in assets:
            response = client.get(asset)
            assert response.status_code == 200 and len(response.content) > 10_000, asset


def test_body_caps_come_from_the_route_declarations() -> None:
    """Issue 10: every route that takes files is capped from its declaration, not from a table of paths."""
    from pneumo.api.routes import _body_caps, router

    caps = _body_caps(1000, max_batch_files=5)
    upload_routes = {
        route.path for route in router.routes if getattr(route, "dependant", None) and route.dependant.body_params
    }
    assert set(caps) == upload_routes == {"/v1/predict", "/v1/predict/batch"}
    assert caps == {"/v1/predict": 1000, "/v1/predict/batch": 5000}


def test_a_busy_server_answers_503_with_retry_after(predictor: Predictor) -> None:
    """Backpressure: with every slot and queue place taken, a request is refused at once, in JSON."""
    app = create_app(limits=predictor.limits, predictor=predictor, max_concurrent=1, max_queue=0)
    gate = app.state.pneumo.gate
    with TestClient(app, base_url=LOCAL) as client, gate.admit():  # one request admitted and running
        response = client.post("/v1/predict", files=_upload("x.jpg", xray_bytes("busy")))
        error = _assert_error(response, 503, "server_busy")
        assert int(response.headers["retry-after"]) >= 1 and "busy" in error["message"]
        assert client.get("/health").status_code == 200  # health is never refused
    free = TestClient(app, base_url=LOCAL).post("/v1/predict", files=_upload("x.jpg", xray_bytes("free")))
    assert free.status_code == 200
