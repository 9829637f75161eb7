"""The INT8 graph: shipped in the default bundle, checked against fp32, chosen by ``backend=auto``."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import write_tiny_dataset
from model_helpers import tiny_bundle, xray_jpegs

from pneumo.core.bundle import INT8_FILE, default_bundle_path, read_meta, write_meta
from pneumo.core.preprocess import Preprocessor
from pneumo.inference import Predictor
from pneumo.inference.runners import BackendError, OnnxRunner, file_sha256, find_int8, find_onnx, weights_sha256
from pneumo.modeling.export import export_onnx
from pneumo.modeling.torch_backend import torch_predictor


@pytest.fixture(scope="module")
def default_fp32() -> Path:
    """The default bundle's fp32 graph, exported once into the session's cache (an explicit step, as a user does)."""
    folder = default_bundle_path()
    return find_onnx(folder, read_meta(folder)) or export_onnx(folder)


def test_default_bundle_lists_its_int8_graph_with_checksums() -> None:
    folder = default_bundle_path()
    entry = read_meta(folder).int8
    assert entry is not None
    assert entry.sha256 == file_sha256(folder / INT8_FILE)
    assert entry.weights_sha256 == weights_sha256(folder)
    figures = entry.validation
    passes = figures["decision_agreement"] >= 0.995 and abs(figures["auc_delta"]) <= 0.002
    assert entry.passed_check is passes  # the recorded verdict is the bar applied to the recorded figures
    total = sum(f.stat().st_size for f in folder.iterdir())
    assert total < 25 * 2**20, f"default bundle is {total / 2**20:.1f} MB"


def _checked_copy(tmp_path: Path, passed: bool) -> Path:
    """The default bundle with its INT8 entry's verdict set to ``passed`` (checksums untouched).

    Its OpenVINO checks are dropped: these tests are about the choice among ONNX Runtime's graphs
    (tests/inference/test_openvino.py covers ``auto`` choosing OpenVINO).
    """
    folder = shutil.copytree(default_bundle_path(), tmp_path / f"bundle-{passed}")
    meta = json.loads((folder / "bundle.json").read_text())
    meta["files"][INT8_FILE]["passed_check"] = passed
    meta.pop("runtime_checks", None)
    (folder / "bundle.json").write_text(json.dumps(meta))
    return folder


def test_auto_serves_int8_only_when_it_passed_its_check(tmp_path: Path, default_fp32: Path) -> None:
    assert Predictor(_checked_copy(tmp_path, True), check_ood=False).backend == "int8"
    # A graph written with --force after missing the bar: the fp32 graph was exported, so it answers.
    assert Predictor(_checked_copy(tmp_path, False), check_ood=False).backend == "fp32"


def test_without_an_fp32_graph_auto_serves_an_unchecked_int8_graph_with_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A base install has no exporter: an INT8 graph that missed the bar beats no model, and the log says so."""
    monkeypatch.setenv("PNEUMO_CACHE", str(tmp_path / "empty-cache"))
    with caplog.at_level(logging.WARNING, logger="pneumo.inference.runners"):
        predictor = Predictor(_checked_copy(tmp_path, False), check_ood=False)
    assert predictor.backend == "int8"
    assert "did not pass the agreement check" in caplog.text


def test_auto_picks_int8_and_the_environment_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bundle = _checked_copy(tmp_path, True)
    predictor = Predictor(bundle)
    assert predictor.backend == "int8" and predictor.onnx_runner is not None
    monkeypatch.setenv("PNEUMO_BACKEND", "int8")
    assert Predictor(backend="auto").backend == "int8"
    monkeypatch.setenv("PNEUMO_BACKEND", "torch")  # registered: this module imports the training stack's backend
    assert Predictor(bundle, backend="int8").backend == "int8"  # an explicit choice is not overridden
    assert Predictor(bundle).backend == "torch"


def test_a_damaged_or_stale_int8_file_is_never_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, default_fp32: Path
) -> None:
    folder = shutil.copytree(default_bundle_path(), tmp_path / "bundle")
    data = bytearray((folder / INT8_FILE).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (folder / INT8_FILE).write_bytes(bytes(data))
    meta = read_meta(folder)
    meta.runtime_checks = []  # ONNX Runtime's choice only (OpenVINO's: tests/inference/test_openvino.py)
    write_meta(folder, meta)
    assert find_int8(folder, meta) is None
    with pytest.raises(BackendError, match=r"no valid model_int8\.onnx"):
        Predictor(folder, backend="int8")
    assert Predictor(folder, backend="auto").backend == "fp32"  # falls back, never the damaged file
    meta.files = {}
    write_meta(folder, meta)
    assert find_int8(folder, meta) is None  # not listed in bundle.json: not trusted


def test_int8_and_fp32_answer_the_same_on_synthetic_films() -> None:
    int8, fp32 = Predictor(backend="int8", check_ood=False), torch_predictor(check_ood=False)
    # Same decisions, probabilities close: the validation split measured at most 0.27 of difference on
    # one film (bundle.json), so 0.3 bounds it; a wrong graph (other weights, lost head) misses both.
    for blob in xray_jpegs(4, size=256):
        a, b = int8.predict(blob), fp32.predict(blob)
        assert a.label == b.label
        assert abs(a.probability - b.probability) < 0.3


def test_quantize_bundle_writes_the_file_and_its_entry(tmp_path: Path) -> None:
    from pneumo.modeling.quantize import quantize_bundle, runtime_convs

    data = write_tiny_dataset(tmp_path / "data", n_per_class=16)
    bundle = tiny_bundle(tmp_path / "bundle", arch="test_efficientnet", export=False)[0]
    meta = read_meta(bundle)
    entry = quantize_bundle(bundle, data, n_calibration=16, force=True)
    path = bundle / INT8_FILE
    assert entry.sha256 == file_sha256(path) and entry.weights_sha256 == weights_sha256(bundle)
    assert entry.validation["n_images"] > 0 and entry.kind == "onnx-int8-qdq"
    assert read_meta(bundle) == meta  # the caller lists the entry: nothing rewrote bundle.json
    meta.files[INT8_FILE] = entry
    write_meta(bundle, meta)
    predictor = Predictor(bundle, backend="int8", check_ood=False)
    assert predictor.backend == "int8"
    logits, features = predictor.forward(np.zeros((2, 3, 64, 64), np.float32))
    assert logits.shape == (2, 2) and features.ndim == 2
    assert entry.convs_at_runtime == runtime_convs(path)
    assert entry.tries[-1]["fp32_early_convs"] == entry.fp32_early_convs
    assert entry.heldout["n_images"] > 0  # training images outside the calibration sample


@pytest.mark.parametrize("bar", [0.0, 1.01])
def test_quantize_bundle_ships_the_first_prefix_that_passes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bar: float
) -> None:
    """Bar 0: the first (fastest) try ships. An impossible bar: every try is made, none ships unless forced."""
    from pneumo.modeling import quantize

    monkeypatch.setattr(quantize, "MIN_AGREEMENT", bar)
    monkeypatch.setattr(quantize, "MAX_AUC_DELTA", 1.0)  # the bar alone decides
    data = write_tiny_dataset(tmp_path / "data", n_per_class=16)
    bundle = tiny_bundle(tmp_path / "bundle", arch="test_efficientnet", export=False)[0]
    if bar > 1:
        with pytest.raises(quantize.QuantizationError, match="Every INT8 graph tried"):
            quantize.quantize_bundle(bundle, data, n_calibration=16)
        assert not (bundle / INT8_FILE).exists()
    entry = quantize.quantize_bundle(bundle, data, n_calibration=16, force=True)
    tried = [t["fp32_early_convs"] for t in entry.tries]
    expected = list(quantize.FP32_EARLY_CONVS) if bar > 1 else [quantize.FP32_EARLY_CONVS[0]]
    assert tried == expected and entry.fp32_early_convs == expected[-1]
    assert entry.passed_check is (bar == 0.0) and all(t["passed"] is (bar == 0.0) for t in entry.tries)


def test_the_shipped_int8_graph_runs_in_the_precision_fp32_nodes_chose(default_fp32: Path) -> None:
    """What ONNX Runtime really runs in fp32 is what ``fp32_nodes`` kept, and bundle.json says so.

    Until round 5 the depthwise convolutions were "kept in fp32" in the file and ONNX Runtime
    quantized them at load (per tensor): 38 convolutions intended in fp32, 25 ran so.
    """
    import onnx

    from pneumo.modeling.quantize import fp32_nodes, runtime_convs

    folder = default_bundle_path()
    graph = onnx.load(str(default_fp32))
    convs = {n.name for n in graph.graph.node if n.op_type == "Conv"}
    entry = read_meta(folder).int8
    assert entry is not None and entry.fp32_early_convs is not None
    kept = sum(name in convs for name in fp32_nodes(graph, entry.fp32_early_convs))
    counts = runtime_convs(folder / INT8_FILE)
    assert counts == {"fp32": kept, "int8": len(convs) - kept}
    assert counts == entry.convs_at_runtime


@pytest.mark.slow
def test_shipped_int8_agrees_with_fp32_on_validation(shared_data: Path, default_fp32: Path) -> None:
    """The INT8 graph measured again on the real validation split: its recorded figures and verdict hold."""
    from pneumo.modeling.data import train_val_samples
    from pneumo.modeling.quantize import compare_probabilities, graph_probability, load_arrays

    folder = default_bundle_path()
    meta = read_meta(folder)
    config = meta.training.config
    _, val, _ = train_val_samples(
        shared_data / "chest_xray_224", val_fraction=config["val_fraction"], seed=config["seed"]
    )
    arrays = load_arrays([s.path for s in val], Preprocessor(meta.preprocess))
    fp32, int8 = OnnxRunner(default_fp32), OnnxRunner(folder / INT8_FILE)
    report = compare_probabilities(
        graph_probability(fp32, arrays, meta),
        graph_probability(int8, arrays, meta),
        np.array([s.label for s in val]),
        meta,
    )
    assert report["n_images"] > 700
    # The figures in bundle.json (which the verdict is computed from) are what the graph really does.
    assert meta.int8 is not None
    recorded = meta.int8.validation
    assert report["decision_agreement"] == pytest.approx(recorded["decision_agreement"], abs=2 / report["n_images"])
    assert report["auc_int8"] == pytest.approx(recorded["auc_int8"], abs=1e-3)
    assert abs(report["auc_delta"]) <= 0.002  # the ranking survives quantization whatever the verdict
