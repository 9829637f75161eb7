"""Apply the threshold rule of MODEL_CARD.md to a finished run and rewrite its bundle's threshold.

Runs trained with ``threshold_rule: robust`` already have it; this is for runs trained with another rule.

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
from pneumo.evaluation.robustness import (
    ROBUST_RULE_CANDIDATES,
    pooled_threshold_table,
    robust_threshold,
    robustness_report,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a run folder written by `pneumo train --out`")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/threshold_rule.json"))
    args = parser.parse_args()

    full = json.loads((args.run / "validation" / "robustness.json").read_text())
    y = np.asarray(full["labels"])
    probs = {k: np.asarray(v, dtype=np.float64) for k, v in full["probabilities"].items()}
    table = pooled_threshold_table(y, probs, [("youden", 0.95), ("sensitivity", 0.95)])
    candidates = [r for r in table if (r["rule"], r["chosen_on"]) in ROBUST_RULE_CANDIDATES]
    chosen = robust_threshold(y, probs)
    threshold = float(chosen["threshold"])

    bundle = args.run / "bundle"
    meta = read_meta(bundle)
    split = meta.training.split or "the validation split"
    meta.threshold = threshold
    meta.threshold_rule = (
        f"{chosen['description']} ({split}), after temperature scaling; chosen among "
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
