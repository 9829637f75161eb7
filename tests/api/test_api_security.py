"""Issue 22, item 6: nothing is served without authentication unless the operator says so; Host, Origin and
security headers hold against a browser on a hostile page (DNS rebinding, cross-origin uploads).

Real app, real model (tiny bundle), real key files made by the real key code and CLI; no mock.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from app_helpers import pneumo_log_handlers_restored, xray_bytes
from fastapi.testclient import TestClient
from model_helpers import SURFACE_META, tiny_bundle
from typer.testing import CliRunner

from pneumo.api.auth import KEY_PREFIX, add_key, read_key_file, remove_key
from pneumo.api.routes import create_app, route_scopes
from pneumo.api.settings import ApiSettings
from pneumo.cli import app as cli_app
from pneumo.inference import Predictor

LOCAL = "http://127.0.0.1"


@pytest.fixture(scope="module")
def predictor(tmp_path_factory: pytest.TempPathFactory) -> Predictor:
    return Predictor(tiny_bundle(tmp_path_factory.mktemp("bundle"), head="wide", **SURFACE_META)[0])


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    path = tmp_path_factory.mktemp("keys") / "keys.json"
    return {
        "path": path,
        "predict": add_key(path, "pacs-bridge", ["predict"]),
        "read": add_key(path, "monitoring", ["read"]),
        "both": add_key(path, "admin", ["predict", "read"]),
    }


@pytest.fixture(scope="module")
def client(predictor: Predictor, keys: dict[str, Any]) -> Iterator[TestClient]:
    app = create_app(predictor=predictor, settings=ApiSettings(api_keys=keys["path"]))
    with TestClient(app, base_url=LOCAL) as test_client:
        yield test_client


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _upload(name: str = "chest.jpeg") -> dict[str, Any]:
    return {"file": (name, xray_bytes("auth"), "image/jpeg")}


def _error(response: Any, status: int, code: str) -> str:
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code
    return str(response.json()["error"]["message"])


# ------------------------------------------------------------------------------------ API keys


def test_without_a_key_nothing_is_served(client: TestClient) -> None:
    """Before: any client was answered (no authentication at all)."""
    for method, path, kwargs in (
        ("post", "/v1/predict", {"files": _upload()}),
        ("post", "/v1/predict/batch", {"files": [("files", ("a.jpeg", xray_bytes("a")))]}),
        ("get", "/v1/model", {}),
        ("get", "/metrics", {}),
        ("get", "/v2/unknown", {}),  # unknown paths too: a scanner learns nothing
    ):
        response = getattr(client, method)(path, **kwargs)
        message = _error(response, 401, "unauthorized")
        assert response.headers["www-authenticate"].startswith("Bearer")
        assert "Authorization: Bearer" in message


@pytest.mark.parametrize("header", ["Bearer pnk_wrong", "Basic cGFjczpwYWNz", "Bearer", "pnk_x"])
def test_a_wrong_key_or_scheme_is_refused(client: TestClient, keys: dict[str, Any], header: str) -> None:
    _error(client.post("/v1/predict", files=_upload(), headers={"Authorization": header}), 401, "unauthorized")
    tampered = keys["predict"][:-1] + ("A" if keys["predict"][-1] != "A" else "B")
    _error(client.post("/v1/predict", files=_upload(), headers=_bearer(tampered)), 401, "unauthorized")


def test_scopes_decide_what_a_key_may_do(client: TestClient, keys: dict[str, Any]) -> None:
    answer = client.post("/v1/predict", files=_upload(), headers=_bearer(keys["predict"]))
    assert answer.status_code == 200 and answer.json()["label"] in ("NORMAL", "PNEUMONIA")
    message = _error(client.get("/metrics", headers=_bearer(keys["predict"])), 403, "insufficient_scope")
    assert "pacs-bridge" in message and "'read'" in message
    _error(client.post("/v1/predict", files=_upload(), headers=_bearer(keys["read"])), 403, "insufficient_scope")
    assert client.get("/v1/model", headers=_bearer(keys["read"])).json()["name"] == "tiny-test"
    assert client.get("/metrics", headers=_bearer(keys["both"])).status_code == 200


def test_every_route_declares_its_scope() -> None:
    assert route_scopes() == {
        "/v1/model": "read",
        "/metrics": "read",
        "/v1/predict": "predict",
        "/v1/predict/batch": "predict",
    }


def test_liveness_stays_open_but_says_what_runs_only_to_a_key_holder(client: TestClient, keys: dict) -> None:
    assert client.get("/health").json() == {"status": "ok"}
    assert client.head("/health").status_code == 200
    assert client.get("/health", headers=_bearer(keys["read"])).json()["model"]["name"] == "tiny-test"
    assert client.get("/docs").status_code == 200 and client.get("/openapi.json").status_code == 200


def test_the_key_is_refused_before_the_body_is_read(predictor: Predictor, keys: dict[str, Any]) -> None:
    """An unauthenticated client cannot make the server receive or parse an upload."""
    read: list[int] = []

    def counting(app: Any) -> Any:
        async def wrapper(scope: Any, receive: Any, send: Any) -> None:
            async def counted() -> Any:
                message = await receive()
                read.append(len(message.get("body", b"")))
                return message

            await app(scope, counted, send)

        return wrapper

    app = create_app(predictor=predictor, settings=ApiSettings(api_keys=keys["path"]))
    client = TestClient(counting(app), base_url=LOCAL)
    _error(client.post("/v1/predict", files={"file": ("big.jpeg", b"\xff" * 200_000)}), 401, "unauthorized")
    assert sum(read) == 0


def test_the_key_file_stores_hashes_only_and_changes_apply_without_restart(
    predictor: Predictor, tmp_path: Path
) -> None:
    path = tmp_path / "keys.json"
    token = add_key(path, "ward-3", ["predict"])
    assert token.startswith(KEY_PREFIX) and len(token) >= 40
    text = path.read_text()
    assert token not in text and token[len(KEY_PREFIX) :] not in text
    assert path.stat().st_mode & 0o777 == 0o600
    assert [(k.name, sorted(k.scopes)) for k in read_key_file(path)] == [("ward-3", ["predict"])]
    other = add_key(path, "ward-4", ["predict"])
    client = TestClient(create_app(predictor=predictor, settings=ApiSettings(api_keys=path)), base_url=LOCAL)
    assert client.post("/v1/predict", files=_upload(), headers=_bearer(token)).status_code == 200
    remove_key(path, "ward-3")
    import time

    time.sleep(1.1)  # the server looks at the key file at most once a second
    _error(client.post("/v1/predict", files=_upload(), headers=_bearer(token)), 401, "unauthorized")
    assert client.post("/v1/predict", files=_upload(), headers=_bearer(other)).status_code == 200


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ("not json", "cannot be read as JSON"),
        ('{"format": "other", "keys": []}', "malformed"),
        ('{"format": "pneumo-api-keys/1", "keys": [{"name": "a", "scopes": ["admin"], "sha256": "00"}]}', "malformed"),
        ('{"format": "pneumo-api-keys/1", "keys": []}', "holds no key"),
    ],
)
def test_a_bad_key_file_stops_the_server_from_starting(
    predictor: Predictor, tmp_path: Path, content: str, fragment: str
) -> None:
    from pneumo.api.auth import KeyFileError

    path = tmp_path / "keys.json"
    path.write_text(content)
    with pytest.raises(KeyFileError, match=fragment):
        create_app(predictor=predictor, settings=ApiSettings(api_keys=path))


def _cli(args: list[str]) -> Any:
    with pneumo_log_handlers_restored():
        return CliRunner().invoke(cli_app, args)


def test_keys_cli_adds_lists_and_removes(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    added = _cli(["serve", "keys", "add", "pacs", "--scope", "predict", "--scope", "read", "--file", str(path)])
    assert added.exit_code == 0, added.output
    token = added.stdout.strip().splitlines()[-1]
    assert token.startswith(KEY_PREFIX) and token not in path.read_text()
    listed = _cli(["serve", "keys", "list", "--file", str(path)])
    assert listed.exit_code == 0 and listed.stdout.startswith("pacs\tpredict,read\t")
    again = _cli(["serve", "keys", "add", "pacs", "--scope", "predict", "--file", str(path)])
    assert again.exit_code == 2 and "exists" in again.output
    bad = _cli(["serve", "keys", "add", "x", "--scope", "admin", "--file", str(path)])
    assert bad.exit_code == 2 and "predict, read" in bad.output
    assert _cli(["serve", "keys", "remove", "pacs", "--file", str(path)]).exit_code == 0
    assert json.loads(path.read_text())["keys"] == []


@pytest.mark.parametrize("host", ["0.0.0.0", "192.0.2.10", "::"])
def test_serve_refuses_a_network_address_without_keys(host: str) -> None:
    """Before: ``pneumo serve --host 0.0.0.0`` served everyone with no authentication."""
    result = _cli(["serve", "--host", host, "--port", "1"])
    assert result.exit_code == 2
    assert "without authentication" in result.output and "--insecure-no-auth" in result.output


# ------------------------------------------------------------------------------- Host and Origin


@pytest.fixture(scope="module")
def open_client(predictor: Predictor) -> TestClient:
    """The loopback workstation set-up: no keys (the operator's explicit choice), default settings."""
    return TestClient(create_app(predictor=predictor), base_url=LOCAL)


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8000", "127.0.0.1.evil.example", "attacker"])
def test_a_foreign_host_name_is_refused_dns_rebinding(open_client: TestClient, host: str) -> None:
    """Before: any Host was answered, so a page whose DNS name rebinds to 127.0.0.1 could use the API."""
    response = open_client.post("/v1/predict", files=_upload(), headers={"Host": host})
    _error(response, 400, "invalid_host")
    assert "label" not in response.text


@pytest.mark.parametrize("host", ["127.0.0.1:8000", "localhost:8000", "[::1]:8000", "localhost"])
def test_loopback_host_names_are_answered(open_client: TestClient, host: str) -> None:
    assert open_client.get("/health", headers={"Host": host}).status_code == 200


def test_a_cross_origin_upload_is_refused_before_it_is_processed(open_client: TestClient) -> None:
    """Before: a multipart POST from another origin (no CORS preflight for it) was processed: 200."""
    response = open_client.post("/v1/predict", files=_upload(), headers={"Origin": "http://evil.example"})
    _error(response, 403, "origin_not_allowed")
    assert "access-control-allow-origin" not in response.headers
    same = open_client.post("/v1/predict", files=_upload(), headers={"Origin": "http://127.0.0.1"})
    assert same.status_code == 200, "a page served by this very host is same-origin"


def test_cors_is_closed_by_default_and_opens_to_configured_origins(predictor: Predictor) -> None:
    closed = TestClient(create_app(predictor=predictor), base_url=LOCAL)
    preflight = {"Origin": "https://viewer.hospital.example", "Access-Control-Request-Method": "POST"}
    assert "access-control-allow-origin" not in closed.options("/v1/predict", headers=preflight).headers
    settings = ApiSettings(cors_origins=("https://viewer.hospital.example",))
    opened = TestClient(create_app(predictor=predictor, settings=settings), base_url=LOCAL)
    answer = opened.options("/v1/predict", headers=preflight)
    assert answer.headers["access-control-allow-origin"] == "https://viewer.hospital.example"
    upload = opened.post("/v1/predict", files=_upload(), headers={"Origin": "https://viewer.hospital.example"})
    assert upload.status_code == 200
    assert upload.headers["access-control-allow-origin"] == "https://viewer.hospital.example"
    other = opened.post("/v1/predict", files=_upload(), headers={"Origin": "https://other.example"})
    _error(other, 403, "origin_not_allowed")


def test_security_headers_on_answers_errors_and_docs(open_client: TestClient) -> None:
    for response in (
        open_client.get("/health"),
        open_client.post("/v1/predict", files={"file": ("x.txt", b"text")}),
        open_client.get("/nothing"),
    ):
        headers = response.headers
        assert headers["x-content-type-options"] == "nosniff" and headers["x-frame-options"] == "DENY"
        assert headers["cache-control"] == "no-store" and headers["referrer-policy"] == "no-referrer"
        assert headers["content-security-policy"].startswith("default-src 'none'")
    docs = open_client.get("/docs")
    assert "script-src 'self'" in docs.headers["content-security-policy"]
