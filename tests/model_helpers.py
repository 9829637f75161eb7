"""Helpers of the model, bundle and inference tests: a tiny random bundle whose outputs are not bland.

A freshly initialised timm network has BatchNorm statistics of exactly 0 and 1, so a bundle that
lost its buffers would still predict the same; and its head saturates the probabilities at 1.0
for every image, so a wrong threshold or temperature would not show. The model made here has
random BatchNorm statistics and a small random head: probabilities differ from image to image.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from pneumo.core.bundle import BundleMeta
from pneumo.core.preprocess import PreprocessConfig
from pneumo.modeling.models import create_model, get_spec
from pneumo.modeling.weights import save_bundle


def tiny_model(arch: str = "efficientnet_lite0", num_classes: int = 2, seed: int = 0) -> nn.Module:
    """A random eval-mode model with non-trivial BatchNorm statistics and unsaturated probabilities."""
    torch.manual_seed(seed)
    model = create_model(arch, num_classes=num_classes, pretrained=False)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                assert module.running_mean is not None and module.running_var is not None
                module.running_mean.uniform_(-0.05, 0.05)
                module.running_var.uniform_(0.8, 1.2)
        head: Any = model.get_classifier()  # type: ignore[operator]
        head.weight.normal_(0.0, 0.05)
        head.bias.zero_()
    return model.eval()


def tiny_bundle(
    folder: Path,
    model: nn.Module | None = None,
    *,
    arch: str = "efficientnet_lite0",
    labels: list[str] | None = None,
    input_size: int = 64,
    **meta: Any,
) -> tuple[Path, nn.Module]:
    """Save ``model`` (default: :func:`tiny_model`) as a bundle with a small input size; returns both."""
    labels = labels or ["NORMAL", "PNEUMONIA"]
    model = model if model is not None else tiny_model(arch, len(labels))
    spec = get_spec(arch)
    fields: dict[str, Any] = {
        "arch": arch,
        "timm_name": spec.timm_name,
        "labels": labels,
        "preprocess": PreprocessConfig(input_size, spec.preprocess.mean, spec.preprocess.std),
        **meta,
    }
    return save_bundle(folder, model, BundleMeta(**fields)), model
