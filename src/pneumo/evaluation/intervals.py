"""Confidence intervals that say what the data can claim: by patient, and honest on few images.

Two things an image-level bootstrap gets wrong on chest films:

* **Patients, not images, are the independent units.** A child with three films contributes three
  nearly identical answers; resampling images treats them as three children and narrows the
  interval. :func:`cluster_bootstrap_ci` resamples whole patients (stratified by class), as
  a cluster bootstrap does (Field & Welsh, 2007).
* **A bootstrap on few images degenerates.** Fourteen films all called right give fourteen
  right in every resample, so the percentile interval is "1.000-1.000". For the proportions
  (accuracy, sensitivity, specificity, precision, NPV) :func:`exact_interval` gives the
  Clopper-Pearson interval instead wherever the estimate sits on 0 or 1 or the bootstrap
  interval has no width: 14 of 14 right is then 0.768-1.000. Other metrics (ROC AUC, F1, ...)
  with a degenerate interval get none, and a note says why.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy.stats import beta

#: The confusion-matrix proportions and their (numerator, denominator) cells of ``[[tn, fp], [fn, tp]]``.
PROPORTIONS = {
    "accuracy": (("tp", "tn"), ("tp", "tn", "fp", "fn")),
    "sensitivity": (("tp",), ("tp", "fn")),
    "specificity": (("tn",), ("tn", "fp")),
    "precision": (("tp",), ("tp", "fp")),
    "npv": (("tn",), ("tn", "fn")),
}


def exact_interval(successes: int, trials: int, alpha: float = 0.05) -> tuple[float, float] | None:
    """The Clopper-Pearson ("exact") interval of a binomial proportion; ``None`` with no trials.

    Conservative by construction (coverage at least ``1 - alpha`` for every true proportion), which is
    what a small evaluation set should get: 14 of 14 -> (0.768, 1.0), 0 of 5 -> (0.0, 0.522).
    """
    if trials <= 0:
        return None
    low = 0.0 if successes == 0 else float(beta.ppf(alpha / 2, successes, trials - successes + 1))
    high = 1.0 if successes == trials else float(beta.ppf(1 - alpha / 2, successes + 1, trials - successes))
    return low, high


def _cells(report: dict[str, Any]) -> dict[str, int]:
    (tn, fp), (fn, tp) = report["confusion_matrix"]
    return {"tn": tn, "fp": fp, "fn": fn, "tp": tp}


def repair_degenerate(
    report: dict[str, Any], ci: dict[str, tuple[float, float] | None], alpha: float
) -> tuple[dict[str, tuple[float, float] | None], dict[str, str]]:
    """Replace collapsed intervals: Clopper-Pearson for the proportions, none (with a note) for the rest.

    Returns the intervals and ``notes`` (metric -> why its interval is exact or absent).
    """
    cells = _cells(report)
    out, notes = dict(ci), {}
    for name, bounds in ci.items():
        value = report.get(name)
        collapsed = bounds is not None and bounds[1] - bounds[0] < 1e-12
        if name in PROPORTIONS:
            numerator, denominator = PROPORTIONS[name]
            k, n = sum(cells[c] for c in numerator), sum(cells[c] for c in denominator)
            if collapsed or value in (0.0, 1.0):
                out[name] = exact_interval(k, n, alpha)
                notes[name] = f"Clopper-Pearson on {k}/{n} (the bootstrap cannot move a proportion of 0 or 1)"
        elif collapsed:
            out[name] = None
            notes[name] = "no interval: every resample gave the same value (too few images or patients)"
    return out, notes


def _strata(groups: NDArray[Any], y: NDArray[np.int64]) -> list[list[NDArray[np.intp]]]:
    """Per class stratum (a patient's majority label), the image indices of each of its patients."""
    members: dict[Any, list[int]] = {}
    for index, group in enumerate(groups.tolist()):
        members.setdefault(group, []).append(index)
    strata: list[list[NDArray[np.intp]]] = [[], []]
    for indices in members.values():
        strata[round(float(y[indices].mean()))].append(np.asarray(indices, dtype=np.intp))
    return [s for s in strata if s]


def cluster_bootstrap_ci(
    y: NDArray[np.int64],
    p: NDArray[np.float64],
    threshold: float,
    groups: Sequence[Any],
    metrics: Sequence[str],
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    *,
    score: Callable[..., dict[str, NDArray[np.float64]]],
) -> dict[str, tuple[float, float] | None]:
    """Percentile intervals from resampling whole patients (``groups``: one id per image), stratified by class.

    Each resample draws, with replacement, as many patients of each class stratum as it has, and
    takes all their images; resamples therefore differ in image count, and each is scored on its own
    by ``score(labels, probs[1, N], threshold, metrics)`` (``pneumo.evaluation.metrics``' vectorized scorer).
    """
    group_array = np.asarray(groups, dtype=object)
    if group_array.shape != y.shape:
        raise ValueError(f"groups must give one patient per image: {group_array.shape} for {y.shape} images")
    strata = _strata(group_array, y)
    rng = np.random.default_rng(seed)
    values: dict[str, list[float]] = {m: [] for m in metrics}
    for _ in range(n_boot):
        index = np.concatenate([stratum[i] for stratum in strata for i in rng.integers(0, len(stratum), len(stratum))])
        for name, v in score(y[index], p[index][None, :], threshold, metrics).items():
            values[name].append(float(v[0]))
    return percentile_intervals({name: np.asarray(values[name]) for name in metrics}, alpha)


def percentile_intervals(values: dict[str, np.ndarray], alpha: float) -> dict[str, tuple[float, float] | None]:
    """The central ``1 - alpha`` percentile interval of each metric's resampled values; NaNs (undefined
    resamples) left out, ``None`` when none is defined. Shared by the image and the patient bootstrap."""
    out: dict[str, tuple[float, float] | None] = {}
    for name, v in values.items():
        v = v[~np.isnan(v)]
        if v.size == 0:
            out[name] = None
            continue
        low, high = np.percentile(v, [50 * alpha, 100 - 50 * alpha])
        out[name] = (float(low), float(high))
    return out
