"""``pneumo evaluate``, ``pneumo robustness`` and ``pneumo compare``: how good a model is, and on what."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from pneumo.cli.common import ModelOption, fail, require_train_extra


def evaluate(
    data: Annotated[Path, typer.Argument(help="Folder with NORMAL/ and PNEUMONIA/, or a Kaggle root (see --split).")],
    model: ModelOption = None,
    split: Annotated[
        str | None, typer.Option(help="Split of a Kaggle root: train, val or test (default: test where there is one).")
    ] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the metrics JSON here.")] = None,
    out: Annotated[Path | None, typer.Option(help="Folder for report.md and plots (default: next to --json).")] = None,
    n_boot: Annotated[int, typer.Option(help="Bootstrap resamples (of patients) for the 95% CIs.")] = 1000,
) -> None:
    """Metrics with patient-level 95% CIs, a Markdown report and ROC/PR/confusion/reliability plots.

    Warns when the images include films the model trained or validated on.
    """
    from pneumo.core.errors import PneumoError

    require_train_extra("evaluate")
    if not data.exists():
        fail(f"{data} does not exist; pass a folder with NORMAL/ and PNEUMONIA/ or a Kaggle root.")
    from pneumo.evaluation.evaluate import evaluate_folder

    try:
        report = evaluate_folder(
            data, model, split=split, json_out=json_out, out_dir=out, n_boot=n_boot, warn_overlap=False
        )
    except PneumoError as err:
        fail(err.message)
    typer.echo(f"{'data':12s} {report['data']} ({report['n_images']} images, {report['n_patients']} patients)")
    ci = report.get("ci", {})
    for key in ("accuracy", "sensitivity", "specificity", "roc_auc", "threshold"):
        value = report.get(key)
        typer.echo(f"{key:12s} {'n/a' if value is None else format(value, '.4f')}{_interval(key, ci)}")
    for key, note in (report.get("ci_notes") or {}).items():
        if key in ("accuracy", "sensitivity", "specificity", "roc_auc"):
            typer.echo(f"note: {key} CI: {note}")
    seen = report.get("overlap") or {}
    if seen.get("any"):
        typer.secho(
            f"warning: {seen['any']} of {seen['of']} images were seen by this model ({seen.get('train', 0)} in "
            f"training, {seen.get('val', 0)} in validation): these figures overstate it on new children",
            fg=typer.colors.YELLOW,
            err=True,
        )
    if report.get("n_failed"):
        typer.echo(f"{report['n_failed']} files could not be read; see failures in the JSON", err=True)


def _interval(key: str, ci: dict[str, Any]) -> str:
    if key not in ci:
        return ""
    bounds = ci[key]
    return f"  (95% CI {bounds[0]:.3f}-{bounds[1]:.3f})" if bounds else "  (no CI: too few images)"


def robustness(
    data: Annotated[Path, typer.Argument(help="The training data root the bundle was trained on (Kaggle layout).")],
    model: ModelOption = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the full report JSON here.")] = None,
    val_fraction: Annotated[float, typer.Option(help="As in training: share carved out by patient.")] = 0.15,
    seed: Annotated[int, typer.Option(help="As in training: seed of the patient split.")] = 0,
    tta: Annotated[list[str] | None, typer.Option(help="Test-time views averaged with the image.")] = None,
) -> None:
    """Score a bundle on the robustness validation: its validation split under framing and acquisition shifts."""
    from pneumo.core.errors import PneumoError
    from pneumo.evaluation.robustness import evaluate_bundle, markdown_table

    try:
        report = evaluate_bundle(model, data, val_fraction=val_fraction, seed=seed, tta=tta or ())
    except PneumoError as err:
        fail(err.message)
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(report, indent=2) + "\n")
    typer.echo(markdown_table(report))
    for metric, s in report["summary"].items():
        typer.echo(
            f"{metric:18s} clean {s['clean']:.3f}  worst {s['worst']:.3f} ({s['worst_shift']})  "
            f"mean drop {s['mean_drop']:.3f}"
        )


def compare(
    runs: Annotated[list[Path], typer.Argument(help="Run folders written by `pneumo train --out`.")],
    out: Annotated[Path, typer.Option(help="Markdown table to write.")] = Path("experiments.md"),
    curves: Annotated[Path | None, typer.Option(help="Overlaid learning curves PNG.")] = None,
) -> None:
    """Put runs side by side: validation metrics with CIs, settings, training and inference time."""
    require_train_extra("compare")
    from pneumo.evaluation.compare import compare_runs

    try:
        table = compare_runs(runs, out, curves)
    except FileNotFoundError as err:
        fail(str(err))
    typer.echo(table)
