"""Apply the threshold rule of MODEL_CARD.md to a finished run and rewrite its bundle's threshold.

The rule (stated before the issue-9 runs): among Youden's J on the clean validation, Youden's J on
the pooled robustness validation (clean + every shift) and "sensitivity >= 0.95" on the pooled
robustness validation, keep the threshold with the highest mean balanced accuracy over the shifts
among those whose clean validation sensitivity is >= 0.95. Everything is read from what the run
wrote (``validation/robustness.json``: labels and every probability), so nothing is re-run;
the bundle's threshold, threshold rule, validation metrics and robustness metrics are rewritten
at the chosen threshold.

Usage::

    python benchmarks/apply_threshold_rule.py runs/NAME --out benchmarks/results/threshold_rule.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from pneumo.core.bundle import read_meta, write_meta
from pneumo.evaluation.metrics import evaluation_report
from pneumo.evaluation.robustness import pooled_threshold_table, robustness_report

CANDIDATES = {
    ("youden", "clean"): "Youden's J on the clean validation",
    ("youden", "pooled"): "Youden's J on the pooled robustness validation (clean + 15 shifts)",
    ("sensitivity>=0.95", "pooled"): "sensitivity >= 0.95 on the pooled robustness validation (clean + 15 shifts)",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a run folder written by `pneumo train --out`")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/threshold_rule.json"))
    args = parser.parse_args()

    full = json.loads((args.run / "validation" / "robustness.json").read_text())
    y = np.asarray(full["labels"])
    probs = {k: np.asarray(v, dtype=np.float64) for k, v in full["probabilities"].items()}
    rows = pooled_threshold_table(y, probs, [("youden", 0.95), ("sensitivity", 0.95)])
    candidates = [r for r in rows if (r["rule"], r["chosen_on"]) in CANDIDATES]
    eligible = [r for r in candidates if r["clean_sensitivity"] >= 0.95]
    chosen = max(eligible, key=lambda r: r["mean_balanced_accuracy"])
    threshold = float(chosen["threshold"])

    bundle = args.run / "bundle"
    meta = read_meta(bundle)
    split = meta.training.get("split", "the validation split")
    meta.threshold = threshold
    meta.threshold_rule = (
        f"{CANDIDATES[(chosen['rule'], chosen['chosen_on'])]} ({split}), after temperature scaling; chosen among "
        "Youden (clean), Youden (pooled) and sensitivity >= 0.95 (pooled) for the best mean balanced accuracy "
        "over the shifts with clean sensitivity >= 0.95 (MODEL_CARD.md)"
    )
    validation = evaluation_report(y, probs["clean"], threshold)
    robust = robustness_report(y, probs, threshold)
    meta.metrics["validation"] = validation
    meta.metrics["robustness"] = {"summary": robust["summary"], "shifts": robust["shifts"]}
    write_meta(bundle, meta)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"candidates": candidates, "chosen": chosen}, indent=2) + "\n")
    print(json.dumps(chosen, indent=2))


if __name__ == "__main__":
    main()
