"""Logits -> calibrated probabilities: the one place the project turns a network's output into P(pneumonia).

Every bundle's probability has one form (its ``calibration`` section and ``temperature``)::

    P(pneumonia) = sigmoid(slope * gap(logits / T) + intercept),
    gap(z) = logsumexp(z[positive labels]) - logsumexp(z[negative labels])

With ``slope = 1`` and ``intercept = 0`` this is exactly the temperature-scaled softmax summed over
the positive labels (bundles before round 6); Platt scaling fits ``slope`` and ``intercept``.
The Predictor, the heatmaps (which explain this very log-odds), the INT8 check, the evaluation and
the end of training all call these functions, so a bundle's calibration means the same everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def temperature_softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Softmax of ``logits / temperature`` along the last axis (numerically stable, float64)."""
    scaled = np.asarray(logits, dtype=np.float64) / temperature
    scaled = scaled - scaled.max(axis=-1, keepdims=True)
    exp = np.exp(scaled)
    return np.asarray(exp / exp.sum(axis=-1, keepdims=True))


def positive_probability(probs: np.ndarray, positive_indices: Sequence[int]) -> np.ndarray:
    """P(pneumonia) per row of label probabilities: the sum over the positive labels (two in 3-class)."""
    return np.asarray(probs)[..., list(positive_indices)].sum(axis=-1)


def _logsumexp(values: np.ndarray) -> np.ndarray:
    top = values.max(axis=-1, keepdims=True)
    return np.asarray((top + np.log(np.exp(values - top).sum(axis=-1, keepdims=True)))[..., 0])


def logit_gap(logits: np.ndarray, positive_indices: Sequence[int], temperature: float = 1.0) -> np.ndarray:
    """The log-odds of pneumonia under the temperature softmax: ``gap(logits / T)`` per row."""
    scaled = np.asarray(logits, dtype=np.float64) / temperature
    positive = list(positive_indices)
    negative = [i for i in range(scaled.shape[-1]) if i not in positive]
    return _logsumexp(scaled[..., positive]) - _logsumexp(scaled[..., negative])


def sigmoid(x: np.ndarray) -> np.ndarray:
    """The logistic function, without overflow warnings for large ``|x|``."""
    x = np.asarray(x, dtype=np.float64)
    out = np.empty_like(x)
    positive = x >= 0
    out[positive] = 1.0 / (1.0 + np.exp(-x[positive]))
    e = np.exp(x[~positive])
    out[~positive] = e / (1.0 + e)
    return out


def calibrated_probability(
    logits: np.ndarray,
    positive_indices: Sequence[int],
    temperature: float = 1.0,
    slope: float = 1.0,
    intercept: float = 0.0,
) -> np.ndarray:
    """Calibrated P(pneumonia) per row: ``sigmoid(slope * gap(logits / T) + intercept)``."""
    return sigmoid(slope * logit_gap(logits, positive_indices, temperature) + intercept)


def label_probabilities(
    logits: np.ndarray,
    positive_indices: Sequence[int],
    temperature: float = 1.0,
    slope: float = 1.0,
    intercept: float = 0.0,
) -> np.ndarray:
    """Per-label probabilities (N, C) whose positive labels sum to :func:`calibrated_probability`.

    The calibration fixes P(pneumonia) only; within each group (positive, negative) the labels
    share their group's probability as the temperature softmax shares it (bacteria vs virus in
    3-class bundles). With the default slope and intercept this is the temperature softmax itself.
    """
    soft = temperature_softmax(logits, temperature)
    positive = list(positive_indices)
    negative = [i for i in range(soft.shape[-1]) if i not in positive]
    p = calibrated_probability(logits, positive, temperature, slope, intercept)[..., None]
    out = np.empty_like(soft)
    for group, mass in ((positive, p), (negative, 1.0 - p)):
        share = soft[..., group]
        out[..., group] = mass * share / np.maximum(share.sum(axis=-1, keepdims=True), 1e-300)
    return out
