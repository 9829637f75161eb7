"""The seed-averaged comparison of recipes (issue 19; the round-6 rule of MODEL_CARD.md), and the seed ensemble.

Reads the run folders written by ``pneumo train --out RUN`` (their ``run.json`` and
``validation/robustness.json``), groups them by recipe, and writes one row per recipe: mean and SD
over seeds of the validation ROC AUC, the mean balanced accuracy over the shifts (17 shifts, and the
15 of round 5 for comparison), the worst-case specificity, and the framing consistency (the largest
change of the healthy positive rate under pads and crops; the mean absolute change in probability).
With ``--ensemble``, the members' probabilities are averaged per film and condition and scored the
same way, at the threshold the robust rule chooses on the averaged validation probabilities (what a
shipped ensemble would do). Recipes without their bundles (round 5's seeds 1 and 2) can be given as
``--recorded NAME=BA15,BA15,...`` and only fill the 15-shift column.

    python benchmarks/seed_study.py --recipe framed=runs/framed-s0,runs/framed-s1,runs/framed-s2 \\
        --recipe baseline=runs/baseline --ensemble framed --json benchmarks/results/seed_study.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from pneumo.evaluation.robustness import framing_consistency, robust_threshold, robustness_report

#: The shifts of round 5, the earlier rounds' primary score's denominator.
ROUND5_SHIFTS = (
    "crop_top_bottom_12", "crop_top_bottom_20", "crop_sides_10", "crop_left_right_10", "pad_12", "pad_top_bottom_15",
    "rotate_10", "text", "tight_with_text", "blur", "low_resolution", "gamma", "contrast", "noise", "jpeg_q15",
)  # fmt: skip


def load_run(run: Path) -> dict[str, Any]:
    """A run's labels, probabilities per condition, threshold and recorded figures."""
    report = run / "validation" / "robustness.json" if run.is_dir() else run
    full = json.loads(report.read_text())
    record = json.loads((run / "run.json").read_text()) if (run / "run.json").is_file() else {}
    return {
        "name": run.name,
        "labels": np.asarray(full["labels"]),
        "probs": {k: np.asarray(v, dtype=np.float64) for k, v in full["probabilities"].items()},
        "threshold": float(full["threshold"]),
        "val_auc": record.get("validation", {}).get("roc_auc", full["shifts"]["clean"]["roc_auc"]),
        "seconds": record.get("training", {}).get("recipe_seconds"),
    }


def scores(labels: np.ndarray, probs: dict[str, np.ndarray], threshold: float) -> dict[str, Any]:
    """The figures of the rule for one model (or ensemble) at ``threshold``."""
    report = robustness_report(labels, probs, threshold, n_boot=0)
    shifted = {k: v for k, v in report["shifts"].items() if k != "clean"}
    ba = {k: v["balanced_accuracy"] for k, v in shifted.items()}
    framing = framing_consistency(labels, probs, threshold)["summary"]
    return {
        "clean_auc": report["shifts"]["clean"]["roc_auc"],
        "clean_sensitivity": report["shifts"]["clean"]["sensitivity"],
        "clean_specificity": report["shifts"]["clean"]["specificity"],
        "mean_ba": float(np.mean(list(ba.values()))),
        "mean_ba_15": float(np.mean([ba[k] for k in ROUND5_SHIFTS if k in ba])),
        "worst_specificity": min(v["specificity"] for v in shifted.values()),
        "worst_specificity_shift": min(shifted, key=lambda k: shifted[k]["specificity"]),
        "framing_F": abs(framing.get("worst_normal_rate_change", float("nan"))),
        "framing_F_shift": framing.get("worst_normal_shift"),
        "framing_mean_abs_dp": framing.get("mean_abs_dp"),
        "ece_pooled": report.get("ece_pooled"),
        "threshold": threshold,
    }


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and SD over seeds of every numeric figure."""
    out: dict[str, Any] = {"n_seeds": len(rows)}
    for key in rows[0]:
        values = [r[key] for r in rows if isinstance(r.get(key), int | float)]
        if len(values) == len(rows):
            out[key] = {"mean": float(np.mean(values)), "sd": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0}
    return out


def ensemble(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The members' mean probability per film and condition, thresholded by the robust rule on it."""
    labels = runs[0]["labels"]
    if any(not np.array_equal(r["labels"], labels) for r in runs):
        raise SystemExit("the runs were not validated on the same films: an ensemble needs the same split")
    probs = {k: np.mean([r["probs"][k] for r in runs], axis=0) for k in runs[0]["probs"]}
    chosen = robust_threshold(labels, probs)
    return {**scores(labels, probs, float(chosen["threshold"])), "rule": chosen["description"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", action="append", default=[], help="NAME=RUN[,RUN...] (run folders or JSON files)")
    parser.add_argument("--recorded", action="append", default=[], help="NAME=BA15,BA15,... recorded 15-shift means")
    parser.add_argument("--ensemble", action="append", default=[], help="recipe names to score as seed ensembles")
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args()
    result: dict[str, Any] = {"recipes": {}, "ensembles": {}}
    loaded: dict[str, list[dict[str, Any]]] = {}
    for spec in args.recipe:
        name, _, paths = spec.partition("=")
        loaded[name] = [load_run(Path(p)) for p in paths.split(",")]
        per_seed = [{**scores(r["labels"], r["probs"], r["threshold"]), "val_auc": r["val_auc"],
                     "recipe_seconds": r["seconds"]} for r in loaded[name]]  # fmt: skip
        result["recipes"][name] = {"seeds": per_seed, "summary": summarize(per_seed)}
    for spec in args.recorded:
        name, _, values = spec.partition("=")
        bas = [float(v) for v in values.split(",")]
        result["recipes"].setdefault(name, {})["recorded_mean_ba_15"] = {
            "values": bas,
            "mean": float(np.mean(bas)),
            "sd": float(np.std(bas, ddof=1)),
        }
    for name in args.ensemble:
        result["ensembles"][name] = ensemble(loaded[name])
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    for name, entry in result["recipes"].items():
        s = entry.get("summary", {})
        cells = [f"{k} {s[k]['mean']:.4f} +- {s[k]['sd']:.4f}" for k in ("val_auc", "mean_ba", "mean_ba_15",
                 "worst_specificity", "framing_F", "framing_mean_abs_dp") if k in s]  # fmt: skip
        print(name, "|", " | ".join(cells))
    for name, e in result["ensembles"].items():
        print(
            f"ensemble {name}: mean BA {e['mean_ba']:.4f} (15: {e['mean_ba_15']:.4f}), worst spec "
            f"{e['worst_specificity']:.3f}, F {e['framing_F']:.3f}, AUC {e['clean_auc']:.4f}"
        )


if __name__ == "__main__":
    main()
