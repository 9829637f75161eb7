"""``pneumo evaluate``, ``pneumo robustness`` and ``pneumo compare``: how good a model is, and on what."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from pneumo.cli.common import ModelOption, fail, require_train_extra


def evaluate(
    data: Annotated[Path, typer.Argument(help="Folder with NORMAL/ and PNEUMONIA/, or a Kaggle root (uses test/).")],
    model: ModelOption = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the metrics JSON here.")] = None,
    out: Annotated[Path | None, typer.Option(help="Folder for report.md and plots (default: next to --json).")] = None,
    n_boot: Annotated[int, typer.Option(help="Bootstrap resamples for the 95% CIs.")] = 1000,
) -> None:
    """Metrics with bootstrap 95% CIs, a Markdown report and ROC/PR/confusion/reliability plots."""
    from pneumo.core.errors import PneumoError

    require_train_extra("evaluate")
    from pneumo.evaluation.evaluate import evaluate_folder

    try:
        report = evaluate_folder(data, model, json_out=json_out, out_dir=out, n_boot=n_boot)
    except PneumoError as err:
        fail(err.message)
    ci = report.get("ci", {})
    for key in ("n_images", "accuracy", "sensitivity", "specificity", "roc_auc", "threshold"):
        value = report.get(key)
        bounds = ci.get(key)
        extra = f"  (95% CI {bounds[0]:.3f}-{bounds[1]:.3f})" if bounds else ""
        typer.echo(f"{key:12s} {value if isinstance(value, int) else format(value or 0.0, '.4f')}{extra}")
    if report.get("n_failed"):
        typer.echo(f"{report['n_failed']} files could not be read; see failures in the JSON", err=True)


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
