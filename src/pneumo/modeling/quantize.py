"""INT8 static quantization of a bundle's ONNX graph, checked against fp32 before it is shipped.

``onnxruntime.quantization.quantize_static`` does the work (QDQ format, per-channel int8 weights,
uint8 activations calibrated on a few hundred training images); this module chooses what to keep
in fp32, feeds the calibration images through the one preprocessing path, and refuses a graph that
changes the model's answers:

- **what stays fp32**: this model's logits are small (the bundle's temperature is ~0.4-0.6, so a
  logit error of 0.01 moves the calibrated probability by ~0.5 points) and decisions sit near a
  threshold chosen on validation data. Quantizing everything (measured: 53% decision agreement) is
  useless. Kept in fp32 (:func:`fp32_nodes`): the stem and the first :data:`FP32_EARLY_CONVS`
  convolutions (where the normalized image's dynamic range is widest), every depthwise convolution
  (one 3x3 filter per channel: per-channel int8 weights and uint8 activations lose the most there,
  the known weak spot of MobileNet-style networks), the last :data:`FP32_LATE_CONVS` convolutions,
  and the head block, pooling and classifier. The pointwise (1x1) convolutions of the middle blocks,
  most of the multiply-adds, run in int8. Measured on the round-2 default: head only in fp32,
  98.3% agreement; plus depthwise, 99.0%; plus the first 12 convolutions, 99.5%. On the round-3 default
  (EfficientNet-Lite1, fully fine-tuned): first 12 convolutions, 97.96%; first 12 and the last 4, 98.34%;
  first 24, 99.87% (6.9 MB); first 24 and the last 8, 100% (10.6 MB, over the bundle's size budget); on the
  round-4 default (stem and first two stages at their ImageNet weights): first 6, 97.32%; first 12, 97.70%;
  first 24, 99.87%.
- **the check**: on the bundle's validation split (the patient-level split recorded in its
  training config), the int8 graph must agree with the fp32 graph on at least
  :data:`MIN_AGREEMENT` of decisions and stay within :data:`MAX_AUC_DELTA` of its ROC AUC; the
  figures are written into ``bundle.json`` next to the file's checksum.

Only training/export needs this module (``onnx`` and ``onnxruntime.quantization`` import the
exporter stack); serving reads the resulting file with plain ONNX Runtime.
"""

from __future__ import annotations

import logging
import os
import random
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pneumo.core.bundle import read_meta, resolve_bundle, write_meta
from pneumo.core.errors import PneumoError
from pneumo.core.io import read_image
from pneumo.core.preprocess import preprocess
from pneumo.core.probability import positive_probability, temperature_softmax
from pneumo.serving.onnx_runtime import (
    INPUT_NAME,
    INT8_FILE,
    OnnxRunner,
    file_sha256,
    weights_sha256,
)

log = logging.getLogger(__name__)

#: Least share of validation decisions on which int8 must agree with fp32.
MIN_AGREEMENT = 0.995
#: Largest |AUC_int8 - AUC_fp32| accepted on the validation split.
MAX_AUC_DELTA = 0.002
#: Training images the activation ranges are calibrated on.
DEFAULT_CALIBRATION_IMAGES = 300
#: Convolutions (from the stem, in graph order) kept in fp32, with everything before them.
FP32_EARLY_CONVS = 24
#: Convolutions before the head kept in fp32, with everything after them (0: the head block only).
FP32_LATE_CONVS = 0


class QuantizationError(PneumoError):
    """The INT8 graph could not be made, or it changes the model's answers too much to ship."""

    code = "quantization_failed"
    http_status = 500


class _Reader:
    """``CalibrationDataReader`` over preprocessed images, a batch of 8 at a time (bounded memory)."""

    def __init__(self, arrays: np.ndarray, batch: int = 8) -> None:
        self.batches = iter([arrays[i : i + batch] for i in range(0, len(arrays), batch)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self.batches, None)
        return None if batch is None else {INPUT_NAME: batch}


def load_arrays(paths: Sequence[Path], bundle_dir: Path) -> np.ndarray:
    """Images -> the model's input (N, 3, S, S) through the one preprocessing path."""
    config = read_meta(bundle_dir).preprocess
    return np.stack([preprocess(read_image(p, draft_size=config.input_size).image, config) for p in paths])


def _is_depthwise(node: Any) -> bool:
    return node.op_type == "Conv" and any(a.name == "group" and a.i > 1 for a in node.attribute)


def fp32_nodes(model: Any) -> list[str]:
    """Names of the nodes kept in fp32 (see the module docstring), found structurally in the graph.

    The convolutions are counted in graph order; the pooling (GlobalAveragePool or ReduceMean that
    makes the pooled features) and everything downstream of it is the head.
    """
    nodes = list(model.graph.node)
    convs = [i for i, n in enumerate(nodes) if n.op_type == "Conv"]
    keep = {n.name for n in nodes[: convs[min(FP32_EARLY_CONVS, len(convs) - 1)]]} if convs else set()
    keep |= {n.name for n in nodes if _is_depthwise(n)}
    if FP32_LATE_CONVS and convs:
        keep |= {n.name for n in nodes[convs[-min(FP32_LATE_CONVS, len(convs))] :]}
    pool = next((i for i, n in enumerate(nodes) if n.op_type in ("GlobalAveragePool", "ReduceMean")), None)
    if pool is not None:
        before = [i for i in convs if i < pool][-1:]
        keep |= {n.name for n in nodes[min([pool, *before]) :]}
    return [n.name for n in nodes if n.name in keep]


def quantize_onnx(fp32_path: Path, out: Path, calibration: np.ndarray, *, exclude: Sequence[str] | None = None) -> Path:
    """Statically quantize ``fp32_path`` into ``out`` (QDQ, per-channel), calibrated on ``calibration``."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory(prefix="pneumo-quant-") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        model = onnx.load(str(prepared))
        excluded = list(exclude) if exclude is not None else fp32_nodes(model)
        log.info("Quantizing %d nodes, keeping %d in fp32.", len(model.graph.node) - len(excluded), len(excluded))
        quantize_static(
            str(prepared),
            str(out),
            _Reader(calibration),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=excluded,
            calibrate_method=CalibrationMethod.MinMax,
            extra_options={"CalibMovingAverage": True},
        )
        # Keep the fp32 graph's provenance (weights hash, CAM head) in the quantized file.
        source = onnx.load(str(fp32_path), load_external_data=False)
        quantized = onnx.load(str(out))
        del quantized.metadata_props[:]
        quantized.metadata_props.extend(source.metadata_props)
        onnx.save(quantized, str(out))
    return out


def compare_graphs(fp32: OnnxRunner, int8: OnnxRunner, arrays: np.ndarray, labels: np.ndarray, meta: Any) -> dict:
    """Decision agreement and ROC AUC of ``int8`` against ``fp32`` on preprocessed ``arrays``."""
    from sklearn.metrics import roc_auc_score

    def probability(runner: OnnxRunner) -> np.ndarray:
        logits = np.concatenate([runner(arrays[i : i + 32])[0] for i in range(0, len(arrays), 32)])
        return positive_probability(temperature_softmax(logits, meta.temperature), meta.positive_indices)

    p32, p8 = probability(fp32), probability(int8)
    positive = np.isin(labels, meta.positive_indices)
    agreement = float(np.mean((p32 >= meta.threshold) == (p8 >= meta.threshold)))
    auc32, auc8 = float(roc_auc_score(positive, p32)), float(roc_auc_score(positive, p8))
    return {
        "n_images": len(arrays),
        "decision_agreement": round(agreement, 5),
        "auc_fp32": round(auc32, 5),
        "auc_int8": round(auc8, 5),
        "auc_delta": round(auc8 - auc32, 5),
        "max_abs_probability_diff": round(float(np.abs(p8 - p32).max()), 5),
    }


def quantize_bundle(
    bundle_dir: str | Path | None,
    calibration_data: str | Path,
    *,
    n_calibration: int = DEFAULT_CALIBRATION_IMAGES,
    out_dir: str | Path | None = None,
    force: bool = False,
) -> Path:
    """Write ``model_int8.onnx`` into a bundle and list it in ``bundle.json`` with its checksum and check figures.

    Calibration images are drawn (seeded) from the *training* side of the bundle's own patient-level
    split of ``calibration_data``; the check runs on its validation side, so neither leaks.

    Args:
        bundle_dir: the bundle (None: the shipped default, written in place: run it from a source checkout).
        calibration_data: dataset root (``train/NORMAL``, ``train/PNEUMONIA`` ...), as for training.
        n_calibration: training images to calibrate on.
        out_dir: write into this copy of the bundle instead (its bundle.json and weights must be there).
        force: write the file even when it fails the agreement/AUC check (the figures still go in bundle.json).

    Raises:
        QuantizationError: the graph fails the check (and ``force`` is False) or cannot be made.
    """
    from pneumo.modeling.data import train_val_samples
    from pneumo.modeling.export import export_onnx

    folder = Path(out_dir) if out_dir is not None else resolve_bundle(bundle_dir)
    meta = read_meta(folder)
    config = meta.training.get("config", {})
    train, val, how = train_val_samples(
        calibration_data,
        label_mode=config.get("label_mode", "binary"),
        val_fraction=config.get("val_fraction", 0.15),
        seed=config.get("seed", 0),
    )
    picked = random.Random(0).sample(train, min(n_calibration, len(train)))
    log.info("Calibrating on %d training images, checking on %d validation images (%s).", len(picked), len(val), how)
    calibration = load_arrays([s.path for s in picked], folder)
    with tempfile.TemporaryDirectory(prefix="pneumo-int8-") as tmp:
        fp32_path = export_onnx(folder, out=Path(tmp) / "fp32.onnx")
        candidate = quantize_onnx(fp32_path, Path(tmp) / INT8_FILE, calibration)
        report = compare_graphs(
            OnnxRunner(fp32_path),
            OnnxRunner(candidate, kind="int8"),
            load_arrays([s.path for s in val], folder),
            np.array([s.label for s in val]),
            meta,
        )
        report["split"] = how
        report["n_calibration"] = len(picked)
        log.info("INT8 vs fp32 on validation: %s", report)
        passed = report["decision_agreement"] >= MIN_AGREEMENT and abs(report["auc_delta"]) <= MAX_AUC_DELTA
        if not passed and not force:
            raise QuantizationError(
                f"The INT8 graph changes the model's answers too much to ship: {report['decision_agreement']:.2%} "
                f"decision agreement (needs {MIN_AGREEMENT:.1%}), AUC delta {report['auc_delta']:+.4f} "
                f"(needs within {MAX_AUC_DELTA}). Nothing was written."
            )
        target = folder / INT8_FILE
        os.replace(candidate, target)
        target.chmod(0o644)
    meta.files[INT8_FILE] = {
        "kind": "onnx-int8-qdq",
        "sha256": file_sha256(target),
        "weights_sha256": weights_sha256(folder),
        "bytes": target.stat().st_size,
        "fp32_kept": f"stem and first {FP32_EARLY_CONVS} convs, every depthwise conv"
        + (f", last {FP32_LATE_CONVS} convs" if FP32_LATE_CONVS else "")
        + ", head conv block, pooling, classifier",
        "passed_check": passed,
        "validation": report,
    }
    write_meta(folder, meta)
    return target
