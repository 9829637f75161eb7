"""pneumo: pneumonia detection on pediatric chest X-rays.

The few names a user needs, as timm's top level offers ``create_model``::

    from pneumo import Predictor
    prediction = Predictor().predict("film.jpeg")   # the shipped default model
    print(prediction.label, prediction.probability)

They load on first use (PEP 562), so ``import pneumo.core.errors`` stays cheap and the CLI starts fast.
The packages, one job each: :mod:`pneumo.core` (errors, decoding, preprocessing, the bundle contract),
:mod:`pneumo.inference` (the Predictor; torch-free), :mod:`pneumo.api`, :mod:`pneumo.app` and
:mod:`pneumo.dicom` (the three surfaces), :mod:`pneumo.evaluation`, :mod:`pneumo.modeling`
(training, export; torch) and :mod:`pneumo.cli`.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.2.0"

_LAZY = {
    "Predictor": "pneumo.inference",
    "Prediction": "pneumo.inference",
    "read_image": "pneumo.core.decode",
    "PneumoError": "pneumo.core.errors",
    "BundleMeta": "pneumo.core.bundle",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'pneumo' has no attribute {name!r}")
