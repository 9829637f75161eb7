"""The model bundle (``pneumo.core.bundle``): save -> load round trip, metadata, typed errors."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import synthetic_xray
from model_helpers import tiny_bundle, tiny_model
from safetensors.torch import load_file

from pneumo.core.bundle import (
    FORMAT_VERSION,
    META_FILE,
    OOD_FILE,
    WEIGHTS_FILE,
    BundleMeta,
    read_meta,
    resolve_bundle,
    write_meta,
)
from pneumo.core.errors import BundleError
from pneumo.core.preprocess import PreprocessConfig, preprocess
from pneumo.inference import Predictor
from pneumo.modeling.torch_backend import torch_predictor
from pneumo.modeling.weights import load_bundle, save_bundle


def _png(name: str, pneumonia: bool) -> bytes:
    buffer = io.BytesIO()
    synthetic_xray(name, pneumonia, size=80).save(buffer, format="PNG")
    return buffer.getvalue()


def test_round_trip_gives_identical_weights_and_predictions(tmp_path: Path) -> None:
    folder, model = tiny_bundle(tmp_path / "b1", threshold=0.42, temperature=1.7)
    meta, loaded = load_bundle(folder)
    assert not loaded.training
    original = model.state_dict()
    assert set(loaded.state_dict()) == set(original)  # BatchNorm buffers included
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, original[key]), key

    # The same image through the Predictor of the bundle and of a bundle re-saved from the loaded model.
    save_bundle(tmp_path / "b2", loaded, meta)
    image = _png("roundtrip", True)
    # backend="torch": bit-identity is a property of the same engine on the same weights (ONNX has its own tests).
    first = torch_predictor(folder).predict(image)
    second = torch_predictor(tmp_path / "b2").predict(image)
    assert first.probability == second.probability
    assert first.probabilities == second.probabilities
    assert first.threshold == second.threshold == 0.42

    # And the bundle's logits are exactly what the in-memory model computed before saving.
    predictor = torch_predictor(folder)
    batch = predictor.prepare(predictor.decode(image))[None]
    with torch.inference_mode():
        expected = model.eval()(torch.from_numpy(batch)).numpy()
    assert np.array_equal(predictor.logits(batch), expected)


def test_weights_file_is_plain_safetensors_with_every_tensor(tmp_path: Path) -> None:
    folder, model = tiny_bundle(tmp_path / "b")
    tensors = load_file(str(folder / WEIGHTS_FILE))
    assert set(tensors) == set(model.state_dict())


def test_meta_round_trip_keeps_every_field_and_unknown_keys(tmp_path: Path) -> None:
    folder, _ = tiny_bundle(
        tmp_path / "b",
        threshold=0.3,
        threshold_rule="youden",
        temperature=2.5,
        training={"epochs_run": 3},
        metrics={"validation": {"roc_auc": 0.9}},
        ood={"threshold": 4.0, "noise_variance": 0.01, "components": 8, "feature_dim": 1280},
        export=False,
    )
    meta = read_meta(folder)
    assert meta.threshold == 0.3 and meta.temperature == 2.5 and meta.threshold_rule == "youden"
    assert meta.training.epochs_run == 3 and meta.metrics["validation"]["roc_auc"] == 0.9
    assert meta.ood is not None and (meta.ood.threshold, meta.ood.components, meta.ood.method) == (
        4.0,
        8,
        "ppca-mahalanobis",
    )
    assert meta.preprocess == PreprocessConfig(64, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert meta.versions["torch"] == torch.__version__ and meta.created

    raw = json.loads((folder / META_FILE).read_text())
    assert raw["format_version"] == FORMAT_VERSION
    raw["future_field"] = {"added_by": "a later pneumo"}
    (folder / META_FILE).write_text(json.dumps(raw))
    meta = read_meta(folder)
    assert meta.extra == {"future_field": {"added_by": "a later pneumo"}}
    write_meta(folder, meta)  # rewriting keeps what this version does not know
    assert json.loads((folder / META_FILE).read_text())["future_field"] == {"added_by": "a later pneumo"}
    assert BundleMeta.from_dict(meta.to_dict()) == meta


def test_positive_indices_follow_the_labels() -> None:
    config = PreprocessConfig()
    binary = BundleMeta(arch="a", timm_name="a", labels=["NORMAL", "PNEUMONIA"], preprocess=config)
    three = BundleMeta(
        arch="a", timm_name="a", labels=["NORMAL", "BACTERIA", "VIRUS"], preprocess=config,
        positive_labels=["BACTERIA", "VIRUS"],
    )  # fmt: skip
    assert binary.positive_indices == [1]
    assert three.positive_indices == [1, 2]


_GOOD = {
    "arch": "efficientnet_lite0",
    "timm_name": "tf_efficientnet_lite0",
    "labels": ["NORMAL", "PNEUMONIA"],
    "preprocess": {"input_size": 64, "mean": [0.5] * 3, "std": [0.5] * 3},
}


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        "[]",
        "42",
        "null",
        json.dumps({k: v for k, v in _GOOD.items() if k != "preprocess"}),
        json.dumps({k: v for k, v in _GOOD.items() if k != "arch"}),
        json.dumps({**_GOOD, "preprocess": {"input_size": "big", "mean": [0.5] * 3, "std": [0.5] * 3}}),
        json.dumps({**_GOOD, "preprocess": {"input_size": 64, "mean": [0.5], "std": [0.5] * 3}}),
        json.dumps({**_GOOD, "threshold": 0.5, "unexpected_argument": 1, "labels": None, "preprocess": []}),
    ],
)
def test_read_meta_malformed_bundle_json_is_a_bundle_error(tmp_path: Path, content: str) -> None:
    (tmp_path / META_FILE).write_text(content)
    with pytest.raises(BundleError) as info:
        read_meta(tmp_path)
    assert info.value.code == "bundle_error"


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"format_version": 3}, "format_version"),
        ({"temperature": 0}, "temperature"),
        ({"threshold": 1.5}, "threshold"),
        ({"labels": ["NORMAL"]}, "labels"),
        ({"arch": 3}, "arch"),
        ({"preprocess": {"input_size": 64, "mean": [0.5] * 3, "std": [0.5, 0.0, 0.5]}}, "preprocess.std.1"),
        ({"versions": {"torch": [2, 9]}}, "versions.torch"),
        ({"files": {"onnx": 1}}, "files.onnx"),
        ({"positive_labels": ["VIRUS"]}, "positive_labels"),
    ],
)
def test_bad_bundle_json_names_the_field_at_fault(tmp_path: Path, change: dict[str, Any], field: str) -> None:
    (tmp_path / META_FILE).write_text(json.dumps({**_GOOD, **change}))
    with pytest.raises(BundleError) as info:
        read_meta(tmp_path)
    assert field in info.value.message and "bundle.json" in info.value.message
    with pytest.raises(BundleError):  # the Predictor (CLI, app, API start-up) gets the same error, not a ValueError
        Predictor(tmp_path)


def test_unknown_optional_keys_and_a_files_mapping_are_kept(tmp_path: Path) -> None:
    """Later pneumo versions add keys (robustness metrics, an INT8 file entry); reading must keep them."""
    files = {"model_int8.onnx": {"kind": "onnx-int8-qdq", "sha256": "0" * 64}}
    data = {**_GOOD, "format_version": 1, "files": files, "robustness": {"blur": 0.9}}
    data["metrics"] = {"validation": {"roc_auc": 0.9}, "robustness": {"jpeg_q10": {"roc_auc": 0.8}}}
    (tmp_path / META_FILE).write_text(json.dumps(data))
    meta = read_meta(tmp_path)
    assert meta.extra == {"robustness": {"blur": 0.9}}
    assert meta.int8 is not None and meta.int8.sha256 == "0" * 64 and meta.int8.passed_check is False
    assert meta.metrics["robustness"] == {"jpeg_q10": {"roc_auc": 0.8}}
    written = meta.to_dict()["files"]["model_int8.onnx"]
    assert {k: written[k] for k in files["model_int8.onnx"]} == files["model_int8.onnx"]


def test_read_meta_accepts_the_minimal_good_file(tmp_path: Path) -> None:
    (tmp_path / META_FILE).write_text(json.dumps(_GOOD))
    meta = read_meta(tmp_path)
    assert meta.threshold == 0.5 and meta.temperature == 1.0 and meta.positive_labels == ["PNEUMONIA"]


def test_missing_bundle_json_or_weights_is_a_bundle_error(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match=r"bundle\.json is missing"):
        read_meta(tmp_path)
    with pytest.raises(BundleError):
        resolve_bundle(tmp_path)
    with pytest.raises(BundleError):
        Predictor(tmp_path)
    (tmp_path / META_FILE).write_text(json.dumps(_GOOD))
    with pytest.raises(BundleError, match=WEIGHTS_FILE):
        load_bundle(tmp_path)


def test_weights_of_another_architecture_are_a_bundle_error(tmp_path: Path) -> None:
    folder, _ = tiny_bundle(tmp_path / "b", model=tiny_model("test_efficientnet"), arch="test_efficientnet")
    meta = read_meta(folder)
    meta.arch, meta.timm_name = "efficientnet_lite0", "tf_efficientnet_lite0"
    write_meta(folder, meta)
    with pytest.raises(BundleError, match="do not match"):
        load_bundle(folder)


def test_three_class_bundle_round_trip(tmp_path: Path) -> None:
    labels = ["NORMAL", "BACTERIA", "VIRUS"]
    folder, model = tiny_bundle(tmp_path / "b", labels=labels, positive_labels=["BACTERIA", "VIRUS"])
    predictor = torch_predictor(folder)
    result = predictor.predict(_png("three", False))
    assert set(result.probabilities) == set(labels)
    assert result.probability == pytest.approx(result.probabilities["BACTERIA"] + result.probabilities["VIRUS"])
    image = synthetic_xray("three-direct", False, size=64)
    with torch.inference_mode():
        direct = model(torch.from_numpy(preprocess(image, predictor.preprocess_config)[None])).softmax(1)[0]
    assert predictor.predict_tensors(preprocess(image, predictor.preprocess_config)[None])[0] == pytest.approx(
        float(direct[1] + direct[2]), abs=1e-6
    )


# ------------------------------------------------------------------ tampered bundles (issue 22, item 8)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"temperature": 1e-320}', "temperature"),  # served "probability": null before
        ('{"temperature": Infinity}', "temperature"),  # every image scored 0.5 before
        ('{"threshold": NaN}', "threshold"),
        ('{"preprocess": {"input_size": 60000}}', "preprocess.input_size"),  # MemoryError before
        ('{"labels": ' + json.dumps([f"L{i}" for i in range(100_000)]) + "}", "labels"),
        ('{"threshold": ' + "9" * 100_000 + "}", "number too large"),  # a traceback before
        ('{"metrics": ' + "[" * 100_000 + "]" * 100_000 + "}", "nesting"),
    ],
)
def test_tampered_bundle_json_is_a_bundle_error(tmp_path: Path, text: str, expected: str) -> None:
    """Absurd values in bundle.json fail where it is read, with a BundleError naming what is wrong."""
    good = json.dumps(_GOOD)
    (tmp_path / META_FILE).write_text(good[:-1] + ", " + text[1:])  # the tampered keys override the good ones
    with pytest.raises(BundleError, match=expected):
        read_meta(tmp_path)


def test_random_bytes_as_weights_or_gate_are_bundle_errors(tmp_path: Path) -> None:
    folder, _ = tiny_bundle(tmp_path / "b", export=False)
    noise = np.random.default_rng(0).bytes(10_000)
    (folder / WEIGHTS_FILE).write_bytes(noise)
    with pytest.raises(BundleError, match=r"do not match .* or are damaged"):
        torch_predictor(folder)
    gated, _ = tiny_bundle(tmp_path / "g", export=False, ood=OOD_ENTRY)
    (gated / OOD_FILE).write_bytes(noise)
    with pytest.raises(BundleError, match="incomplete or malformed"):
        Predictor(gated)


def test_a_fifo_or_a_folder_in_place_of_a_bundle_file_is_refused_unread(tmp_path: Path) -> None:
    """A FIFO as weights.safetensors hung startup for minutes before: it is refused without being opened."""
    folder, _ = tiny_bundle(tmp_path / "b", export=False)
    (folder / WEIGHTS_FILE).unlink()
    os.mkfifo(folder / WEIGHTS_FILE)
    with pytest.raises(BundleError, match="not a regular file"):
        torch_predictor(folder)
    (folder / WEIGHTS_FILE).unlink()
    (folder / WEIGHTS_FILE).mkdir()
    with pytest.raises(BundleError, match="not a regular file"):
        torch_predictor(folder)


def test_an_oversized_bundle_json_is_refused_unread(tmp_path: Path) -> None:
    with (tmp_path / META_FILE).open("wb") as handle:
        handle.truncate(9 * 2**20)  # sparse: 9 MB of zeros, over the 8 MB a bundle.json may be
    with pytest.raises(BundleError, match="over the 8 MB"):
        read_meta(tmp_path)


#: A consistent gate entry for a bundle whose gate file is then damaged.
OOD_ENTRY = {"threshold": 4.0, "noise_variance": 0.01, "components": 8, "feature_dim": 1280}
