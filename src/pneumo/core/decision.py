"""The decision and the closed sets every surface shares: the two answers, the backends, the threshold rules.

Split from :mod:`pneumo.core.bundle` (which re-exports these names: they are part of the bundle's
contract) so the rule that turns a probability into an answer reads on one page.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

#: The two answers a bundle gives, whatever its labels (3-class bundles sum bacteria and virus).
POSITIVE = "PNEUMONIA"
NEGATIVE = "NORMAL"


class Backend(StrEnum):
    """What runs the model; ``auto`` picks the fastest checked one (see ``inference.runners.select_runner``)."""

    AUTO = "auto"
    INT8 = "int8"  # the bundle's quantized ONNX graph, ONNX Runtime
    FP32 = "fp32"  # the fp32 ONNX graph (the bundle's model.onnx or an explicit export), ONNX Runtime
    TORCH = "torch"  # eager PyTorch (the training stack registers it: pneumo.modeling.torch_predictor)


class ThresholdRule(StrEnum):
    """How a bundle's decision threshold is chosen on validation data (:mod:`pneumo.evaluation.metrics`)."""

    YOUDEN = "youden"  # maximize sensitivity + specificity - 1
    SENSITIVITY = "sensitivity"  # the highest threshold keeping sensitivity >= a target
    F1 = "f1"  # maximize F1
    ROBUST = "robust"  # the best of several rules on the robustness validation (pneumo.evaluation.robustness)


def is_positive(probability: Any, threshold: float) -> Any:
    """Whether calibrated P(pneumonia) values reach ``threshold``: a bool, or a bool array for an array.

    The one place the decision rule is written; :func:`decide`, the INT8 check and the evaluation use it.
    """
    return probability >= threshold


def decide(probability: float, threshold: float) -> str:
    """The label of a calibrated P(pneumonia): :data:`POSITIVE` when it reaches ``threshold``, else :data:`NEGATIVE`."""
    return POSITIVE if is_positive(probability, threshold) else NEGATIVE
