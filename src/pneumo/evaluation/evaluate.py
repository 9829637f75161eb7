"""``pneumo evaluate``: a labelled folder through the one inference path, into an honest report.

The images go through :class:`pneumo.inference.predictor.Predictor` exactly as a clinician's upload would
(decode, preprocess, calibrated probability, the bundle's threshold), so the numbers describe the
shipped behaviour. The out-of-distribution gate is not applied here: evaluation measures the
classifier on every X-ray of the labelled folder.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from pneumo.core.dataset import discover
from pneumo.core.errors import DataError, PneumoError
from pneumo.evaluation.metrics import evaluation_report
from pneumo.evaluation.plots import save_plots
from pneumo.evaluation.report import markdown_report

log = logging.getLogger(__name__)


def evaluate_folder(
    data: str | Path,
    model: str | Path | None = None,
    *,
    json_out: Path | None = None,
    out_dir: Path | None = None,
    n_boot: int = 1000,
    batch_size: int = 32,
) -> dict[str, Any]:
    """Evaluate a bundle (default: the shipped one) on ``data`` and write JSON, Markdown and plots.

    Args:
        data: a folder holding ``NORMAL/`` and ``PNEUMONIA/``, or a Kaggle root (its ``test/`` is used).
        model: bundle folder; ``None`` for the default bundle.
        json_out: where to write the metrics JSON (also written as ``metrics.json`` in ``out_dir``).
        out_dir: folder for ``report.md`` and the PNGs; defaults to ``<json_out stem>_report`` or
            ``evaluation/``.
        n_boot: bootstrap resamples for the confidence intervals.
    """
    from pneumo.inference.predictor import Predictor

    root = Path(data)
    split = "test" if (root / "test").is_dir() else None
    samples = discover(root, split, "binary")
    predictor = Predictor(model, check_ood=False)
    results = predictor.predict_many([s.path for s in samples], batch_size=batch_size)
    failures = [
        {"file": str(s.path), "error": r.to_dict()} for s, r in zip(samples, results) if isinstance(r, PneumoError)
    ]
    ok = [(s, r) for s, r in zip(samples, results) if not isinstance(r, PneumoError)]
    if not ok:
        raise DataError(f"None of the {len(samples)} images in {root} could be read.")
    y_true = np.array([s.label for s, _ in ok])
    prob = np.array([r.probability for _, r in ok])
    report = evaluation_report(y_true, prob, predictor.threshold, n_boot=n_boot)
    report["threshold_rule"] = predictor.meta.threshold_rule
    report["model"] = {"name": predictor.meta.name, "version": predictor.meta.version, "arch": predictor.meta.arch}
    report["data"] = str(root / split) if split else str(root)
    report["n_failed"] = len(failures)
    report["failures"] = failures

    out = out_dir or (json_out.parent / f"{json_out.stem}_report" if json_out else Path("evaluation"))
    plots = save_plots(y_true, prob, predictor.threshold, out)
    report["plots"] = {name: path.name for name, path in plots.items()}
    (out / "report.md").write_text(markdown_report(report, f"Evaluation of {predictor.meta.name} on {report['data']}"))
    text = json.dumps(report, indent=2) + "\n"
    (out / "metrics.json").write_text(text)
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(text)
    return report
