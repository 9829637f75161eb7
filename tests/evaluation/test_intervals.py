"""Intervals that say what the data can claim: patient-level bootstrap, exact intervals on few images."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import binomtest

from pneumo.evaluation import intervals as I
from pneumo.evaluation import metrics as M


def test_exact_interval_is_clopper_pearson() -> None:
    # k = n has a closed form: the lower bound solves p**n = alpha / 2.
    low, high = I.exact_interval(14, 14)  # type: ignore[misc]
    assert low == pytest.approx(0.025 ** (1 / 14)) and high == 1.0
    low, high = I.exact_interval(0, 5)  # type: ignore[misc]
    assert low == 0.0 and high == pytest.approx(1 - 0.025 ** (1 / 5))
    expected = binomtest(7, 20).proportion_ci(0.95, method="exact")
    assert I.exact_interval(7, 20) == pytest.approx((expected.low, expected.high))
    assert I.exact_interval(0, 0) is None


def test_fourteen_right_answers_do_not_claim_certainty() -> None:
    """The newcomer's case: 14 films all called right printed "95% CI 1.000-1.000"."""
    y = np.array([0] * 7 + [1] * 7)
    p = np.where(y == 1, 0.9, 0.1)
    report = M.evaluation_report(y, p, 0.5, n_boot=200)
    low, high = report["ci"]["accuracy"]
    assert low == pytest.approx(0.025 ** (1 / 14)) and high == 1.0
    low, high = report["ci"]["sensitivity"]  # 7 of 7
    assert low == pytest.approx(0.025 ** (1 / 7)) and high == 1.0
    assert report["ci"]["roc_auc"] is None  # every resample gives 1.0: no interval, and a note says why
    assert "roc_auc" in report["ci_notes"] and "Clopper-Pearson" in report["ci_notes"]["accuracy"]


def test_intervals_that_move_keep_the_bootstrap() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    p = np.clip(y * 0.3 + rng.random(300) * 0.7, 0, 1)
    report = M.evaluation_report(y, p, 0.5, n_boot=200)
    plain = M.bootstrap_ci(y, p, 0.5, M.REPORT_CI_METRICS, 200)
    assert report["ci"]["accuracy"] == list(plain["accuracy"])  # type: ignore[arg-type]
    assert report["ci_notes"] == {}


def _repeated_patients(n_patients: int = 40, films: int = 5, seed: int = 0) -> tuple[np.ndarray, ...]:
    """Each patient has ``films`` copies of one answer: the images carry the information of one film."""
    rng = np.random.default_rng(seed)
    y_patient = np.array([0, 1] * (n_patients // 2))
    p_patient = np.clip(0.5 + (y_patient - 0.5) * 0.4 + rng.normal(0, 0.25, n_patients), 0, 1)
    groups = np.repeat([f"person{i}" for i in range(n_patients)], films)
    return np.repeat(y_patient, films), np.repeat(p_patient, films), groups


def test_cluster_bootstrap_resamples_patients_not_films() -> None:
    y, p, groups = _repeated_patients()
    by_image = M.evaluation_report(y, p, 0.5, n_boot=400)
    by_patient = M.evaluation_report(y, p, 0.5, n_boot=400, groups=list(groups))
    # Five copies of each film look like five children to an image bootstrap: it is about sqrt(5) too narrow.
    for metric in ("accuracy", "roc_auc"):
        width_image = np.diff(by_image["ci"][metric])[0]
        width_patient = np.diff(by_patient["ci"][metric])[0]
        assert width_patient > 1.6 * width_image, (metric, width_patient, width_image)
    assert "40 patients" in by_patient["ci_method"] and "cluster" in by_patient["ci_method"]
    # The point estimates do not depend on how the intervals are drawn.
    assert by_patient["accuracy"] == by_image["accuracy"]


def test_cluster_bootstrap_of_one_film_per_patient_matches_the_image_bootstrap() -> None:
    y, p, _ = _repeated_patients(n_patients=200, films=1, seed=1)
    groups = [f"p{i}" for i in range(len(y))]
    by_patient = M.evaluation_report(y, p, 0.5, n_boot=1000, groups=groups)["ci"]["accuracy"]
    by_image = M.evaluation_report(y, p, 0.5, n_boot=1000)["ci"]["accuracy"]
    assert by_patient == pytest.approx(by_image, abs=0.02)


def test_cluster_bootstrap_needs_one_patient_per_image() -> None:
    y, p, groups = _repeated_patients()
    with pytest.raises(ValueError, match="one patient per image"):
        M.evaluation_report(y, p, 0.5, n_boot=10, groups=list(groups[:-1]))
