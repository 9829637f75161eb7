"""The training stack (torch, timm, Lightning): models, data, training, the end of a run, export and quantization.

The names below load on first use (PEP 562): the CLI builds ``pneumo train``'s options from
:mod:`pneumo.modeling.config` without importing torch, and a base (serving-only) install can
still import that module.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "TrainConfig": "pneumo.modeling.config",
    "AugmentConfig": "pneumo.modeling.config",
    "fit": "pneumo.modeling.training",
    "create_model": "pneumo.modeling.models",
    "torch_predictor": "pneumo.modeling.torch_backend",
    "export_onnx": "pneumo.modeling.export",
    "quantize_bundle": "pneumo.modeling.quantize",
    "GradCamExplainer": "pneumo.modeling.gradcam",
    "fit_ood": "pneumo.modeling.ood_fit",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'pneumo.modeling' has no attribute {name!r}")
