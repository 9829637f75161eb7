"""Logits -> calibrated probabilities: the one temperature-scaled softmax of the project.

The Predictor, calibration at the end of training, the ONNX export check and the evaluation
all turn logits into probabilities here, so a bundle's temperature means the same everywhere.
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
    """P(pneumonia) per row: the sum over the positive labels (one in binary mode, two in 3-class)."""
    return np.asarray(probs)[..., list(positive_indices)].sum(axis=-1)
