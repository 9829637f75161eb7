"""The OpenVINO backend: same answers as ONNX Runtime on the same graph, and ``auto`` serves it only when checked."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from export_helpers import exported_tiny_bundle_fixture  # noqa: F401 (session fixture)
from model_helpers import xray_jpegs

from pneumo.core.bundle import ONNX_FILE, Backend, read_meta, write_meta
from pneumo.inference import Predictor, make_explainer
from pneumo.inference import openvino as ov_backend
from pneumo.inference.openvino import RuntimeCheck, read_checks, write_checks
from pneumo.inference.runners import BackendError, OnnxRunner, file_sha256

openvino = pytest.importorskip("openvino", reason="the OpenVINO backend's tests need pip install 'pneumo[openvino]'")


def _batch(bundle: Path, n: int = 4) -> np.ndarray:
    predictor = Predictor(bundle, backend="fp32", check_ood=False)
    return np.stack([predictor.prepare(predictor.decode(blob)) for blob in xray_jpegs(n, size=128)])


def _record(graph: Path, *, passed: bool = True, version: str | None = None, isa: str | None = None) -> RuntimeCheck:
    return RuntimeCheck(
        runtime="openvino",
        version=version or ov_backend.openvino_version() or "",
        graph=graph.name,
        graph_sha256=file_sha256(graph),
        cpu_isa=isa or ov_backend.cpu_isa(),
        passed_check=passed,
    )


def _copy_with(bundle: Path, tmp_path: Path, *records: RuntimeCheck) -> Path:
    folder = shutil.copytree(bundle, tmp_path / "bundle")
    meta = read_meta(folder)
    write_checks(meta, list(records))
    write_meta(folder, meta)
    return folder


def test_openvino_agrees_with_onnx_runtime_on_the_same_graph(exported_tiny_bundle: Path) -> None:
    graph = exported_tiny_bundle / ONNX_FILE
    reference, runner = OnnxRunner(graph), ov_backend.OpenVinoRunner(graph, graph="fp32")
    batch = _batch(exported_tiny_bundle)
    logits, features = runner(batch)
    expected_logits, expected_features = reference(batch)
    assert logits.shape == expected_logits.shape and features.shape == expected_features.shape
    np.testing.assert_allclose(logits, expected_logits, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(features, expected_features, rtol=1e-3, atol=1e-3)
    assert np.ptp(expected_logits[:, 1] - expected_logits[:, 0]) > 0.5  # the films differ: agreement is not trivial
    assert runner.metadata == reference.metadata  # provenance read from the same file
    assert runner.has_feature_map == reference.has_feature_map
    if runner.has_feature_map:
        np.testing.assert_allclose(runner.with_feature_map(batch)[2], reference.with_feature_map(batch)[2], atol=1e-3)
    one = runner(batch[:1])[0]  # another batch size through the same compiled model
    np.testing.assert_allclose(one, expected_logits[:1], rtol=1e-3, atol=1e-3)


def test_explicit_openvino_backend_predicts_and_explains_like_onnx_runtime(exported_tiny_bundle: Path) -> None:
    ov_side = Predictor(exported_tiny_bundle, backend="openvino", check_ood=False)
    ort_side = Predictor(exported_tiny_bundle, backend="fp32", check_ood=False)
    assert ov_side.backend == "openvino" and ov_side.runner.graph == "fp32"  # type: ignore[attr-defined]
    assert ov_side.describe()["backend"] == "openvino"
    for blob in xray_jpegs(3, size=200):
        a, b = ov_side.predict(blob), ort_side.predict(blob)
        assert a.label == b.label and a.probability == pytest.approx(b.probability, abs=1e-4)
    if ort_side.onnx_runner is not None and ort_side.onnx_runner.has_feature_map:
        decoded = ov_side.decode(xray_jpegs(1, size=200)[0])
        heat_ov = make_explainer(ov_side).explain(decoded).heatmap
        heat_ort = make_explainer(ort_side).explain(decoded).heatmap
        assert float(np.corrcoef(heat_ov.ravel(), heat_ort.ravel())[0, 1]) > 0.999


def test_auto_serves_openvino_only_with_a_matching_passing_check(
    exported_tiny_bundle: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    graph = exported_tiny_bundle / ONNX_FILE
    with caplog.at_level(logging.INFO, logger="pneumo.inference.openvino"):
        assert Predictor(_copy_with(exported_tiny_bundle, tmp_path / "none"), check_ood=False).backend == "fp32"
    assert "no recorded OpenVINO check of model.onnx" in caplog.text and "pneumo export openvino" in caplog.text
    caplog.clear()
    failed = _copy_with(exported_tiny_bundle, tmp_path / "failed", _record(graph, passed=False))
    with caplog.at_level(logging.INFO, logger="pneumo.inference.openvino"):
        assert Predictor(failed, check_ood=False).backend == "fp32"
    assert "failed its OpenVINO" in caplog.text
    caplog.clear()
    other_release = _copy_with(exported_tiny_bundle, tmp_path / "old", _record(graph, version="2020.1.0"))
    with caplog.at_level(logging.INFO, logger="pneumo.inference.openvino"):
        assert Predictor(other_release, check_ood=False).backend == "fp32"
    assert "other OpenVINO releases" in caplog.text
    checked = _copy_with(exported_tiny_bundle, tmp_path / "ok", _record(graph, isa="some_other_cpu"))
    predictor = Predictor(checked, check_ood=False)  # the fp32 graph's check holds on any CPU kind
    assert predictor.backend == "openvino" and predictor.runner.graph == "fp32"  # type: ignore[attr-defined]


def test_the_int8_graph_needs_a_check_on_this_kind_of_cpu(exported_tiny_bundle: Path, tmp_path: Path) -> None:
    graph = exported_tiny_bundle / ONNX_FILE  # any file: the record is matched by its SHA-256
    meta = read_meta(exported_tiny_bundle).model_copy()
    version, isa = ov_backend.openvino_version() or "", ov_backend.cpu_isa()
    write_checks(meta, [_record(graph, isa="amx_int8" if isa != "amx_int8" else "avx2")])
    record, why = ov_backend.matching_check(meta, graph, Backend.INT8, version, isa)
    assert record is None and f"on other CPUs, not on {isa}" in why
    write_checks(meta, [*read_checks(meta), _record(graph)])
    assert ov_backend.matching_check(meta, graph, Backend.INT8, version, isa)[0] == read_checks(meta)[-1]


def test_without_openvino_auto_falls_back_and_an_explicit_choice_says_what_to_install(
    exported_tiny_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    checked = _copy_with(exported_tiny_bundle, tmp_path, _record(exported_tiny_bundle / ONNX_FILE))
    assert Predictor(checked, check_ood=False).backend == "openvino"
    monkeypatch.setattr(ov_backend, "openvino_version", lambda: None)  # as on a base install
    assert Predictor(checked, check_ood=False).backend == "fp32"
    with pytest.raises(BackendError, match=r"pip install 'pneumo\[openvino\]'"):
        Predictor(checked, backend="openvino", check_ood=False)


def test_environment_override_selects_openvino(exported_tiny_bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PNEUMO_BACKEND", "openvino")
    assert Predictor(exported_tiny_bundle, check_ood=False).backend == "openvino"


def test_a_malformed_checks_section_counts_as_unchecked(
    exported_tiny_bundle: Path, caplog: pytest.LogCaptureFixture
) -> None:
    meta = read_meta(exported_tiny_bundle).model_copy()
    good = _record(exported_tiny_bundle / ONNX_FILE)
    write_checks(meta, [good])
    assert read_checks(meta) == [good]
    meta.runtime_checks = [{"runtime": "openvino", "graph_sha256": "not a hash"}]
    with caplog.at_level(logging.WARNING, logger="pneumo.inference.openvino"):
        assert read_checks(meta) == []
    assert "runtime_checks cannot be read" in caplog.text and "unchecked" in caplog.text


def test_release_and_cpu_isa() -> None:
    assert ov_backend.release("2026.4.1") == "2026.4" and ov_backend.release("2025.10.0.dev1") == "2025.10"
    assert ov_backend.cpu_isa() in {*ov_backend._ISA_FLAGS, "other", "unknown"}
