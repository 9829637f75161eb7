"""Tests of the Streamlit page (streamlit.testing.v1.AppTest), its helpers, and the ``pneumo app`` command."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import pytest
from app_helpers import PAGE, dicom_bytes, open_page, pneumo_log_handlers_restored, xray_array, xray_bytes
from model_helpers import SURFACE_META, tiny_bundle
from streamlit.testing.v1 import AppTest
from typer.testing import CliRunner

from pneumo.app import support as app_support
from pneumo.cli import app as cli_app
from pneumo.core.errors import PneumoError
from pneumo.inference import Predictor, model_info


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_bundle(tmp_path_factory.mktemp("bundle"), head="wide", **SURFACE_META)[0]


@pytest.fixture
def page(bundle: Path, monkeypatch: pytest.MonkeyPatch) -> AppTest:
    return open_page(bundle, monkeypatch)


def _upload(at: AppTest, *files: tuple[str, bytes]) -> AppTest:
    at.file_uploader(key="uploads").set_value([(name, data, "application/octet-stream") for name, data in files])
    at.run()
    assert not at.exception, at.exception
    return at


def _results(at: AppTest) -> list[str]:
    return [m.value for m in at.markdown if m.value.startswith("#### Result: ")]


def test_page_shows_model_and_intended_use_before_any_upload(page: AppTest) -> None:
    assert "not a diagnosis" in page.sidebar.warning[0].value
    summary = " ".join(m.value for m in page.sidebar.markdown)
    assert "tiny-test" in summary and "efficientnet_lite0" in summary and "0.500" in summary
    metrics = page.sidebar.dataframe[0].value
    assert list(metrics["metric"]) == ["Sensitivity", "ROC AUC"] and list(metrics["value"]) == ["25.0%", "50.0%"]
    assert page.info[0].value.startswith("Upload")
    assert page.file_uploader(key="uploads").accept_multiple_files


def test_one_upload_gets_label_probability_and_heatmap(page: AppTest, bundle: Path) -> None:
    data = xray_bytes("app")
    _upload(page, ("chest.jpeg", data))
    expected = Predictor(bundle).predict(data)
    assert _results(page) == [f"#### Result: {expected.label}"]
    text = " ".join(m.value for m in page.markdown)
    assert f"**{expected.probability:.1%}**" in text and "threshold in force 50.0%" in text
    captions = [image.proto.imgs[0].caption for image in page.get("image")]
    assert captions[0] == "Uploaded image" and captions[1].startswith("Grad-CAM")
    assert not page.error and not page.main.dataframe, "one image: no results table"


def _overlay_url(page: AppTest) -> str:
    """The media URL of the heatmap overlay: Streamlit names media files by a hash of their bytes."""
    return str(page.get("image")[1].proto.imgs[0].url)


def test_heatmap_toggle_and_opacity(page: AppTest) -> None:
    _upload(page, ("chest.jpeg", xray_bytes("toggle")))
    default = _overlay_url(page)
    page.slider(key="opacity").set_value(0.9).run()
    assert not page.exception and len(page.get("image")) == 2
    strong = _overlay_url(page)
    assert strong != default, "a new opacity must redraw the overlay"
    page.slider(key="opacity").set_value(0.45).run()
    assert _overlay_url(page) == default, "the same opacity draws the same overlay"
    page.toggle(key="show_heatmap").set_value(False).run()
    assert not page.exception
    assert len(page.get("image")) == 1, "heatmap off: the image alone"
    assert _results(page), "the answer stays"


def test_bad_file_gets_a_message_and_the_others_still_run(page: AppTest) -> None:
    dicom = dicom_bytes(xray_array("dcm"), ViewPosition="AP", PatientAge="004Y")
    _upload(page, ("a.jpeg", xray_bytes("a")), ("notes.txt", b"not an x-ray"), ("IM0001", dicom))
    assert len(_results(page)) == 2
    assert len(page.error) == 1
    assert "notes.txt" in page.error[0].value and "unsupported_format" in page.error[0].value
    text = " ".join(m.value for m in page.markdown)
    assert "**View position:** AP" in text and "**Patient age:** 004Y" in text and "**Modality:** DX" in text
    table = page.main.dataframe[0].value
    assert list(table["file"]) == ["a.jpeg", "notes.txt", "IM0001"]
    assert list(table["error_code"]) == ["", "unsupported_format", ""]
    assert page.get("download_button")[0].proto.label == "Download results (CSV)"


def test_unexpected_failure_is_a_friendly_message(page: AppTest, monkeypatch: pytest.MonkeyPatch) -> None:
    def crash(self: Predictor, source: Any, name: str | None = None) -> Any:
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(Predictor, "predict", crash)
    _upload(page, ("crash.jpeg", xray_bytes("crash")))
    assert len(page.error) == 1
    assert app_support.INTERNAL_ERROR_MESSAGE in page.error[0].value
    assert "secret" not in page.error[0].value


def test_heatmap_failure_keeps_the_answer(page: AppTest, monkeypatch: pytest.MonkeyPatch) -> None:
    from pneumo.inference.cam import OnnxCamExplainer

    def crash(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("cam broke")

    monkeypatch.setattr(OnnxCamExplainer, "explain", crash)
    _upload(page, ("nocam.jpeg", xray_bytes("nocam")))
    assert len(_results(page)) == 1
    assert "heatmap could not be computed" in page.info[0].value


def test_missing_bundle_is_a_message_not_a_traceback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(app_support.MODEL_ENV, str(tmp_path / "no_bundle"))
    at = AppTest.from_file(str(PAGE), default_timeout=60)
    at.run()
    assert not at.exception
    assert at.error[0].value.startswith("The model could not be loaded")


# ------------------------------------------------------------------------------------------ helpers


def test_bundle_from_args_prefers_argv_then_env() -> None:
    env = {app_support.MODEL_ENV: "/from/env"}
    assert app_support.bundle_from_args(["--model", "/a"], env) == Path("/a")
    assert app_support.bundle_from_args(["-x", "--model=/b"], env) == Path("/b")
    assert app_support.bundle_from_args(["-m", "not slow", "tests"], env) == Path("/from/env")
    assert app_support.bundle_from_args([], {}) is None


def test_results_csv_has_one_row_per_upload() -> None:
    ok = app_support.Analysis("a.jpg", prediction=_prediction())
    bad = app_support.Analysis("b.txt", error=PneumoError("unreadable", code="corrupt_image"))
    rows = list(csv.DictReader(io.StringIO(app_support.results_csv([ok, bad]).decode())))
    assert [row["file"] for row in rows] == ["a.jpg", "b.txt"]
    assert rows[0]["label"] == "PNEUMONIA" and float(rows[0]["probability"]) == pytest.approx(0.8123)
    assert rows[1]["error_code"] == "corrupt_image" and rows[1]["label"] == ""


def test_importing_the_page_runs_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Streamlit runs the page as ``__main__``; an import (a test, a tool) must not start the page."""
    import importlib
    import sys

    calls: list[Any] = []
    monkeypatch.setattr(app_support, "bundle_from_args", lambda *args, **kwargs: calls.append(args))
    monkeypatch.delitem(sys.modules, "pneumo.app.page", raising=False)
    page_module = importlib.import_module("pneumo.app.page")
    assert calls == [] and callable(page_module.main)


@pytest.mark.parametrize(
    ("probability", "label", "borderline", "crop", "says"),
    [
        (
            0.42,
            "PNEUMONIA",
            True,
            None,
            "**42.0%**, below 50% but on the PNEUMONIA side",
        ),
        (0.91, "PNEUMONIA", False, {"x0": 0.1, "y0": 0.1, "x1": 0.9, "y1": 0.9, "found": True}, "read the lung box"),
        (0.08, "NORMAL", False, {"x0": 0.0, "y0": 0.0, "x1": 1.0, "y1": 1.0, "found": False}, "read the whole film"),
    ],
)
def test_the_probability_line_says_borderline_and_which_part_was_read(
    probability: float, label: str, borderline: bool, crop: dict | None, says: str
) -> None:
    from pneumo.inference.predictor import Prediction

    prediction = Prediction(
        label=label, probability=probability, threshold=0.3, probabilities={}, crop=crop, borderline=borderline,
        operating_point="Youden's J on the pooled robustness validation",
    )  # fmt: skip
    line = app_support.probability_line(prediction)
    assert says in line and "30.0%" in line
    assert "Youden's J on the pooled robustness validation" in line
    assert ("Borderline" in line) is borderline


def test_validation_rows_give_headline_metrics_with_their_intervals() -> None:
    metrics = {"validation": {"roc_auc": 0.9512, "sensitivity": 0.9, "ci": {"roc_auc": [0.91, 0.97]}, "n_images": 9}}
    assert app_support.validation_rows(metrics) == [
        {"metric": "Sensitivity", "value": "90.0%", "95% CI": "not recorded"},
        {"metric": "ROC AUC", "value": "95.1%", "95% CI": "91.0% - 97.0%"},
    ]


def test_public_model_info_hides_paths_and_ood_arrays() -> None:
    info = model_info.public_model_info(
        {"arch": "x", "bundle_dir": "/srv/secret", "ood": {"mean": [0.1] * 500, "threshold": 3.5}, "extra_key": 1}
    )
    assert info["ood"] == {"enabled": True, "threshold": 3.5}
    assert "bundle_dir" not in info and "extra_key" not in info and info["arch"] == "x"


def _prediction() -> Any:
    from pneumo.inference.predictor import Prediction

    return Prediction("PNEUMONIA", 0.81234, 0.5, {"NORMAL": 0.18766, "PNEUMONIA": 0.81234})


# --------------------------------------------------------------------------------------- pneumo app


def test_app_command_starts_streamlit_on_the_page(bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from streamlit.web import cli as streamlit_cli

    seen: dict[str, Any] = {}
    monkeypatch.setattr(streamlit_cli, "main", lambda **kwargs: seen.update(kwargs))
    result = _invoke(["app", "--port", "8765", "--model", str(bundle)])
    assert result.exit_code == 0, result.output
    args = seen["args"]
    assert args[:2] == ["run", str(PAGE)]
    assert args[args.index("--server.port") + 1] == "8765"
    assert args[args.index("--server.headless") + 1] == "true"
    assert args[args.index("--server.address") + 1] == "127.0.0.1"
    assert args[args.index("--browser.gatherUsageStats") + 1] == "false"
    assert args[-3:] == ["--", "--model", str(bundle.resolve())]


def test_app_command_refuses_a_missing_bundle(tmp_path: Path) -> None:
    result = _invoke(["app", "--model", str(tmp_path / "nope")])
    assert result.exit_code == 2
    assert "bundle" in result.output.lower()


def _invoke(args: list[str]) -> Any:
    with pneumo_log_handlers_restored():
        return CliRunner().invoke(cli_app, args)
