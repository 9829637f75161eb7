"""ONNX export and the ONNX Runtime backend: file contents, parity with PyTorch, cache, fallbacks."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from export_helpers import (
    exported_tiny_bundle_fixture,  # noqa: F401 (session fixture)
    tiny_bundle,
    xray_jpegs,
)
from onnx import TensorProto, helper

from pneumo.core.environment import available_cores
from pneumo.core.errors import PneumoError
from pneumo.modeling import export
from pneumo.modeling.weights import load_bundle, save_bundle
from pneumo.serving import onnx_runtime
from pneumo.serving.inference import Predictor
from pneumo.serving.onnx_runtime import (
    ONNX_FILE,
    WEIGHTS_SHA_KEY,
    OnnxBackendError,
    cached_onnx_path,
    find_onnx,
    select_onnx_runner,
    weights_sha256,
)


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
    torch_predictor = Predictor(exported, backend="torch", check_ood=False)
    onnx_predictor = Predictor(exported, backend="onnx", check_ood=False)
    assert (torch_predictor.backend, onnx_predictor.backend) == ("torch", "onnx")
    p_torch = np.array([r.probability for r in torch_predictor.predict_many(blobs)])  # type: ignore[union-attr]
    p_onnx = np.array([r.probability for r in onnx_predictor.predict_many(blobs)])  # type: ignore[union-attr]
    assert p_torch.shape == (32,)
    assert p_torch.std() > 0.1  # spread over (0, 1): the comparison is not made at a single flat point
    np.testing.assert_allclose(p_onnx, p_torch, rtol=0, atol=1e-4)
    # the features feed the OOD gate: they must match too
    batch = np.stack([torch_predictor.prepare(torch_predictor.decode(b)) for b in blobs[:8]])
    (lt, ft), (lo, fo) = torch_predictor.forward(batch), onnx_predictor.forward(batch)
    assert fo.shape == ft.shape == (8, torch_predictor.model.num_features)  # type: ignore[union-attr]
    np.testing.assert_allclose(fo, ft, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(lo, lt, rtol=1e-4, atol=1e-4)


def test_round_trip_auto_uses_the_bundles_onnx_file(exported: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PNEUMO_BACKEND", raising=False)
    predictor = Predictor(exported, check_ood=False)  # backend="auto"
    assert predictor.backend == "onnx"
    assert predictor.describe()["backend"] == "onnx"
    assert predictor._onnx is not None and predictor._onnx.path == exported / ONNX_FILE
    assert isinstance(predictor.model, torch.nn.Module)  # Grad-CAM still has the torch model
    options = predictor._onnx.session.get_session_options()
    assert options.intra_op_num_threads == available_cores()
    # Workers spin within a run and stop when it returns (never burning a core between requests).
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "1"
    assert options.get_session_config_entry("session.force_spinning_stop") == "1"
    blob = xray_jpegs(2)[1]
    reference = Predictor(exported, backend="torch", check_ood=False).predict(blob)
    answer = predictor.predict(blob)
    assert answer.label == reference.label
    assert abs(answer.probability - reference.probability) <= 1e-4


def test_pneumo_backend_environment_variable_overrides_auto_only(
    exported: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PNEUMO_BACKEND", "torch")
    assert Predictor(exported, check_ood=False).backend == "torch"
    assert Predictor(exported, backend="onnx", check_ood=False).backend == "onnx"
    monkeypatch.setenv("PNEUMO_BACKEND", "tensorflow")
    with pytest.raises(OnnxBackendError, match="PNEUMO_BACKEND"):
        Predictor(exported, check_ood=False)


def test_unknown_backend_and_onnx_on_a_gpu_are_refused(exported: Path) -> None:
    with pytest.raises(PneumoError, match="Unknown backend 'tensorrt'") as info:
        select_onnx_runner(exported, "tensorrt")
    assert info.value.code == "bad_backend"
    with pytest.raises(OnnxBackendError, match="runs on the CPU"):
        select_onnx_runner(exported, "onnx", device="cuda")
    assert select_onnx_runner(exported, "auto", device="cuda") is None


def test_stale_onnx_file_is_ignored(exported: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A bundle retrained in place keeps its old model.onnx: it must never answer for the new weights."""
    folder = tmp_path / "retrained"
    shutil.copytree(exported, folder)
    meta, model = load_bundle(folder)
    with torch.no_grad():
        model.get_classifier().bias.add_(1.0)  # type: ignore[operator, union-attr]
    save_bundle(folder, model, meta)
    with caplog.at_level(logging.WARNING, logger="pneumo.serving.onnx_runtime"):
        assert find_onnx(folder) is None
    assert "not exported from this bundle's weights" in caplog.text
    assert find_onnx(exported) == exported / ONNX_FILE


def test_auto_exports_once_into_the_cache_and_reuses_it(
    exported: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No model.onnx in the bundle: "auto" exports into the user cache once, later starts reuse it.

    The export itself is the module fixture's (real, tested above); here it is replayed by copying
    its file, which keeps this test at a fraction of a second.
    """
    monkeypatch.delenv("PNEUMO_BACKEND", raising=False)
    monkeypatch.setenv("PNEUMO_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "bundle"
    shutil.copytree(exported, folder, ignore=shutil.ignore_patterns(ONNX_FILE))
    calls: list[tuple[Path, Path | None]] = []

    def replay_export(bundle_dir: Path, out: Path | None = None, opset: int = 18) -> Path:
        calls.append((Path(bundle_dir), out))
        assert out is not None
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(exported / ONNX_FILE, out)
        return out

    monkeypatch.setattr(export, "export_onnx", replay_export)
    first = Predictor(folder, check_ood=False)
    cached = cached_onnx_path(folder)
    assert first.backend == "onnx"
    assert calls == [(folder, cached)]
    assert cached.parent == tmp_path / "cache" / "onnx" and cached.name == f"{weights_sha256(folder)}.fm.onnx"
    assert not (folder / ONNX_FILE).exists()  # the bundle is left as it was
    second = Predictor(folder, check_ood=False)
    assert len(calls) == 1  # not exported again
    assert second.backend == "onnx" and second._onnx is not None and second._onnx.path == cached


def test_failed_export_falls_back_to_torch_under_auto_and_raises_under_onnx(
    exported: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv("PNEUMO_BACKEND", raising=False)
    monkeypatch.setenv("PNEUMO_CACHE", str(tmp_path / "empty-cache"))
    folder = tmp_path / "no-onnx"
    shutil.copytree(exported, folder, ignore=shutil.ignore_patterns(ONNX_FILE))

    def broken(*args: object, **kwargs: object) -> Path:
        raise OnnxBackendError("simulated exporter crash", code="onnx_export_failed")

    monkeypatch.setattr(export, "export_onnx", broken)
    with caplog.at_level(logging.WARNING, logger="pneumo.serving.onnx_runtime"):
        predictor = Predictor(folder, check_ood=False)
    assert predictor.backend == "torch"
    assert "falling back to PyTorch" in caplog.text
    assert 0.0 <= predictor.predict(xray_jpegs(1)[0]).probability <= 1.0
    with pytest.raises(OnnxBackendError, match="simulated exporter crash") as info:
        Predictor(folder, backend="onnx", check_ood=False)
    assert info.value.code == "onnx_export_failed"


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
    with pytest.raises(OnnxBackendError, match="expected") as info:
        onnx_runtime.OnnxRunner(path)
    assert info.value.code == "onnx_load_failed"


def test_default_bundle_export_goes_to_the_cache_not_into_the_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Exporting the shipped bundle must not add 13 MB to the installed package (a real export of a tiny bundle)."""
    shipped = tmp_path / "shipped"
    tiny_bundle(shipped)
    monkeypatch.setattr(export, "default_bundle_path", lambda: shipped)  # this folder plays the installed bundle
    monkeypatch.setenv("PNEUMO_CACHE", str(tmp_path / "cache"))
    target = export.export_onnx(shipped)
    assert target == cached_onnx_path(shipped) and target.is_file()
    assert target.parent == tmp_path / "cache" / "onnx"
    assert find_onnx(shipped) == target  # stamped with the weights' hash, so the Predictor will use it
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
