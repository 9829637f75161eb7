"""The Markdown evaluation report and the "value (CI)" format used by reports and run comparisons."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

_HEADLINE = (
    ("accuracy", "Accuracy"),
    ("sensitivity", "Sensitivity (recall)"),
    ("specificity", "Specificity"),
    ("precision", "Precision (PPV)"),
    ("npv", "NPV"),
    ("f1", "F1"),
    ("roc_auc", "ROC AUC"),
    ("pr_auc", "PR AUC (average precision)"),
    ("ece", "ECE (15 bins)"),
    ("brier", "Brier score"),
)


def _fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def format_ci(value: float | None, ci: Sequence[float] | None, digits: int = 3) -> str:
    """``"0.952 (0.931-0.970)"``; ``"n/a"`` for an undefined value, the bare value when there is no CI."""
    if value is None:
        return "n/a"
    if ci is None:
        return _fmt(value, digits)
    return f"{value:.{digits}f} ({ci[0]:.{digits}f}-{ci[1]:.{digits}f})"


def markdown_report(report: Mapping[str, Any], title: str = "Evaluation") -> str:
    """A Markdown page for humans from :func:`evaluation_report`'s dict (optionally with ``"plots"``:
    name -> path, linked by file name so the page works next to its PNGs)."""
    ci: Mapping[str, Any] = report.get("ci") or {}
    level = float(report.get("ci_level", 0.95))
    lines = [f"# {title}", ""]
    seen = report.get("overlap") or {}
    if seen.get("any"):
        lines += [
            f"> **Warning: {seen['any']} of {seen['of']} images were seen by this model** ({seen.get('train', 0)} in "
            f"training, {seen.get('val', 0)} in validation). These figures overstate how it does on new children.",
            "",
        ]
    patients = f" from {report['n_patients']} patients" if report.get("n_patients") else ""
    lines.append(
        f"{report['n_images']} images{patients} ({report['n_positive']} PNEUMONIA, {report['n_negative']} NORMAL). "
        f"An image is called PNEUMONIA when P(pneumonia) >= {report['threshold']:.4f}"
        + (f" (chosen by: {report['threshold_rule']})." if report.get("threshold_rule") else ".")
    )
    lines += ["", f"| metric | value | {level:.0%} CI |", "| --- | ---: | :---: |"]
    for key, label in _HEADLINE:
        if key in report:
            bounds = ci.get(key)
            interval = "" if bounds is None else f"{bounds[0]:.3f} - {bounds[1]:.3f}"
            lines.append(f"| {label} | {_fmt(report[key])} | {interval} |")
    if report.get("ci_method") and report["ci_method"] != "none":
        lines += ["", f"Confidence intervals: {report['ci_method']}."]
        notes: Mapping[str, str] = report.get("ci_notes") or {}
        lines += [f"- {name}: {note}." for name, note in notes.items()]
    (tn, fp), (fn, tp) = report["confusion_matrix"]
    lines += ["", "## Confusion matrix", "", "| true \\ predicted | NORMAL | PNEUMONIA |", "| --- | ---: | ---: |"]
    lines += [f"| NORMAL | {tn} | {fp} |", f"| PNEUMONIA | {fn} | {tp} |"]
    plots: Mapping[str, Any] = report.get("plots") or {}
    if plots:
        lines += ["", "## Plots", ""]
        lines += [f"![{name.replace('_', ' ')}]({Path(path).name})" for name, path in plots.items()]
    return "\n".join(lines) + "\n"
