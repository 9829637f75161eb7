"""Fitting the probability map on validation data: temperature scaling and Platt scaling.

Both are monotone, so the ranking (ROC AUC) and every decision at the mapped threshold stay as
they were; only the probabilities users read move. :func:`pneumo.modeling.finalize.finalize`
chooses between them (``TrainConfig.calibration``); :mod:`pneumo.core.probability` applies them.
"""

from __future__ import annotations

import logging
import math

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax

from pneumo.evaluation.metrics import MetricsInputError

logger = logging.getLogger(__name__)


def fit_temperature(logits: np.ndarray, labels: np.ndarray, bounds: tuple[float, float] = (0.05, 20.0)) -> float:
    """Fit the temperature T of temperature scaling (Guo et al., 2017) on held-out data.

    Dividing logits by one scalar T > 0 fixes the over-confidence of deep networks without changing which
    class wins, so accuracy and ROC AUC are unchanged while probabilities become trustworthy.

    Args:
        logits: shape (N, C) with C >= 2; a 1-D array is read as binary logits of the positive class
            (equivalent to the two columns ``[0, z]``).
        labels: integer class ids in ``[0, C)``, shape (N,).
        bounds: the search interval for T; the search runs on log T, where the NLL is smooth.

    Returns:
        T minimizing the mean negative log-likelihood of ``softmax(logits / T)``.
    """
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim == 1:
        z = np.stack([np.zeros_like(z), z], axis=1)
    t = np.asarray(labels)
    if z.ndim != 2 or z.shape[1] < 2 or t.shape != (z.shape[0],) or z.shape[0] == 0:
        raise MetricsInputError(
            f"expected logits of shape (N, C>=2) and labels of shape (N,), got {z.shape} and {t.shape}"
        )
    if not np.isfinite(z).all():
        raise MetricsInputError("logits contain NaN or inf")
    if not np.issubdtype(t.dtype, np.integer) or t.min() < 0 or t.max() >= z.shape[1]:
        raise MetricsInputError(f"labels must be integer class ids in [0, {z.shape[1]}), got {np.unique(t)[:10]}")
    lo, hi = bounds
    if not 0 < lo < hi:
        raise MetricsInputError(f"bounds must satisfy 0 < low < high, got {bounds}")
    rows = np.arange(z.shape[0])

    def nll(log_t: float) -> float:
        return float(-log_softmax(z / math.exp(log_t), axis=1)[rows, t].mean())

    result = minimize_scalar(nll, bounds=(math.log(lo), math.log(hi)), method="bounded", options={"xatol": 1e-5})
    temperature = math.exp(float(result.x))
    if min(abs(temperature - lo), abs(temperature - hi)) < 1e-3 * temperature:
        logger.warning("fitted temperature %.4g is at the search bound %s (separable data?)", temperature, bounds)
    return temperature


def fit_platt(gap: np.ndarray, y_true: np.ndarray) -> tuple[float, float]:
    """Platt scaling: ``(slope, intercept)`` of ``P = sigmoid(slope * gap + intercept)`` by maximum likelihood.

    Two parameters and a monotone map: the ranking (ROC AUC) and every decision at a mapped
    threshold are unchanged, while the probabilities move to where the data put them. Unlike
    temperature scaling it also shifts them, which class-weighted training (the probabilities come
    out low: a threshold of 0.125) needs. Unregularized logistic regression (scikit-learn).

    Args:
        gap: the uncalibrated log-odds of pneumonia per image (:func:`pneumo.core.probability.logit_gap`).
        y_true: 1 = PNEUMONIA, 0 = NORMAL; both classes must be present.
    """
    from sklearn.linear_model import LogisticRegression

    y, x = np.asarray(y_true), np.asarray(gap, dtype=np.float64)
    if y.ndim != 1 or x.shape != y.shape or not np.isin(y, (0, 1)).all() or not np.isfinite(x).all():
        raise MetricsInputError(f"Platt scaling needs finite 1-D scores and 0/1 labels of one length, got {x.shape}.")
    if not (y == 0).any() or not (y == 1).any():
        raise MetricsInputError("Platt scaling needs both NORMAL and PNEUMONIA images.")
    model = LogisticRegression(C=np.inf, solver="lbfgs", max_iter=1000).fit(x[:, None], y)
    slope, intercept = float(model.coef_[0, 0]), float(model.intercept_[0])
    if not slope > 0:
        raise MetricsInputError(f"Platt scaling found a slope of {slope:.3g}: the scores do not rank the classes.")
    return slope, intercept
