"""ONNX export and the ONNX Runtime backend: file contents, parity with PyTorch, cache, fallbacks."""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from export_helpers import exported_tiny_bundle_fixture  # noqa: F401 session fixture
from model_helpers import tiny_bundle, xray_jpegs
from onnx import TensorProto, helper

from pneumo.core.bundle import ONNX_FILE, WEIGHTS_SHA_KEY, read_meta, write_meta
from pneumo.core.environment import available_cores
from pneumo.core.errors import PneumoError
from pneumo.inference import Predictor
from pneumo.inference import runners as onnx_runtime
from pneumo.inference.runners import BackendError, cached_onnx_path, find_onnx, weights_sha256
from pneumo.modeling import export
from pneumo.modeling.torch_backend import torch_predictor
from pneumo.modeling.weights import load_bundle, save_bundle


@pytest.fixture
def exported(exported_tiny_bundle: Path) -> Path:
    """The session's exported tiny bundle (read-only: tests that change a bundle copy it first)."""
    return exported_tiny_bundle


def test_export_writes_a_dynamic_batch_graph_with_logits_and_features(exported: Path) -> None:
    model = onnx.load(str(exported / ONNX_FILE))
    onnx.checker.check_model(model)
    (graph_input,) = model.graph.input
    dims = graph_input.type.tensor_type.shape.dim
    assert graph_input.name == "input"
    assert dims[0].dim_param and not dims[0].dim_value  # symbolic batch axis
    assert [d.dim_value for d in dims[1:]] == [3, 64, 64]  # the bundle's input size, fixed
    # feature_map: the last feature map, for heatmaps without torch (CAM; EfficientNet's head is linear on GAP)
    assert [o.name for o in model.graph.output] == ["logits", "features", "feature_map"]
    props = {p.key: p.value for p in model.metadata_props}
    assert props[WEIGHTS_SHA_KEY] == weights_sha256(exported)
    assert max(op.version for op in model.opset_import if op.domain in ("", "ai.onnx")) == 18


def test_onnx_and_torch_agree_on_32_images(exported: Path) -> None:
    blobs = xray_jpegs(32)
    torch_side = torch_predictor(exported, check_ood=False)
    onnx_side = Predictor(exported, backend="fp32", check_ood=False)
    assert (torch_side.backend, onnx_side.backend) == ("torch", "fp32")
    p_torch = np.array([r.probability for r in torch_side.predict_many(blobs)])  # type: ignore[union-attr]
    p_onnx = np.array([r.probability for r in onnx_side.predict_many(blobs)])  # type: ignore[union-attr]
    assert p_torch.shape == (32,)
    assert p_torch.std() > 0.1  # spread over (0, 1): the comparison is not made at a single flat point
    np.testing.assert_allclose(p_onnx, p_torch, rtol=0, atol=1e-4)
    # the features feed the OOD gate: they must match too
    batch = np.stack([torch_side.prepare(torch_side.decode(b)) for b in blobs[:8]])
    (lt, ft), (lo, fo) = torch_side.forward(batch), onnx_side.forward(batch)
    assert fo.shape == ft.shape == (8, torch_side.runner.model.num_features)  # type: ignore[attr-defined]
    np.testing.assert_allclose(fo, ft, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(lo, lt, rtol=1e-4, atol=1e-4)


def test_round_trip_auto_uses_the_bundles_onnx_file(exported: Path) -> None:
    predictor = Predictor(exported, check_ood=False)  # backend="auto": no INT8 graph, so the fp32 one
    assert predictor.backend == "fp32"
    assert predictor.describe()["backend"] == "fp32"
    assert predictor.onnx_runner is not None and predictor.onnx_runner.path == exported / ONNX_FILE
    options = predictor.onnx_runner.session.get_session_options()
    assert options.intra_op_num_threads == available_cores()
    # Workers spin within a run and stop when it returns (never burning a core between requests).
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "1"
    assert options.get_session_config_entry("session.force_spinning_stop") == "1"
    blob = xray_jpegs(2)[1]
    reference = torch_predictor(exported, check_ood=False).predict(blob)
    answer = predictor.predict(blob)
    assert answer.label == reference.label
    assert abs(answer.probability - reference.probability) <= 1e-4


def test_pneumo_backend_environment_variable_overrides_auto_only(
    exported: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PNEUMO_BACKEND", "torch")  # registered: this module imported the training stack's backend
    assert Predictor(exported, check_ood=False).backend == "torch"
    assert Predictor(exported, backend="fp32", check_ood=False).backend == "fp32"
    monkeypatch.setenv("PNEUMO_BACKEND", "tensorflow")
    with pytest.raises(BackendError, match="PNEUMO_BACKEND"):
        Predictor(exported, check_ood=False)


def test_unknown_backend_is_refused_naming_the_known_ones(exported: Path) -> None:
    with pytest.raises(PneumoError, match="Unknown backend 'tensorrt'; use one of auto, int8, fp32") as info:
        Predictor(exported, backend="tensorrt")
    assert info.value.code == "bad_backend"


def test_stale_onnx_file_is_ignored(exported: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A bundle retrained in place keeps its old model.onnx: it must never answer for the new weights."""
    folder = tmp_path / "retrained"
    shutil.copytree(exported, folder)
    meta, model = load_bundle(folder)
    with torch.no_grad():
        model.get_classifier().bias.add_(1.0)  # type: ignore[operator, union-attr]
    save_bundle(folder, model, meta)
    with caplog.at_level(logging.WARNING, logger="pneumo.inference.runners"):
        assert find_onnx(folder, meta) is None
    assert "not exported from this bundle's weights" in caplog.text
    assert find_onnx(exported, read_meta(exported)) == exported / ONNX_FILE


def test_a_graph_of_another_input_size_is_ignored(exported: Path, tmp_path: Path) -> None:
    """The graph's spatial size is fixed at export: the same weights at another input size need their own graph."""
    folder = tmp_path / "resized"
    shutil.copytree(exported, folder)
    meta = read_meta(folder)
    meta.preprocess = dataclasses.replace(meta.preprocess, input_size=96)
    write_meta(folder, meta)
    assert find_onnx(folder, meta) is None
    with pytest.raises(BackendError, match="pneumo export onnx"):
        Predictor(folder, check_ood=False)


def test_the_predictor_never_exports_and_says_how_to(
    exported: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No graph in the bundle or the cache: a clear error naming the command, and nothing written anywhere."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("PNEUMO_CACHE", str(cache))
    folder = tmp_path / "bundle"
    shutil.copytree(exported, folder, ignore=shutil.ignore_patterns(ONNX_FILE))
    for backend in ("auto", "fp32"):
        with pytest.raises(BackendError, match=f"pneumo export onnx --model {folder}") as info:
            Predictor(folder, backend=backend, check_ood=False)
        assert info.value.code == "backend_unavailable"
    assert not cache.exists() and sorted(p.name for p in folder.iterdir()) == ["bundle.json", "weights.safetensors"]


def test_a_failing_export_is_an_error_not_a_fallback(
    exported: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "no-onnx"
    shutil.copytree(exported, folder, ignore=shutil.ignore_patterns(ONNX_FILE))

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("simulated exporter crash")

    monkeypatch.setattr(torch.onnx, "export", broken)
    with pytest.raises(BackendError, match="ONNX export failed: RuntimeError: simulated exporter crash") as info:
        export.export_onnx(folder)
    assert info.value.code == "onnx_export_failed"
    assert not (folder / ONNX_FILE).exists()


def test_foreign_onnx_file_is_refused_by_the_runner(tmp_path: Path) -> None:
    """An ONNX file with other input/output names cannot be mistaken for a pneumo export."""
    path = tmp_path / "other.onnx"
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "identity",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8), str(path))
    with pytest.raises(BackendError, match="expected") as info:
        onnx_runtime.OnnxRunner(path)
    assert info.value.code == "onnx_load_failed"


def test_default_bundle_export_goes_to_the_cache_not_into_the_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Exporting the shipped bundle must not add 13 MB to the installed package (a real export of a tiny bundle)."""
    shipped = tmp_path / "shipped"
    tiny_bundle(shipped, export=False)
    monkeypatch.setattr(export, "default_bundle_path", lambda: shipped)  # this folder plays the installed bundle
    monkeypatch.setenv("PNEUMO_CACHE", str(tmp_path / "cache"))
    target = export.export_onnx(shipped)
    assert target == cached_onnx_path(shipped, 64) and target.is_file()
    assert target.parent == tmp_path / "cache" / "onnx"
    assert find_onnx(shipped, read_meta(shipped)) == target  # stamped with the weights' hash and the input size
    assert {p.name for p in shipped.iterdir()} == {"bundle.json", "weights.safetensors"}  # nothing added


def test_prune_cache_keeps_the_most_recently_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PNEUMO_CACHE", str(tmp_path))
    folder = onnx_runtime.cache_dir()
    folder.mkdir(parents=True)
    for age, name in enumerate("abcde"):
        path = folder / f"{name}.onnx"
        path.write_bytes(b"x")
        os.utime(path, (1_000_000 - age * 10, 1_000_000 - age * 10))  # a is the newest, e the oldest
    removed = onnx_runtime.prune_cache(keep=2)
    assert sorted(p.name for p in removed) == ["c.onnx", "d.onnx", "e.onnx"]
    assert sorted(p.name for p in folder.iterdir()) == ["a.onnx", "b.onnx"]
