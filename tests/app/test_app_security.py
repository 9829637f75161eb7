"""Issue 22 items 6-7 and issue 23 item 6 on the page: sign-in, the per-session budget, a readable sidebar.

Before: the page served anyone who could reach it, and ``pneumo app --host 0.0.0.0`` started
without a word; the sidebar's "Validation metrics" were 390 raw rows of dotted keys.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from app_helpers import PAGE, open_page, pneumo_log_handlers_restored, xray_bytes
from model_helpers import SURFACE_META, tiny_bundle
from streamlit.testing.v1 import AppTest
from typer.testing import CliRunner

from pneumo.app import support as app_support
from pneumo.app.auth import (
    AUTH_HEADER_ENV,
    PASSWORD_FILE_ENV,
    AppAuth,
    AppAuthError,
    auth_from_env,
    hash_password,
    verify_password,
    write_password_file,
)
from pneumo.cli import app as cli_app
from pneumo.core.bundle import default_bundle_path

PASSWORD = "correct horse battery"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_bundle(tmp_path_factory.mktemp("bundle"), head="wide", **SURFACE_META)[0]


@pytest.fixture
def password_file(tmp_path: Path) -> Path:
    path = tmp_path / "app-password"
    write_password_file(path, PASSWORD)
    return path


def _locked_page(bundle: Path, monkeypatch: pytest.MonkeyPatch, password_file: Path) -> AppTest:
    monkeypatch.setenv(app_support.MODEL_ENV, str(bundle))
    monkeypatch.setenv(PASSWORD_FILE_ENV, str(password_file))
    at = AppTest.from_file(str(PAGE), default_timeout=120)
    at.run()
    assert not at.exception, at.exception
    return at


def test_with_a_password_nothing_shows_before_sign_in(
    bundle: Path, monkeypatch: pytest.MonkeyPatch, password_file: Path
) -> None:
    at = _locked_page(bundle, monkeypatch, password_file)
    assert not at.get("file_uploader") and not at.sidebar.markdown, "no uploader, no model summary"
    at.text_input(key="password").set_value("wrong password")  # a form: sent with its submit button
    at.button[0].click().run()
    assert at.error[0].value == "Wrong password." and not at.get("file_uploader")
    at.text_input(key="password").set_value(PASSWORD)
    at.button[0].click().run()
    assert not at.exception, at.exception
    uploader = at.file_uploader(key="uploads")
    uploader.set_value([("chest.jpeg", xray_bytes("signed"), "image/jpeg")]).run()
    assert [m.value for m in at.markdown if m.value.startswith("#### Result: ")]


def test_the_password_file_holds_a_scrypt_hash_only(password_file: Path) -> None:
    stored = password_file.read_text()
    assert PASSWORD not in stored and stored.startswith("scrypt$")
    assert password_file.stat().st_mode & 0o777 == 0o600
    assert verify_password(PASSWORD, stored) and not verify_password(PASSWORD + "x", stored)
    assert not verify_password(PASSWORD, "scrypt$1048577$8$1$AAAA$AAAA"), "absurd cost parameters are refused"
    assert hash_password(PASSWORD) != hash_password(PASSWORD), "salted"
    with pytest.raises(AppAuthError, match="at least 8"):
        hash_password("short")


def test_the_proxy_header_names_the_user(tmp_path: Path) -> None:
    auth = auth_from_env({AUTH_HEADER_ENV: "X-Forwarded-User"})
    assert auth == AppAuth(header="X-Forwarded-User")
    assert auth.user_from_headers({"x-forwarded-user": " alice "}) == "alice"
    assert auth.user_from_headers({"Host": "pneumo"}) is None
    assert auth.user_from_headers({"X-Forwarded-User": ""}) is None
    with pytest.raises(AppAuthError, match="not valid"):
        auth_from_env({AUTH_HEADER_ENV: "X-User\r\nInjected"})
    (tmp_path / "plain").write_text("hunter2hunter2")
    with pytest.raises(AppAuthError, match="no password hash"):
        auth_from_env({PASSWORD_FILE_ENV: str(tmp_path / "plain")})
    assert auth_from_env({}) is None


def test_behind_a_proxy_a_request_without_the_header_sees_nothing(
    bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(app_support.MODEL_ENV, str(bundle))
    monkeypatch.setenv(AUTH_HEADER_ENV, "X-Forwarded-User")
    at = AppTest.from_file(str(PAGE), default_timeout=120)
    at.run()  # the test harness sends no headers: as a client reaching the page around the proxy
    assert not at.exception and not at.get("file_uploader")
    assert "hospital's sign-in" in at.error[0].value


def _cli(args: list[str], **kwargs: Any) -> Any:
    with pneumo_log_handlers_restored():
        return CliRunner().invoke(cli_app, args, **kwargs)


def test_app_refuses_a_network_address_without_a_sign_in() -> None:
    result = _cli(["app", "--host", "0.0.0.0"])
    assert result.exit_code == 2 and "without a sign-in" in result.output and "--password-file" in result.output


def test_app_password_command_writes_the_hash(tmp_path: Path) -> None:
    path = tmp_path / "pw"
    result = _cli(["app", "password", str(path)], input=PASSWORD + "\n")
    assert result.exit_code == 0, result.output
    assert verify_password(PASSWORD, path.read_text())
    assert _cli(["app", "password", str(tmp_path / "x")], input="short\n").exit_code == 2


# ---------------------------------------------------------------------------------------- sidebar


def test_sidebar_shows_headline_metrics_with_intervals_and_a_robustness_summary(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Issue 23 item 6, on the shipped bundle: before, 390 raw dotted rows, robustness first, values cut off."""
    at = open_page(default_bundle_path(), monkeypatch)
    headline = at.sidebar.dataframe[0].value
    assert list(headline.columns) == ["metric", "value", "95% CI"]
    assert list(headline["metric"])[:3] == ["Sensitivity", "Specificity", "ROC AUC"]
    assert all(value.endswith("%") for value in headline["value"])
    assert all(" - " in interval for interval in headline["95% CI"])
    assert len(headline) <= 7
    robustness = at.sidebar.dataframe[1].value
    assert list(robustness.columns) == ["metric", "clean", "mean", "worst"]
    assert 1 <= len(robustness) <= 10 and all("(" in worst for worst in robustness["worst"])
    assert "validation images" in " ".join(c.value for c in at.sidebar.caption)
    assert at.sidebar.expander[0].label == "Full validation record"
    assert not any("robustness.shifts" in m.value for m in at.sidebar.markdown), "no raw dotted keys"
