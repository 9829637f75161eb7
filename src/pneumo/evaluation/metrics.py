"""Metrics, bootstrap confidence intervals, threshold choice and calibration.

Training (threshold and temperature on the validation split), ``pneumo evaluate`` and ``pneumo compare``
all go through this module, so every number they report has one definition. Conventions: ``y_true`` is 1
for PNEUMONIA (the positive class) and 0 for NORMAL, ``prob`` is P(pneumonia), and an image is called
PNEUMONIA when ``prob >= threshold``. Values that are undefined on the data at hand (ROC AUC with one
class, precision with no positive calls) are ``None``, never NaN, so reports stay valid JSON.

Pure numpy / scipy / scikit-learn: no torch needed. Plots live in :mod:`pneumo.evaluation.plots`, the
Markdown report in :mod:`pneumo.evaluation.report`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.stats import rankdata
from sklearn.metrics import (
    average_precision_score,
    brier_score_loss,
    confusion_matrix,
    precision_recall_curve,
    roc_auc_score,
    roc_curve,
)

from pneumo.core.bundle import NEGATIVE, POSITIVE, ThresholdRule, is_positive
from pneumo.core.errors import PneumoError
from pneumo.evaluation.intervals import cluster_bootstrap_ci, percentile_intervals, repair_degenerate

logger = logging.getLogger(__name__)

LABEL_NAMES = (NEGATIVE, POSITIVE)
#: The rules :func:`select_threshold` computes from one set of probabilities (``robust`` needs the
#: shifted ones too: :func:`pneumo.evaluation.robustness.robust_threshold`).
SINGLE_SET_RULES = (ThresholdRule.YOUDEN, ThresholdRule.SENSITIVITY, ThresholdRule.F1)
#: Metrics that :func:`evaluation_report` gives a confidence interval by default.
REPORT_CI_METRICS = ("accuracy", "sensitivity", "specificity", "precision", "npv", "f1", "roc_auc", "pr_auc")
#: Every metric :func:`bootstrap_ci` can resample (all vectorized over resamples).
BOOTSTRAP_METRICS = (*REPORT_CI_METRICS, "brier", "ece")

# Bootstrap resamples are processed in chunks of about this many (resample x image) cells to bound memory.
_CHUNK_CELLS = 2_000_000


class MetricsInputError(PneumoError, ValueError):
    """Labels, probabilities or options handed to ``pneumo.evaluation.metrics`` are not usable."""

    code = "invalid_metrics_input"


# ---------------------------------------------------------------- validation and small helpers


def _check_binary(y_true: ArrayLike, prob: ArrayLike) -> tuple[NDArray[np.int64], NDArray[np.float64]]:
    """Validate labels and probabilities once, so every metric fails with the same clear message."""
    y = np.asarray(y_true)
    p = np.asarray(prob, dtype=np.float64)
    if y.ndim != 1 or p.shape != y.shape:
        raise MetricsInputError(f"y_true and prob must be 1-D and of equal length, got shapes {y.shape} and {p.shape}")
    if y.size == 0:
        raise MetricsInputError("y_true and prob are empty: there are no images to score")
    if not np.isin(y, (0, 1)).all():
        raise MetricsInputError(f"y_true must hold 0 (NORMAL) or 1 (PNEUMONIA) only, got values {np.unique(y)[:10]}")
    if not np.isfinite(p).all() or p.min() < 0.0 or p.max() > 1.0:
        raise MetricsInputError(
            f"prob must be probabilities in [0, 1], got min {np.nanmin(p)} and max {np.nanmax(p)} "
            "(NaN/inf included?); apply sigmoid or softmax to logits first"
        )
    return y.astype(np.int64), p


def _check_threshold(threshold: float) -> float:
    thr = float(threshold)
    if not math.isfinite(thr):
        raise MetricsInputError(f"threshold must be a finite number, got {threshold!r}")
    return thr


def _both_classes(y: NDArray[np.int64]) -> bool:
    return 0 < int(y.sum()) < y.size


def _optional(x: Any) -> float | None:
    """NaN -> None: JSON has no NaN, and None says 'undefined' plainly."""
    value = float(x)
    return None if math.isnan(value) else value


def _div(num: ArrayLike, den: ArrayLike) -> NDArray[np.float64]:
    n, d = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    out = np.full(np.broadcast_shapes(n.shape, d.shape), np.nan)
    return np.divide(n, d, out=out, where=d > 0)


def _rates(tp: ArrayLike, fp: ArrayLike, tn: ArrayLike, fn: ArrayLike) -> dict[str, NDArray[np.float64]]:
    """Confusion-matrix ratios, elementwise, NaN where 0/0; shared by point estimates and the bootstrap."""
    tp, fp, tn, fn = (np.asarray(a, dtype=np.float64) for a in (tp, fp, tn, fn))
    return {
        "accuracy": _div(tp + tn, tp + fp + tn + fn),
        "sensitivity": _div(tp, tp + fn),
        "specificity": _div(tn, tn + fp),
        "precision": _div(tp, tp + fp),
        "npv": _div(tn, tn + fn),
        "f1": _div(2 * tp, 2 * tp + fp + fn),
    }


def _bin_index(p: NDArray[np.float64], n_bins: int) -> NDArray[np.int64]:
    """Equal-width bins over [0, 1], left-closed, with 1.0 in the last bin."""
    return np.minimum((p * n_bins).astype(np.int64), n_bins - 1)


def _reliability_bins(
    y: NDArray[np.int64], p: NDArray[np.float64], n_bins: int
) -> tuple[NDArray[np.intp], NDArray[np.float64], NDArray[np.float64]]:
    """Per bin: image count, sum of predicted probabilities, number of positives."""
    b = _bin_index(p, n_bins)
    counts = np.bincount(b, minlength=n_bins)
    sum_p, sum_y = (np.bincount(b, weights=w, minlength=n_bins).astype(np.float64) for w in (p, y))
    return counts, sum_p, sum_y


# ---------------------------------------------------------------- threshold and calibration


def select_threshold(
    y_true: np.ndarray, prob: np.ndarray, rule: ThresholdRule | str = "youden", target_sensitivity: float = 0.95
) -> float:
    """Choose the decision threshold on validation data (never on the test set).

    Args:
        y_true: 1 = PNEUMONIA, 0 = NORMAL; both classes must be present.
        prob: P(pneumonia) per image.
        rule: ``"youden"`` maximizes sensitivity + specificity - 1 over the ROC curve; ``"sensitivity"`` takes
            the highest threshold whose sensitivity is at least ``target_sensitivity`` (a screening setting:
            missing pneumonia costs more than a false alarm, and among thresholds that reach the target the
            highest has the best specificity); ``"f1"`` maximizes F1 of the positive class.
        target_sensitivity: the sensitivity the ``"sensitivity"`` rule must reach, in (0, 1].

    Returns:
        A finite threshold to use as ``prob >= threshold``. Ties go to the highest threshold. When the best
        choice is "call nobody positive" (scikit-learn's ``inf`` ROC threshold), the float just above the
        largest probability is returned instead, so it stays finite and JSON-serializable.
    """
    y, p = _check_binary(y_true, prob)
    if rule not in SINGLE_SET_RULES:
        raise MetricsInputError(f"unknown threshold rule {rule!r}; choose one of {', '.join(SINGLE_SET_RULES)}")
    if not _both_classes(y):
        raise MetricsInputError(
            f"choosing a threshold needs both NORMAL and PNEUMONIA images, got {int(y.sum())} positive "
            f"of {y.size}; use a validation split that contains both classes"
        )
    if rule == "f1":
        precision, recall, thresholds = precision_recall_curve(y, p)
        f1 = _div(2 * precision[:-1] * recall[:-1], precision[:-1] + recall[:-1])
        f1 = np.nan_to_num(f1, nan=0.0)
        best = len(f1) - 1 - int(np.argmax(f1[::-1]))  # thresholds ascend: the last maximum is the highest
        return float(thresholds[best])
    fpr, tpr, thresholds = roc_curve(y, p, drop_intermediate=False)  # thresholds descend
    if rule == "youden":
        best = int(np.argmax(tpr - fpr))
    else:
        if not 0.0 < target_sensitivity <= 1.0:
            raise MetricsInputError(f"target_sensitivity must be in (0, 1], got {target_sensitivity}")
        best = int(np.argmax(tpr >= target_sensitivity - 1e-12))  # tpr reaches 1.0, so a match exists
    threshold = float(thresholds[best])
    if not math.isfinite(threshold) or threshold > p.max():
        threshold = float(np.nextafter(p.max(), np.inf))
        logger.warning("threshold rule %r calls no image positive; returning %.6g", rule, threshold)
    return threshold


def expected_calibration_error(y_true: np.ndarray, prob: np.ndarray, n_bins: int = 15) -> float:
    """Binary ECE of P(positive): sum over equal-width bins of (bin share) x |observed rate - mean prob|.

    Computed on the positive-class probability (not top-label confidence) because that is the number the
    app shows to clinicians.
    """
    y, p = _check_binary(y_true, prob)
    if n_bins < 1:
        raise MetricsInputError(f"n_bins must be >= 1, got {n_bins}")
    _, sum_p, sum_y = _reliability_bins(y, p, n_bins)
    return float(np.abs(sum_y - sum_p).sum() / y.size)


# ---------------------------------------------------------------- point estimates and bootstrap


def compute_metrics(y_true: np.ndarray, prob: np.ndarray, threshold: float) -> dict[str, Any]:
    """All headline metrics at one threshold, JSON-ready (plain ints/floats, ``None`` where undefined).

    Keys: n_images, n_positive, n_negative, threshold, accuracy, sensitivity, specificity, precision, npv,
    f1, roc_auc, pr_auc (average precision), ece, brier, confusion_matrix (``[[tn, fp], [fn, tp]]``).
    """
    y, p = _check_binary(y_true, prob)
    thr = _check_threshold(threshold)
    (tn, fp), (fn, tp) = confusion_matrix(y, is_positive(p, thr).astype(np.int64), labels=[0, 1])
    both = _both_classes(y)
    out: dict[str, Any] = {
        "n_images": int(y.size),
        "n_positive": int(y.sum()),
        "n_negative": int(y.size - y.sum()),
        "threshold": thr,
    }
    out.update({name: _optional(value) for name, value in _rates(tp, fp, tn, fn).items()})
    out["roc_auc"] = float(roc_auc_score(y, p)) if both else None
    out["pr_auc"] = float(average_precision_score(y, p)) if both else None
    out["ece"] = expected_calibration_error(y, p)
    out["brier"] = float(brier_score_loss(y, p))
    out["confusion_matrix"] = [[int(tn), int(fp)], [int(fn), int(tp)]]
    return out


def _auc_rows(probs: NDArray[np.float64], pos: NDArray[np.bool_]) -> NDArray[np.float64]:
    """ROC AUC of every row at once via the Mann-Whitney rank form (equals ``roc_auc_score``, ties included).

    A loop over ``roc_auc_score`` costs ~2.5 ms per resample; 1000 resamples would dominate evaluation.
    """
    n_pos = int(pos.sum())
    n_neg = pos.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return np.full(len(probs), np.nan)
    ranks = rankdata(probs, axis=1)  # average ranks for ties count a tie as half a win
    return np.asarray((ranks[:, pos].sum(axis=1) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg), dtype=np.float64)


def _ap_rows(probs: NDArray[np.float64], pos: NDArray[np.bool_]) -> NDArray[np.float64]:
    """Average precision of every row at once, with scikit-learn's step rule: sum of (delta recall) x precision
    at each distinct score, tied scores forming one step."""
    n_pos = int(pos.sum())
    if n_pos == 0 or n_pos == pos.size:
        return np.full(len(probs), np.nan)
    order = np.argsort(-probs, axis=1, kind="stable")
    scores = np.take_along_axis(probs, order, axis=1)
    tp = np.cumsum(pos[order], axis=1)
    end = np.ones(scores.shape, dtype=bool)  # last position of each group of tied scores
    end[:, :-1] = scores[:, :-1] != scores[:, 1:]
    prev_tp = np.zeros_like(tp)  # true positives at the previous group end
    prev_tp[:, 1:] = np.maximum.accumulate(np.where(end, tp, 0), axis=1)[:, :-1]
    steps = np.where(end, (tp - prev_tp) * tp / np.arange(1, pos.size + 1), 0.0)
    return np.asarray(steps.sum(axis=1) / n_pos, dtype=np.float64)


def _metric_rows(
    y: NDArray[np.int64], probs: NDArray[np.float64], threshold: float, metrics: Sequence[str], n_bins: int = 15
) -> dict[str, NDArray[np.float64]]:
    """Each metric for each row of ``probs`` (shape (B, N)); all rows share the labels ``y`` (shape (N,))."""
    pos = y == 1
    n_pos = int(pos.sum())
    called = is_positive(probs, threshold)
    tp = called[:, pos].sum(axis=1)
    fp = called[:, ~pos].sum(axis=1)
    rates = _rates(tp, fp, (y.size - n_pos) - fp, n_pos - tp)
    out: dict[str, NDArray[np.float64]] = {}
    for name in metrics:
        if name in rates:
            out[name] = rates[name]
        elif name == "roc_auc":
            out[name] = _auc_rows(probs, pos)
        elif name == "pr_auc":
            out[name] = _ap_rows(probs, pos)
        elif name == "brier":
            out[name] = ((probs - y) ** 2).mean(axis=1)
        elif name == "ece":
            bins = _bin_index(probs, n_bins) + n_bins * np.arange(len(probs))[:, None]
            gaps = np.bincount(bins.ravel(), weights=(probs - y).ravel(), minlength=len(probs) * n_bins)
            out[name] = np.abs(gaps.reshape(len(probs), n_bins)).sum(axis=1) / y.size
    return out


def bootstrap_ci(
    y_true: np.ndarray,
    prob: np.ndarray,
    threshold: float,
    metrics: Sequence[str] = ("accuracy", "sensitivity", "specificity", "roc_auc", "f1"),
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict[str, tuple[float, float] | None]:
    """Percentile-bootstrap confidence intervals over images.

    Resampling is stratified (NORMAL and PNEUMONIA images are resampled separately), so every resample has
    the class counts of the data and sensitivity, specificity and AUC are always defined. All metrics are
    computed for all resamples at once with numpy. Resamples where a metric is undefined (precision with no
    positive call) are left out of its interval.

    Returns:
        metric -> (low, high) at level ``1 - alpha``; ``None`` where the metric is undefined in every resample
        (e.g. ``roc_auc`` when only one class is present).
    """
    y, p = _check_binary(y_true, prob)
    thr = _check_threshold(threshold)
    unknown = [m for m in metrics if m not in BOOTSTRAP_METRICS]
    if unknown:
        raise MetricsInputError(f"cannot bootstrap {unknown}; choose from {', '.join(BOOTSTRAP_METRICS)}")
    if n_boot < 1 or not 0.0 < alpha < 1.0:
        raise MetricsInputError(f"need n_boot >= 1 and 0 < alpha < 1, got n_boot={n_boot}, alpha={alpha}")
    rng = np.random.default_rng(seed)
    groups = [g for g in (np.flatnonzero(y == 0), np.flatnonzero(y == 1)) if g.size]
    y_resampled = np.concatenate([y[g] for g in groups])  # the label of each column, identical in every resample
    chunk = max(1, _CHUNK_CELLS // y.size)
    values: dict[str, list[NDArray[np.float64]]] = {m: [] for m in metrics}
    for start in range(0, n_boot, chunk):
        size = min(chunk, n_boot - start)
        idx = np.concatenate([g[rng.integers(0, g.size, size=(size, g.size))] for g in groups], axis=1)
        for name, v in _metric_rows(y_resampled, p[idx], thr, metrics).items():
            values[name].append(v)
    return percentile_intervals({name: np.concatenate(values[name]) for name in metrics}, alpha)


def evaluation_report(
    y_true: np.ndarray,
    prob: np.ndarray,
    threshold: float,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    ci_metrics: Sequence[str] = REPORT_CI_METRICS,
    groups: Sequence[Any] | None = None,
) -> dict[str, Any]:
    """:func:`compute_metrics` plus ``"ci"`` (metric -> ``[low, high]`` or ``None``), ``"ci_level"``, ``"ci_method"``,
    ``"ci_notes"``; ``n_boot=0`` skips them. ``groups`` (a patient id per image) resamples patients, not images;
    collapsed intervals are repaired either way (:mod:`pneumo.evaluation.intervals`)."""
    report = compute_metrics(y_true, prob, threshold)
    ci: dict[str, tuple[float, float] | None] = {}
    notes: dict[str, str] = {}
    method = "none"
    if n_boot > 0 and groups is not None:
        y, p = _check_binary(y_true, prob)
        ci = cluster_bootstrap_ci(y, p, _check_threshold(threshold), groups, ci_metrics, n_boot, seed, alpha,
                                  score=_metric_rows)  # fmt: skip
        method = (f"percentile bootstrap, n={n_boot} resamples of the {len(set(groups))} patients (cluster "
                  f"bootstrap: all of a patient's images together), stratified by class, seed {seed}")  # fmt: skip
    elif n_boot > 0:
        ci = bootstrap_ci(y_true, prob, threshold, ci_metrics, n_boot, seed, alpha)
        method = f"percentile bootstrap, n={n_boot} resamples of the images, stratified by class, seed {seed}"
    ci, notes = repair_degenerate(report, ci, alpha) if ci else (ci, notes)
    report["ci"] = {name: (list(bounds) if bounds is not None else None) for name, bounds in ci.items()}
    report.update(ci_level=1.0 - alpha, ci_method=method, ci_notes=notes)
    return report
