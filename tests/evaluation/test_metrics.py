"""Tests for pneumo.evaluation.metrics: every number is checked against scikit-learn or a known answer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy.special import softmax
from sklearn.metrics import (
    average_precision_score,
    brier_score_loss,
    confusion_matrix,
    f1_score,
    precision_score,
    roc_auc_score,
)

from pneumo.core.errors import PneumoError
from pneumo.core.probability import temperature_softmax
from pneumo.evaluation import calibration as C
from pneumo.evaluation import metrics as M
from pneumo.evaluation import plots as P
from pneumo.evaluation import report as R


def _scores(n: int, seed: int = 0, decimals: int | None = 2) -> tuple[np.ndarray, np.ndarray]:
    """Overlapping classes (AUC ~0.88); rounding makes ties, which the rank-based code must handle."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    p = np.clip(rng.normal(0.35 + 0.3 * y, 0.2), 0.0, 1.0)
    return y, (p.round(decimals) if decimals is not None else p)


# ---------------------------------------------------------------- compute_metrics


def test_compute_metrics_matches_sklearn() -> None:
    y, p = _scores(300)
    m = M.compute_metrics(y, p, 0.5)
    pred = (p >= 0.5).astype(int)
    tn, fp, fn, tp = confusion_matrix(y, pred).ravel()
    assert m["confusion_matrix"] == [[tn, fp], [fn, tp]]
    assert (m["n_images"], m["n_positive"], m["n_negative"]) == (300, int(y.sum()), int(300 - y.sum()))
    assert m["accuracy"] == pytest.approx((tp + tn) / 300)
    assert m["sensitivity"] == pytest.approx(tp / (tp + fn))
    assert m["specificity"] == pytest.approx(tn / (tn + fp))
    assert m["npv"] == pytest.approx(tn / (tn + fn))
    assert m["precision"] == pytest.approx(precision_score(y, pred))
    assert m["f1"] == pytest.approx(f1_score(y, pred))
    assert m["roc_auc"] == pytest.approx(roc_auc_score(y, p))
    assert m["pr_auc"] == pytest.approx(average_precision_score(y, p))
    assert m["brier"] == pytest.approx(brier_score_loss(y, p))
    assert m["threshold"] == 0.5


def test_compute_metrics_hand_example() -> None:
    # Threshold is inclusive: 0.5 counts as PNEUMONIA.
    y = np.array([0, 0, 0, 1, 1, 1])
    p = np.array([0.1, 0.5, 0.2, 0.5, 0.9, 0.3])
    m = M.compute_metrics(y, p, 0.5)
    assert m["confusion_matrix"] == [[2, 1], [1, 2]]
    assert m["sensitivity"] == pytest.approx(2 / 3)
    assert m["specificity"] == pytest.approx(2 / 3)
    json.dumps(m, allow_nan=False)
    assert all(isinstance(v, int) for row in m["confusion_matrix"] for v in row)


def test_single_class_gives_none_not_nan() -> None:
    y = np.zeros(20, dtype=int)
    p = np.array([0.1] * 12 + [0.7] * 8)
    m = M.compute_metrics(y, p, 0.5)
    assert m["roc_auc"] is None and m["pr_auc"] is None and m["sensitivity"] is None
    assert m["specificity"] == pytest.approx(12 / 20)
    json.dumps(m, allow_nan=False)
    report = M.evaluation_report(y, p, 0.5, n_boot=50)
    assert report["ci"]["roc_auc"] is None and report["ci"]["sensitivity"] is None
    assert report["ci"]["specificity"] is not None
    json.dumps(report, allow_nan=False)


def test_no_positive_calls_gives_precision_none() -> None:
    m = M.compute_metrics(np.array([0, 1, 0, 1]), np.array([0.1, 0.2, 0.3, 0.4]), 0.9)
    assert m["precision"] is None and m["f1"] == 0.0 and m["sensitivity"] == 0.0


@pytest.mark.parametrize(
    ("y", "p"),
    [([0, 1], [0.2]), ([0, 2], [0.1, 0.9]), ([0, 1], [0.1, 1.2]), ([0, 1], [0.1, np.nan]), ([], [])],
)
def test_bad_input_raises_typed_error(y: list[float], p: list[float]) -> None:
    with pytest.raises(M.MetricsInputError) as info:
        M.compute_metrics(np.array(y), np.array(p), 0.5)
    assert isinstance(info.value, PneumoError) and info.value.code == "invalid_metrics_input"


# ---------------------------------------------------------------- thresholds


def test_youden_on_separable_set_is_perfect() -> None:
    y = np.array([0, 0, 0, 0, 1, 1, 1])
    p = np.array([0.05, 0.2, 0.3, 0.41, 0.6, 0.7, 0.95])
    thr = M.select_threshold(y, p, "youden")
    m = M.compute_metrics(y, p, thr)
    assert m["sensitivity"] == 1.0 and m["specificity"] == 1.0
    assert 0.41 < thr <= 0.6


@pytest.mark.parametrize("target", [0.8, 0.9, 0.95, 1.0])
def test_sensitivity_rule_reaches_target_with_highest_threshold(target: float) -> None:
    y, p = _scores(400, seed=1)
    thr = M.select_threshold(y, p, "sensitivity", target_sensitivity=target)
    assert M.compute_metrics(y, p, thr)["sensitivity"] >= target
    higher = p[p > thr]
    if higher.size:  # the next score up misses the target, so no higher threshold would do
        assert M.compute_metrics(y, p, float(higher.min()))["sensitivity"] < target


def test_f1_rule_maximizes_f1() -> None:
    y, p = _scores(300, seed=2, decimals=1)
    thr = M.select_threshold(y, p, "f1")
    best = max(f1_score(y, p >= t) for t in np.unique(p))
    assert f1_score(y, p >= thr) == pytest.approx(best)


def test_threshold_rules_differ_and_are_finite() -> None:
    y, p = _scores(300, seed=3)
    thresholds = {rule: M.select_threshold(y, p, rule) for rule in M.SINGLE_SET_RULES}
    assert all(np.isfinite(t) for t in thresholds.values())
    assert thresholds["sensitivity"] < thresholds["youden"]  # 95 % sensitivity needs a lower cut here


def test_youden_inf_edge_returns_finite_threshold_calling_nobody() -> None:
    # Scores inverted: the best ROC point is scikit-learn's "inf" threshold (nobody positive).
    y = np.array([0, 0, 1, 1])
    p = np.array([0.9, 0.8, 0.2, 0.1])
    thr = M.select_threshold(y, p, "youden")
    assert np.isfinite(thr) and thr > p.max()
    assert not (p >= thr).any()


def test_threshold_needs_both_classes_and_known_rule() -> None:
    with pytest.raises(M.MetricsInputError, match="both"):
        M.select_threshold(np.ones(5, dtype=int), np.linspace(0, 1, 5))
    with pytest.raises(M.MetricsInputError, match="youden"):
        M.select_threshold(np.array([0, 1]), np.array([0.1, 0.9]), rule="max_accuracy")


# ---------------------------------------------------------------- calibration


def _calibrated_logits(n: int, n_classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Logits of a perfectly calibrated model: labels are drawn from softmax(logits)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 2.0, size=(n, n_classes))
    cdf = softmax(z, axis=1).cumsum(axis=1)
    labels = (rng.random((n, 1)) > cdf).sum(axis=1)
    return z, labels


@pytest.mark.parametrize(("true_t", "n_classes"), [(2.0, 3), (0.5, 2), (1.0, 4)])
def test_fit_temperature_recovers_known_temperature(true_t: float, n_classes: int) -> None:
    z, labels = _calibrated_logits(4000, n_classes, seed=4)
    t = C.fit_temperature(z * true_t, labels)  # an over-(or under-)confident copy of a calibrated model
    assert t == pytest.approx(true_t, rel=0.10)


def test_fit_temperature_accepts_binary_logit_vector() -> None:
    z, labels = _calibrated_logits(4000, 2, seed=5)
    t = C.fit_temperature((z[:, 1] - z[:, 0]) * 3.0, labels)
    assert t == pytest.approx(3.0, rel=0.10)
    assert temperature_softmax(z * 3.0, t).sum(axis=1) == pytest.approx(np.ones(len(z)))


def test_fit_temperature_rejects_bad_labels() -> None:
    with pytest.raises(M.MetricsInputError):
        C.fit_temperature(np.zeros((3, 2)), np.array([0, 1, 2]))


def test_ece_exact_small_example() -> None:
    # Bin [0.1, 0.2): predicted 0.1, observed 0.5 -> 0.4 x half the images; bin [0.9, 1]: 0.9 vs 1 -> 0.1 x half.
    y = np.array([0, 1, 1, 1])
    p = np.array([0.1, 0.1, 0.9, 0.9])
    assert M.expected_calibration_error(y, p, n_bins=10) == pytest.approx(0.25)


def test_ece_small_when_calibrated_large_when_overconfident() -> None:
    rng = np.random.default_rng(6)
    p = rng.random(20000)
    y = (rng.random(20000) < p).astype(int)
    assert M.expected_calibration_error(y, p) < 0.02
    logit = np.log(p / (1 - p))
    overconfident = 1 / (1 + np.exp(-4.0 * logit))
    assert M.expected_calibration_error(y, overconfident) > 0.1


# ---------------------------------------------------------------- bootstrap


def test_vectorized_resample_metrics_equal_sklearn_per_resample() -> None:
    y, p = _scores(200, seed=7, decimals=1)  # coarse rounding: many ties
    rng = np.random.default_rng(0)
    probs = p[rng.integers(0, y.size, size=(6, y.size))]
    labels = y  # rows share the labels, as in stratified resamples
    rows = M._metric_rows(labels, probs, 0.5, M.BOOTSTRAP_METRICS)
    for b in range(len(probs)):
        m = M.compute_metrics(labels, probs[b], 0.5)
        assert rows["roc_auc"][b] == pytest.approx(roc_auc_score(labels, probs[b]), abs=1e-12)
        assert rows["pr_auc"][b] == pytest.approx(average_precision_score(labels, probs[b]), abs=1e-12)
        for name in M.BOOTSTRAP_METRICS:
            assert rows[name][b] == pytest.approx(m[name], abs=1e-12), name


def test_bootstrap_ci_contains_point_estimate_and_narrows_with_data() -> None:
    names = ("accuracy", "sensitivity", "specificity", "roc_auc", "f1", "pr_auc")
    widths = []
    for n in (200, 3000):
        y, p = _scores(n, seed=8, decimals=None)
        point = M.compute_metrics(y, p, 0.5)
        ci = M.bootstrap_ci(y, p, 0.5, metrics=names, n_boot=300)
        for name in names:
            lo, hi = ci[name]  # type: ignore[misc]
            assert lo < point[name] < hi, (n, name)
        widths.append(ci["roc_auc"][1] - ci["roc_auc"][0])  # type: ignore[index]
    assert widths[1] < widths[0] / 2  # ~sqrt(15) narrower


def test_bootstrap_is_seeded_and_validates() -> None:
    y, p = _scores(100)
    assert M.bootstrap_ci(y, p, 0.5, n_boot=50, seed=1) == M.bootstrap_ci(y, p, 0.5, n_boot=50, seed=1)
    assert M.bootstrap_ci(y, p, 0.5, n_boot=50, seed=1) != M.bootstrap_ci(y, p, 0.5, n_boot=50, seed=2)
    with pytest.raises(M.MetricsInputError, match="cannot bootstrap"):
        M.bootstrap_ci(y, p, 0.5, metrics=("auc",))


def test_bootstrap_chunking_gives_same_shape_of_result(monkeypatch: pytest.MonkeyPatch) -> None:
    y, p = _scores(100)
    monkeypatch.setattr(M, "_CHUNK_CELLS", 700)  # 7 resamples per chunk, 15 chunks
    ci = M.bootstrap_ci(y, p, 0.5, n_boot=100)
    point = M.compute_metrics(y, p, 0.5)
    assert all(lo <= point[k] <= hi for k, (lo, hi) in ci.items())  # type: ignore[misc]


def test_evaluation_report_json_and_keys() -> None:
    y, p = _scores(200)
    report = M.evaluation_report(y, p, 0.5, n_boot=100)
    assert set(report["ci"]) == set(M.REPORT_CI_METRICS)
    assert report["ci_method"].startswith("percentile bootstrap, n=100")
    assert report["ci_level"] == pytest.approx(0.95)
    assert json.loads(json.dumps(report, allow_nan=False))["ci"]["roc_auc"] == report["ci"]["roc_auc"]


# ---------------------------------------------------------------- plots and Markdown


def test_save_plots_writes_four_pngs(tmp_path: Path) -> None:
    y, p = _scores(150)
    paths = P.save_plots(y, p, 0.5, tmp_path / "plots", prefix="test_")
    assert set(paths) == {"roc", "pr", "confusion_matrix", "reliability"}
    for name, path in paths.items():
        assert path == tmp_path / "plots" / f"test_{name}.png"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def test_save_plots_single_class_does_not_crash(tmp_path: Path) -> None:
    paths = P.save_plots(np.ones(10, dtype=int), np.linspace(0.3, 1.0, 10), 0.5, tmp_path)
    assert all(path.stat().st_size > 0 for path in paths.values())


def test_markdown_report_contains_numbers_and_links() -> None:
    y, p = _scores(200)
    report = M.evaluation_report(y, p, 0.5, n_boot=100)
    report["plots"] = {"roc": Path("/somewhere/val_roc.png"), "reliability": "out/val_reliability.png"}
    text = R.markdown_report(report, title="Test set")
    assert text.startswith("# Test set")
    lo, hi = report["ci"]["roc_auc"]
    assert f"| ROC AUC | {report['roc_auc']:.3f} | {lo:.3f} - {hi:.3f} |" in text
    assert f"{report['sensitivity']:.3f}" in text and f"{report['threshold']:.4f}" in text
    (tn, fp), (fn, tp) = report["confusion_matrix"]
    assert f"| NORMAL | {tn} | {fp} |" in text and f"| PNEUMONIA | {fn} | {tp} |" in text
    assert "(val_roc.png)" in text and "(val_reliability.png)" in text and "/somewhere" not in text


def test_format_ci() -> None:
    assert R.format_ci(0.95213, (0.9311, 0.97)) == "0.952 (0.931-0.970)"
    assert R.format_ci(0.5, None) == "0.500"
    assert R.format_ci(None, (0.1, 0.2)) == "n/a"
    assert R.format_ci(0.5, [0.4, 0.6], digits=1) == "0.5 (0.4-0.6)"
