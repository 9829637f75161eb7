"""How good a model is: metrics with confidence intervals, the robustness validation, reports, plots, comparisons."""

from pneumo.evaluation.evaluate import evaluate_folder
from pneumo.evaluation.metrics import compute_metrics, evaluation_report, select_threshold
from pneumo.evaluation.robustness import SHIFTS, evaluate_bundle, robustness_report

__all__ = [
    "SHIFTS",
    "compute_metrics",
    "evaluate_bundle",
    "evaluate_folder",
    "evaluation_report",
    "robustness_report",
    "select_threshold",
]
