"""Evaluation plots: ROC, precision-recall, confusion matrix and reliability diagram as PNG files.

scikit-learn's displays draw the curves; this module adds the operating point (the threshold in
force) and the undefined cases (one class only), which they do not.

Uses ``matplotlib.figure.Figure`` directly (Agg rendering, no pyplot), so it is thread-safe, needs no
display and leaves no global state behind.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from sklearn.calibration import CalibrationDisplay
from sklearn.metrics import ConfusionMatrixDisplay, PrecisionRecallDisplay, RocCurveDisplay

from pneumo.evaluation.metrics import LABEL_NAMES, _check_binary, compute_metrics


def save_plots(
    y_true: np.ndarray, prob: np.ndarray, threshold: float, out_dir: Path, prefix: str = ""
) -> dict[str, Path]:
    """Write ROC, precision-recall, confusion-matrix and reliability plots as PNG files.

    Uses ``matplotlib.figure.Figure`` directly (Agg rendering, no pyplot), so it is thread-safe, needs no
    display and leaves no global state behind.

    Returns:
        ``{"roc", "pr", "confusion_matrix", "reliability"}`` -> path of ``out_dir / f"{prefix}{name}.png"``.
    """
    from matplotlib.figure import Figure  # lazy: only plotting needs matplotlib

    y, p = _check_binary(y_true, prob)
    m = compute_metrics(y, p, threshold)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    drawers = {"roc": _plot_roc, "pr": _plot_pr, "confusion_matrix": _plot_confusion, "reliability": _plot_reliability}
    paths: dict[str, Path] = {}
    for name, draw in drawers.items():
        fig = Figure(figsize=(5, 5), layout="constrained")
        ax = fig.add_subplot()
        draw(ax, y, p, m)
        paths[name] = out_dir / f"{prefix}{name}.png"
        fig.savefig(paths[name], dpi=100)
    return paths


def _undefined(ax: Any, title: str) -> None:
    ax.set_title(title)
    ax.text(0.5, 0.5, "undefined: only one class present", ha="center", va="center", transform=ax.transAxes)


def _plot_roc(ax: Any, y: NDArray[np.int64], p: NDArray[np.float64], m: Mapping[str, Any]) -> None:
    if m["roc_auc"] is None:
        _undefined(ax, "ROC curve")
        return
    RocCurveDisplay.from_predictions(y, p, ax=ax, name="ROC", plot_chance_level=True)
    ax.plot(1 - m["specificity"], m["sensitivity"], "o", color="red", label=f"threshold {m['threshold']:.3f}")
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title="ROC curve", xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right")


def _plot_pr(ax: Any, y: NDArray[np.int64], p: NDArray[np.float64], m: Mapping[str, Any]) -> None:
    if m["pr_auc"] is None:
        _undefined(ax, "Precision-recall curve")
        return
    PrecisionRecallDisplay.from_predictions(y, p, ax=ax, name="PR", plot_chance_level=True)
    if m["precision"] is not None:
        ax.plot(m["sensitivity"], m["precision"], "o", color="red", label=f"threshold {m['threshold']:.3f}")
    ax.set(xlabel="recall (sensitivity)", ylabel="precision", title="Precision-recall curve")
    ax.set(xlim=(0, 1.01), ylim=(0, 1.01))
    ax.legend(loc="lower left")


def _plot_confusion(ax: Any, y: NDArray[np.int64], p: NDArray[np.float64], m: Mapping[str, Any]) -> None:
    display = ConfusionMatrixDisplay(np.asarray(m["confusion_matrix"]), display_labels=list(LABEL_NAMES))
    display.plot(ax=ax, cmap="Blues", colorbar=False)
    ax.set(xlabel="predicted", ylabel="true", title=f"Confusion matrix (threshold {m['threshold']:.3f})")


def _plot_reliability(ax: Any, y: NDArray[np.int64], p: NDArray[np.float64], m: Mapping[str, Any]) -> None:
    # Equal-width bins, the same 15 as the ECE in the title.
    CalibrationDisplay.from_predictions(y, p, n_bins=15, ax=ax, name="model")
    ax.set(xlabel="mean predicted P(pneumonia)", ylabel="observed fraction PNEUMONIA", xlim=(0, 1), ylim=(0, 1))
    ax.set_title(f"Reliability diagram (ECE = {m['ece']:.3f})")
    ax.legend(loc="upper left")
