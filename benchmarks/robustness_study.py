"""The issue-9 study: runs side by side on both validations, threshold rules, ensembles, and the selection.

Reads the robustness reports that ``pneumo train`` writes (``RUN/validation/robustness.json``) or
that ``pneumo robustness --json`` writes for any bundle, all on the same patient-level validation
split (same seed and fraction), and writes one JSON with:

- ``runs``: per run, the clean validation and the robustness summary (mean and worst over shifts);
- ``thresholds``: per run, Youden on clean images vs Youden / sensitivity >= 0.95 on all shifts pooled;
- ``ensembles``: the mean probability of several runs, scored the same way (no training needed);
- ``selection``: the winner under the rule in MODEL_CARD.md.

Usage::

    python benchmarks/robustness_study.py NAME=REPORT.json [NAME=REPORT.json ...] \\
        --ensemble a+b --ensemble a+b+c --out benchmarks/results/robustness_study.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from pneumo.evaluation.metrics import select_threshold
from pneumo.evaluation.robustness import pooled_threshold_table, robustness_report

RULES = [("youden", 0.95), ("sensitivity", 0.95)]


def _load(path: Path) -> tuple[np.ndarray, dict[str, np.ndarray], float]:
    data = json.loads(path.read_text())
    return (
        np.asarray(data["labels"]),
        {k: np.asarray(v, dtype=np.float64) for k, v in data["probabilities"].items()},
        float(data["threshold"]),
    )


def _summary(report: dict[str, Any]) -> dict[str, Any]:
    clean = report["shifts"]["clean"]
    out = {k: clean.get(k) for k in ("roc_auc", "accuracy", "sensitivity", "specificity")}
    out["ci"] = {k: clean["ci"].get(k) for k in ("roc_auc", "accuracy", "sensitivity", "specificity")}
    out["threshold"] = report["threshold"]
    for metric, stat in report["summary"].items():
        out[f"robust_{metric}_mean"] = stat["mean"]
        out[f"robust_{metric}_worst"] = stat["worst"]
        out[f"robust_{metric}_worst_shift"] = stat["worst_shift"]
    return out


def _select(runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The rule stated in MODEL_CARD.md before the runs: eligibility, primary score, tie-breaks."""
    eligible = {k: v for k, v in runs.items() if (v["roc_auc"] or 0) >= 0.99}
    if not eligible:
        return {"winner": None, "why": "no run reaches validation ROC AUC 0.99"}
    best = max(v["robust_balanced_accuracy_mean"] for v in eligible.values())
    close = {k: v for k, v in eligible.items() if v["robust_balanced_accuracy_mean"] >= best - 0.005}
    winner = max(close, key=lambda k: close[k]["robust_specificity_worst"])
    return {
        "winner": winner,
        "eligible": sorted(eligible),
        "within_0.005_of_best": sorted(close),
        "best_robust_balanced_accuracy_mean": best,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("reports", nargs="+", help="NAME=path/to/robustness.json")
    parser.add_argument("--ensemble", action="append", default=[], help="names joined by + (mean probability)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/robustness_study.json"))
    parser.add_argument("--n-boot", type=int, default=500)
    args = parser.parse_args()

    loaded = {}
    for item in args.reports:
        name, _, path = item.partition("=")
        loaded[name] = _load(Path(path))
    labels = next(iter(loaded.values()))[0]
    if any(not np.array_equal(y, labels) for y, _, _ in loaded.values()):
        raise SystemExit("the reports are not on the same validation images (labels differ)")

    runs, thresholds = {}, {}
    for name, (y, probs, threshold) in loaded.items():
        runs[name] = _summary(robustness_report(y, probs, threshold, n_boot=args.n_boot))
        thresholds[name] = pooled_threshold_table(y, probs, RULES)
    ensembles = {}
    for spec in args.ensemble:
        members = spec.split("+")
        probs = {s: np.mean([loaded[m][1][s] for m in members], axis=0) for s in loaded[members[0]][1]}
        threshold = select_threshold(labels, probs["clean"], "youden")
        ensembles[spec] = _summary(robustness_report(labels, probs, threshold, n_boot=args.n_boot))
        thresholds[spec] = pooled_threshold_table(labels, probs, RULES)
    result = {"runs": runs, "ensembles": ensembles, "thresholds": thresholds, "selection": _select(runs)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")

    print("| run | val ROC AUC | val spec. | robust BA mean | robust spec. worst | robust AUC worst |")
    print("|---|---|---|---|---|---|")
    for name, r in {**runs, **ensembles}.items():
        print(
            f"| {name} | {r['roc_auc']:.4f} | {r['specificity']:.3f} | {r['robust_balanced_accuracy_mean']:.3f} | "
            f"{r['robust_specificity_worst']:.3f} ({r['robust_specificity_worst_shift']}) | "
            f"{r['robust_roc_auc_worst']:.3f} ({r['robust_roc_auc_worst_shift']}) |"
        )
    print(json.dumps(result["selection"], indent=2))


if __name__ == "__main__":
    main()
