"""``pneumo evaluate``: a labelled folder through the one inference path, into an honest report.

The images go through :class:`pneumo.inference.predictor.Predictor` exactly as a clinician's upload would
(decode, preprocess, calibrated probability, the bundle's threshold), so the numbers describe the
shipped behaviour. The out-of-distribution gate is not applied here: evaluation measures the
classifier on every X-ray of the labelled folder.

What the figures can claim is part of the report: the intervals resample patients, not films
(a child's films are not independent evidence; patients come from the file names,
:func:`pneumo.core.dataset.patient_id`), and images the bundle trained or validated on are
counted (:mod:`pneumo.evaluation.overlap`) and reported, since a model scored on its own training
films looks better than it is.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from pneumo.core.dataset import SPLITS, discover
from pneumo.core.errors import DataError, PneumoError
from pneumo.evaluation.metrics import evaluation_report
from pneumo.evaluation.overlap import hash_files, overlap
from pneumo.evaluation.plots import save_plots
from pneumo.evaluation.report import markdown_report

log = logging.getLogger(__name__)


def choose_split(root: Path, split: str | None) -> str | None:
    """The split to read: ``split`` as given, ``test`` in a Kaggle root that has one, else ``None`` (class folders)."""
    if split is not None:
        return split
    if (root / "test").is_dir():
        return "test"
    present = [s for s in SPLITS if (root / s).is_dir()]
    if present and not (root / "NORMAL").is_dir():
        raise DataError(
            f"{root} is a Kaggle root without test/ (it has {', '.join(s + '/' for s in present)}); "
            f"choose the split to evaluate: --split {present[0]} (in Python: split={present[0]!r}). "
            "A bundle trained on this root has seen its train/ films: evaluate on data it never saw.",
            code="bad_layout",
        )
    return None


def evaluate_folder(
    data: str | Path,
    model: str | Path | None = None,
    *,
    split: str | None = None,
    json_out: Path | None = None,
    out_dir: Path | None = None,
    n_boot: int = 1000,
    batch_size: int = 32,
    check_overlap: bool = True,
    warn_overlap: bool = True,
) -> dict[str, Any]:
    """Evaluate a bundle (default: the shipped one) on ``data`` and write JSON, Markdown and plots.

    Args:
        data: a folder holding ``NORMAL/`` and ``PNEUMONIA/``, or a Kaggle root.
        model: bundle folder; ``None`` for the default bundle.
        split: the Kaggle split to read (``train``, ``val``, ``test``); default ``test`` where there is one.
        json_out: where to write the metrics JSON (also written as ``metrics.json`` in ``out_dir``).
        out_dir: folder for ``report.md`` and the PNGs; defaults to ``<json_out stem>_report`` or
            ``evaluation/``.
        n_boot: bootstrap resamples (of patients) for the confidence intervals.
        check_overlap: hash the images and count those the bundle trained or validated on
            (``report["overlap"]``).
        warn_overlap: log a warning when there are any (the command line prints its own, after the figures).
    """
    from pneumo.inference.predictor import Predictor

    root = Path(data)
    split = choose_split(root, split)
    samples = discover(root, split, "binary")
    predictor = Predictor(model, check_ood=False)
    results = predictor.predict_with_progress([s.path for s in samples], batch_size, "evaluating")
    failures = [
        {"file": str(s.path), "error": r.to_dict()} for s, r in zip(samples, results) if isinstance(r, PneumoError)
    ]
    ok = [(s, r) for s, r in zip(samples, results) if not isinstance(r, PneumoError)]
    if not ok:
        raise DataError(f"None of the {len(samples)} images in {root} could be read.")
    y_true = np.array([s.label for s, _ in ok])
    prob = np.array([r.probability for _, r in ok])
    patients = [s.patient for s, _ in ok]
    report = evaluation_report(y_true, prob, predictor.threshold, n_boot=n_boot, groups=patients)
    report["n_patients"] = len(set(patients))
    report["threshold_rule"] = predictor.meta.threshold_rule
    report["model"] = {"name": predictor.meta.name, "version": predictor.meta.version, "arch": predictor.meta.arch}
    report["data"] = str(root / split) if split else str(root)
    report["n_failed"] = len(failures)
    report["failures"] = failures
    if check_overlap:
        report["overlap"] = seen_by_bundle(predictor.meta, [s for s, _ in ok], warn=warn_overlap)

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


def seen_by_bundle(meta: Any, samples: list[Any], *, warn: bool = True) -> dict[str, Any]:
    """How many ``samples`` the bundle saw in training or validation (``training.seen_images``), with examples.

    ``{"checked": False, ...}`` for a bundle that records no hashes (trained before they existed).
    """
    record: Any = getattr(meta.training, "seen_images", None)  # a kept extra field, or a typed one in later bundles
    record = record.model_dump() if hasattr(record, "model_dump") else record
    if not record:
        return {"checked": False, "reason": "the bundle records no hashes of the images it saw"}
    found = overlap(hash_files([s.path for s in samples], "checking overlap"), record)
    if found is None:
        return {"checked": False, "reason": f"unknown hash method {record.get('method')!r}"}
    indices = found.pop("indices")
    found.update(checked=True, examples=[str(samples[i].path) for i in indices[:5]])
    if found["any"] and warn:
        log.warning(
            "%d of %d images were seen by the bundle (%d in training, %d in validation): "
            "these figures overstate how it does on new children.",
            found["any"], found["of"], found.get("train", 0), found.get("val", 0),
        )  # fmt: skip
    return found
