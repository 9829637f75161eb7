"""Heatmaps without torch: CAM from the ONNX graph's feature map equals the torch Grad-CAM."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from model_helpers import xray_jpegs

from pneumo.core.decode import read_image
from pneumo.inference import Predictor
from pneumo.inference.cam import CAM_LAYER, OnnxCamExplainer, make_explainer
from pneumo.inference.explain import ExplainUnavailableError
from pneumo.inference.runners import cached_onnx_path
from pneumo.modeling.export import export_onnx
from pneumo.modeling.gradcam import GradCamExplainer
from pneumo.modeling.torch_backend import torch_predictor


@pytest.fixture(scope="module")
def predictors() -> tuple[Predictor, Predictor]:
    return Predictor(backend="int8", check_ood=False), torch_predictor(check_ood=False)


LABELS = ("PNEUMONIA", "NORMAL")


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def test_make_explainer_gives_onnx_cam_and_refuses_other_backends(predictors: tuple[Predictor, Predictor]) -> None:
    """The surfaces' explainer never imports torch: CAM from the graph, or a clear refusal (Grad-CAM is separate)."""
    onnx, torch_side = predictors
    assert isinstance(make_explainer(onnx), OnnxCamExplainer)
    with pytest.raises(ExplainUnavailableError, match="needs an ONNX backend"):
        make_explainer(torch_side)
    assert isinstance(GradCamExplainer(torch_side), GradCamExplainer)  # the training stack's reference still works


def test_cam_has_the_display_size_and_explains_the_shown_answer(predictors: tuple[Predictor, Predictor]) -> None:
    explainer = OnnxCamExplainer(predictors[0])
    blob = xray_jpegs(1, size=900)[0]
    decoded = read_image(blob)  # full resolution (the Predictor's own decode drafts a JPEG down to ~225 px)
    shown = explainer.explain(decoded, max_side=300)
    assert shown.layer == CAM_LAYER and max(shown.image.size) == 300
    assert shown.heatmap.shape == (shown.image.height, shown.image.width)
    assert shown.heatmap.min() >= 0.0 and shown.heatmap.max() <= 1.0 and shown.heatmap.max() > 0.5
    assert shown.target_label == predictors[0].predict(blob).label
    other = "NORMAL" if shown.target_label == "PNEUMONIA" else "PNEUMONIA"
    assert not np.allclose(explainer.explain(decoded, other, max_side=300).heatmap, shown.heatmap)


def _correlations(predictor: Predictor, torch_predictor: Predictor, folder: Path, labels: tuple[str, ...]) -> list:
    cam, grad_cam = OnnxCamExplainer(predictor), GradCamExplainer(torch_predictor)
    files = sorted(folder.rglob("*.jpeg"))
    assert len(files) >= 10
    found = []
    for path in files:
        decoded = predictor.decode(path)
        for label in labels or (torch_predictor.predict(path).label,):
            ours, reference = cam.explain(decoded, label), grad_cam.explain(decoded, label)
            assert ours.heatmap.shape == reference.heatmap.shape
            if reference.heatmap.max() > 0:  # an all-zero map (nothing supports that answer) has no correlation
                found.append((_correlation(ours.heatmap, reference.heatmap), path.name, label))
    return found


@pytest.mark.slow
def test_fp32_onnx_cam_matches_grad_cam_on_real_xrays(
    predictors: tuple[Predictor, Predictor], shared_data: Path
) -> None:
    """The issue's bar: correlation >= 0.99 with the grad-cam package's map, same images, both answers."""
    fp32 = Predictor(backend="int8", check_ood=False)
    target = cached_onnx_path(fp32.bundle_dir, fp32.meta.preprocess.input_size)
    if not target.is_file():
        export_onnx(fp32.bundle_dir, out=target)  # the default bundle ships no fp32 graph: export it once
    found = _correlations(
        Predictor(backend="fp32", check_ood=False),
        predictors[1],
        shared_data / "fullres_samples",
        ("PNEUMONIA", "NORMAL"),
    )
    assert min(found) >= (0.99,), min(found)


@pytest.mark.slow
def test_int8_cam_follows_grad_cam_for_the_answer_shown(
    predictors: tuple[Predictor, Predictor], shared_data: Path
) -> None:
    """The int8 feature map carries quantization noise (shown answer, 14 originals).

    Measured: round-2 default median 0.99, minimum 0.82; round-3 default (Lite1) median 0.997,
    minimum 0.78 (one film); round-5 graph (depthwise convolutions int8 per channel instead of
    per tensor) median 0.999, minimum 0.993; round-6 framed model (12 fp32 convolutions) median
    0.999, minimum 0.972 (IM-0326, the NORMAL film it calls PNEUMONIA).
    """
    found = _correlations(predictors[0], predictors[1], shared_data / "fullres_samples", ())
    values = sorted(value for value, _, _ in found)
    assert values[len(values) // 2] >= 0.99 and values[0] >= 0.95, found
