"""``pneumo export openvino``: OpenVINO's execution of the bundle's graphs, checked against fp32 and recorded."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import write_tiny_dataset
from export_helpers import exported_tiny_bundle_fixture  # noqa: F401 (session fixture)
from typer.testing import CliRunner

from pneumo.cli import app
from pneumo.core.bundle import ONNX_FILE, read_meta
from pneumo.inference import Predictor
from pneumo.inference.openvino import read_checks
from pneumo.inference.runners import file_sha256

pytest.importorskip("openvino", reason="the OpenVINO check needs pip install 'pneumo[openvino]'")


def test_export_openvino_records_a_check_that_auto_then_uses(exported_tiny_bundle: Path, tmp_path: Path) -> None:
    from pneumo.modeling.runtime_check import record_checks

    bundle = shutil.copytree(exported_tiny_bundle, tmp_path / "bundle")
    data = write_tiny_dataset(tmp_path / "data", n_per_class=20)
    assert Predictor(bundle, check_ood=False).backend == "fp32"  # nothing recorded yet
    result = CliRunner().invoke(app, ["export", "openvino", "--model", str(bundle), "--data", str(data)])
    assert result.exit_code == 0, result.output
    assert "model.onnx: OpenVINO" in result.output and "passed" in result.output
    meta = read_meta(bundle)
    (record,) = read_checks(meta)
    assert record.runtime == "openvino" and record.graph == ONNX_FILE
    assert record.graph_sha256 == file_sha256(bundle / ONNX_FILE)
    assert record.passed_check and record.validation["decision_agreement"] == 1.0  # fp32 under both runtimes
    assert record.validation["n_images"] > 0 and record.heldout["n_images"] > 0
    assert record.validation["graph_kind"] == "fp32"
    assert Predictor(bundle, check_ood=False).backend == "openvino"
    # Checking again replaces the record of the same graph, release and CPU kind instead of piling up.
    again = record.model_copy(update={"passed_check": False})
    assert read_checks(record_checks(meta, [again])) == [again]


def test_export_openvino_needs_a_dataset() -> None:
    result = CliRunner().invoke(app, ["export", "openvino"])
    assert result.exit_code == 2 and "--data" in result.output
