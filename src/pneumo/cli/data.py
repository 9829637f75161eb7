"""``pneumo data check ROOT``: what a dataset folder holds, before a run spends minutes finding out."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from pneumo.cli.common import fail

data_app = typer.Typer(help="Check a dataset folder (the Kermany chest X-ray layout).", no_args_is_help=True)


@data_app.command("check")
def check(
    root: Annotated[Path, typer.Argument(help="Dataset root: train/ (val/, test/) with NORMAL/ and PNEUMONIA/ each.")],
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the findings as JSON here.")] = None,
) -> None:
    """Count images per split and class, patients, repeated films and duplicates; refuse a wrong layout in one line."""
    from pneumo.core.dataset import inspect_root
    from pneumo.core.errors import PneumoError

    try:
        report = inspect_root(root)
    except PneumoError as err:
        fail(err.message)
    typer.echo(f"{root}: {'Kaggle layout' if '.' not in report['splits'] else 'class folders (NORMAL/, PNEUMONIA/)'}")
    typer.echo(f"{'split':8s} {'NORMAL':>7s} {'PNEUMONIA':>10s} {'bacteria':>9s} {'virus':>6s} {'patients':>9s} "
               f"{'>1 film':>8s} {'duplicates':>10s}")  # fmt: skip
    for split, s in report["splits"].items():
        kinds = s["kinds"]
        typer.echo(
            f"{split:8s} {s['counts']['NORMAL']:7d} {s['counts']['PNEUMONIA']:10d} {kinds.get('bacteria', 0):9d} "
            f"{kinds.get('virus', 0):6d} {s['n_patients']:9d} {s['patients_with_several_films']:8d} "
            f"{s['duplicate_files']:10d}"
        )
    for pair, n in report["shared_patients"].items():
        if n:
            typer.echo(f"warning: {n} patients have films in both {pair.replace('+', ' and ')}", err=True)
    splits = report["splits"]
    if "train" in splits and splits.get("val", {}).get("n_images", 0) < 100:
        typer.echo("training carves a validation split by patient from train/ (val/ missing or under 100 images)")
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(report, indent=2) + "\n")
