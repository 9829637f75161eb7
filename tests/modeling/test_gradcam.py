"""Tests of pneumo.modeling.gradcam: Grad-CAM shape, range, sensitivity to the image, every registered arch."""

from __future__ import annotations

import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from app_helpers import xray_bytes
from conftest import synthetic_xray
from model_helpers import tiny_bundle
from PIL import Image
from torch import nn

from pneumo.core.bundle import BundleMeta
from pneumo.core.preprocess import PreprocessConfig, Preprocessor
from pneumo.inference import Predictor
from pneumo.inference.explain import ExplainUnavailableError, overlay_heatmap
from pneumo.modeling.gradcam import GradCamExplainer, _DecisionTarget, target_layer_name
from pneumo.modeling.models import create_model, get_spec, list_archs
from pneumo.modeling.torch_backend import torch_predictor


@pytest.fixture(scope="module")
def predictor(tmp_path_factory: pytest.TempPathFactory) -> Predictor:
    return torch_predictor(tiny_bundle(tmp_path_factory.mktemp("bundle"), head="wide", export=False)[0])


def _stub_predictor(model: nn.Module, arch: str, size: int) -> SimpleNamespace:
    """What GradCamExplainer uses of a Predictor, without writing a (large) bundle to disk."""
    spec = get_spec(arch)
    config = PreprocessConfig(size, spec.preprocess.mean, spec.preprocess.std)
    meta = BundleMeta(arch=arch, timm_name=spec.timm_name, labels=["NORMAL", "PNEUMONIA"], preprocess=config)
    runner = SimpleNamespace(model=model.eval())
    return SimpleNamespace(runner=runner, meta=meta, preprocessor=Preprocessor(config))


def test_heatmap_has_image_size_range_and_structure(predictor: Predictor) -> None:
    image = synthetic_xray("shape", True, 150).resize((150, 120))
    explanation = GradCamExplainer(predictor).explain(image)
    assert explanation.heatmap.shape == (120, 150)
    assert explanation.heatmap.dtype == np.float32
    assert explanation.heatmap.min() >= 0.0 and explanation.heatmap.max() <= 1.0
    assert explanation.heatmap.std() > 0.01, "a constant heatmap shows nothing"
    assert explanation.image.size == (150, 120)
    assert explanation.layer == "bn2"


def test_heatmap_responds_to_the_image(predictor: Predictor) -> None:
    explainer = GradCamExplainer(predictor)
    xray = explainer.explain(synthetic_xray("responds", True, 96), target_label="PNEUMONIA").heatmap
    blank = explainer.explain(Image.new("L", (96, 96), 128), target_label="PNEUMONIA").heatmap
    assert np.abs(xray - blank).max() > 0.2


def test_heatmap_depends_on_the_explained_answer(predictor: Predictor) -> None:
    explainer = GradCamExplainer(predictor)
    image = synthetic_xray("answers", True, 96)
    pneumonia = explainer.explain(image, target_label="PNEUMONIA").heatmap
    normal = explainer.explain(image, target_label="NORMAL").heatmap
    assert np.abs(pneumonia - normal).max() > 0.2
    with pytest.raises(ValueError, match="target_label"):
        explainer.explain(image, target_label="BACTERIA")


def test_default_target_is_the_predicted_label(predictor: Predictor) -> None:
    explainer = GradCamExplainer(predictor)
    for name in ("a", "b", "c"):
        data = xray_bytes(name, name != "b")
        assert explainer.explain(predictor.decode(data)).target_label == predictor.predict(data).label


def test_large_images_are_shrunk_for_display(predictor: Predictor) -> None:
    explanation = GradCamExplainer(predictor).explain(synthetic_xray("big", False, 300), max_side=100)
    assert explanation.image.size == (100, 100)
    assert explanation.heatmap.shape == (100, 100)


def test_predictor_model_is_left_untouched(predictor: Predictor) -> None:
    model = predictor.runner.model  # type: ignore[attr-defined]
    before = {name: p.requires_grad for name, p in model.named_parameters()}
    reference = predictor.predict(xray_bytes("untouched")).probability
    GradCamExplainer(predictor).explain(synthetic_xray("untouched", True, 96))
    assert {name: p.requires_grad for name, p in model.named_parameters()} == before
    assert all(p.grad is None for p in model.parameters())
    assert not any(m._forward_hooks for m in model.modules()), "hooks leaked onto the predictor's model"
    assert predictor.predict(xray_bytes("untouched")).probability == reference


def test_concurrent_explanations_match_serial_ones(predictor: Predictor) -> None:
    explainer = GradCamExplainer(predictor)
    images = [synthetic_xray(f"thread{i}", i % 2 == 0, 96) for i in range(4)]
    serial = [explainer.explain(image, "PNEUMONIA").heatmap for image in images]
    parallel: list[np.ndarray | None] = [None] * len(images)

    def work(index: int) -> None:
        parallel[index] = explainer.explain(images[index], "PNEUMONIA").heatmap

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(images))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for expected, got in zip(serial, parallel, strict=True):
        assert got is not None
        np.testing.assert_allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize(
    "arch", [pytest.param(a, marks=pytest.mark.slow) if a in ("vgg19", "xception") else a for a in list_archs()]
)
def test_every_registered_arch_gets_a_heatmap(arch: str) -> None:
    torch.manual_seed(0)
    model = create_model(arch, pretrained=False)
    nn.init.normal_(model.get_classifier().weight, std=0.5)  # the new head starts near zero: give it a scale
    explainer = GradCamExplainer(_stub_predictor(model, arch, 64))  # type: ignore[arg-type]
    image = synthetic_xray(f"arch-{arch}", True, 80)
    xray = explainer.explain(image, target_label="PNEUMONIA").heatmap
    blank = explainer.explain(Image.new("L", (80, 80), 0), target_label="PNEUMONIA").heatmap
    assert xray.shape == (80, 80)
    assert xray.std() > 0.01
    assert not np.allclose(xray, blank, atol=0.05)


@pytest.mark.parametrize(("arch", "layer"), [("vgg19", "features.51"), ("xception", "act4"), ("resnet18", "layer4")])
def test_target_layer_per_family(arch: str, layer: str) -> None:
    assert target_layer_name(create_model(arch, pretrained=False)) == layer


def test_fallback_is_the_last_spatial_layer_and_mlps_are_refused() -> None:
    cnn = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 8, 3, stride=2), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2),
    )  # fmt: skip
    assert target_layer_name(cnn) == "3"
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(3 * 64 * 64, 2))
    with pytest.raises(ExplainUnavailableError) as err:
        target_layer_name(mlp)
    assert err.value.code == "explain_unavailable"


def test_explainer_refusals_say_why(predictor: Predictor, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ExplainUnavailableError, match="no layer named 'no_such_layer'"):
        GradCamExplainer(predictor, layer="no_such_layer")


def test_explainer_loads_the_network_of_an_onnx_predictor(tmp_path: Path) -> None:
    """An ONNX predictor has no torch network: Grad-CAM loads the bundle's own, and explains the same answer."""
    folder = tiny_bundle(tmp_path / "bundle", head="wide")[0]
    predictor, onnx_side = torch_predictor(folder), Predictor(folder)
    assert onnx_side.backend == "fp32"
    image = synthetic_xray("loads", True, 96)
    maps = [GradCamExplainer(p).explain(image, "PNEUMONIA").heatmap for p in (predictor, onnx_side)]
    np.testing.assert_allclose(maps[0], maps[1], atol=1e-3)


def test_overlay_blends_by_heat_and_opacity() -> None:
    image = Image.new("L", (40, 30), 100)
    heat = np.zeros((30, 40), dtype=np.float32)
    heat[:, 20:] = 1.0
    assert np.array_equal(np.asarray(overlay_heatmap(image, heat, 0.0)), np.asarray(image.convert("RGB")))
    out = np.asarray(overlay_heatmap(image, heat, 0.8)).astype(int)
    assert out.shape == (30, 40, 3)
    assert (out[:, :20] == 100).all(), "cold pixels keep the radiograph"
    assert np.abs(out[:, 20:] - 100).max() > 50, "hot pixels are coloured"
    with pytest.raises(ValueError, match="opacity"):
        overlay_heatmap(image, heat, 1.5)
    with pytest.raises(ValueError, match="shape"):
        overlay_heatmap(image, heat.T, 0.5)


def test_three_class_bundle_explains_pneumonia_probability(tmp_path: Path) -> None:
    """A 3-class bundle: the map explains P(pneumonia) = P(bacteria) + P(virus)."""
    folder = tiny_bundle(
        tmp_path / "three", labels=["NORMAL", "BACTERIA", "VIRUS"], positive_labels=["BACTERIA", "VIRUS"],
        head="wide", export=False, temperature=1.7,
    )[0]  # fmt: skip
    predictor = torch_predictor(folder, check_ood=False)
    # The score explained is the log-odds of P(bacteria) + P(virus), temperature included.
    logits = torch.tensor([0.3, -1.2, 0.8])
    target = _DecisionTarget([1, 2], 3, 1.7, 0.5, "PNEUMONIA")
    probs = torch.softmax(logits / 1.7, 0)
    assert float(torch.sigmoid(target(logits))) == pytest.approx(float(probs[1] + probs[2]), abs=1e-6)
    assert float(_DecisionTarget([1, 2], 3, 1.7, 0.5, "NORMAL")(logits)) == pytest.approx(-float(target(logits)))
    # By default the map explains the answer the predictor gives on that same sum.
    for name in ("three", "four", "five"):
        data = xray_bytes(name, name != "four")
        explanation = GradCamExplainer(predictor).explain(predictor.decode(data))
        assert explanation.target_label == predictor.predict(data).label
        assert explanation.heatmap.std() > 0.01


def test_missing_grad_cam_package_is_a_clear_error(predictor: Predictor, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pytorch_grad_cam", None)  # makes `import pytorch_grad_cam` fail
    with pytest.raises(ExplainUnavailableError, match="pip install grad-cam"):
        GradCamExplainer(predictor)
