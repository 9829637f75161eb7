"""``pneumo predict``: classify files and folders, one row per input (result or error), in input order."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pneumo.cli import output
from pneumo.cli.common import ModelOption, fail


def predict(
    inputs: Annotated[
        list[Path],
        # readable=False: click would refuse an unreadable path as a usage error and drop every row;
        # pneumo gives it an ``unreadable_file`` row instead, like any other bad input.
        typer.Argument(help="Image files (JPEG, PNG, DICOM) or folders of them.", readable=False),
    ],
    model: ModelOption = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the results as a JSON list here.")] = None,
    csv_out: Annotated[Path | None, typer.Option("--csv", help="Write the results as CSV here.")] = None,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 16,
    no_ood: Annotated[
        bool, typer.Option("--no-ood", help="Do not refuse images the not-a-chest-X-ray gate rejects (score kept).")
    ] = False,
) -> None:
    """Classify files; one row per input file (result or error), in input order.

    Exits with status 1 when any file failed, so scripts notice.
    """
    from pneumo.core.errors import PneumoError
    from pneumo.inference import Predictor, iter_image_files

    for out in (json_out, csv_out):  # before predicting: a bad output path must not cost the results
        if out is not None:
            output.check_output(out, fail)
    try:
        predictor = Predictor(model, check_ood=not no_ood)
    except PneumoError as err:
        fail(err.message)
    files = iter_image_files(inputs)
    if not files:
        fail("no input files found.")
    rows = output.prediction_rows(files, predictor.predict_with_progress(files, batch_size))
    failed = sum("error" in row for row in rows)
    for row in rows:  # one line per input: names and messages are escaped, so no name can forge a row
        name = output.printable(row["file"])
        if "error" in row:
            typer.echo(f"{name}\tERROR {row['error']['code']}: {output.printable(row['error']['message'])}")
        else:
            typer.echo(f"{name}\t{row['label']}\tp={row['probability']:.3f}\t(threshold {row['threshold']:.3f})")
    output.write_rows(rows, json_out, csv_out, fail)
    typer.echo(f"{len(rows) - failed} predicted, {failed} failed", err=True)
    if failed:
        raise typer.Exit(1)
