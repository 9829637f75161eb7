"""Helpers for the ONNX export, backend and bench tests: a tiny seeded bundle, its export, synthetic X-rays.

Test modules import :func:`exported_tiny_bundle_fixture` (the session fixture ``exported_tiny_bundle``),
so the whole suite pays for one real ONNX export (~5-15 s on 2 shared cores), not one per module.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import synthetic_xray
from model_helpers import tiny_bundle as save_tiny_bundle
from typer.testing import CliRunner

from pneumo.cli import app
from pneumo.core.io import read_image
from pneumo.core.preprocess import PreprocessConfig, preprocess
from pneumo.modeling.models import create_model
from pneumo.serving.onnx_runtime import ONNX_FILE

#: timm's smallest EfficientNet (~0.1 M parameters): the same block types as Lite0, exported in seconds.
TINY_ARCH = "test_efficientnet"


def tiny_bundle(folder: Path, *, seed: int = 0, input_size: int = 64) -> Path:
    """A seeded random bundle whose probabilities spread over (0, 1), so parity is tested away from 0.5.

    Seeded, so the same call gives the same weights (and the same ONNX cache entry) every time.
    """
    torch.manual_seed(seed)
    model: Any = create_model(TINY_ARCH, num_classes=2, pretrained=False).eval()
    config = PreprocessConfig(input_size, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    batch = torch.from_numpy(np.stack([preprocess(read_image(blob).image, config) for blob in xray_jpegs(32)]))
    head = model.get_classifier()
    torch.nn.init.normal_(head.weight)  # independent of how pneumo.modeling.models initialises a new head
    with torch.no_grad():  # rescale and centre the head: logit gaps with mean 0 and standard deviation 3
        features = model.forward_head(model.forward_features(batch), pre_logits=True)
        gap = head(features) @ torch.tensor([-1.0, 1.0])
        head.weight.mul_(3.0 / gap.std())
        head.bias.mul_(3.0 / gap.std())
        head.bias[1] -= (head(features) @ torch.tensor([-1.0, 1.0])).mean()
    return save_tiny_bundle(folder, model, arch=TINY_ARCH, preprocess=config, temperature=1.5, name="tiny-onnx-test")[0]


def xray_jpegs(n: int, size: int = 96) -> list[bytes]:
    """``n`` different synthetic chest-like JPEGs (half with a pneumonia-like blotch), as bytes."""
    blobs = []
    for index in range(n):
        buffer = io.BytesIO()
        synthetic_xray(f"onnx-{index}", pneumonia=index % 2 == 1, size=size).save(buffer, "JPEG", quality=92)
        blobs.append(buffer.getvalue())
    return blobs


@pytest.fixture(scope="session", name="exported_tiny_bundle")
def exported_tiny_bundle_fixture(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny bundle exported with ``pneumo export onnx`` (so the CLI command is exercised too).

    Each importing module registers its own copy of this fixture; the memo makes them share one export.
    """
    if "bundle" not in _EXPORTED:
        folder = tiny_bundle(tmp_path_factory.mktemp("exported") / "bundle")
        result = CliRunner().invoke(app, ["export", "onnx", "--model", str(folder), "--opset", "18"])
        assert result.exit_code == 0, result.output
        assert result.output.strip().endswith(ONNX_FILE)
        _EXPORTED["bundle"] = folder
    return _EXPORTED["bundle"]


_EXPORTED: dict[str, Path] = {}
