"""The ``pneumo`` command line (typer): train, evaluate, predict, compare, export, app, serve, bench.

Each command is a thin wrapper: it parses options, calls one library function and reports.
Heavy imports happen inside the commands so ``pneumo --help`` stays fast.
"""

from __future__ import annotations

import csv
import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

app = typer.Typer(
    name="pneumo",
    help="Pneumonia detection on pediatric chest X-rays (decision support, not a diagnosis).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

ModelOption = Annotated[
    Path | None, typer.Option("--model", "-m", help="Model bundle folder; default: the bundle shipped with pneumo.")
]


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(message)s")


def _fail(message: str, code: int = 2) -> None:
    """Print a one-line error (never a traceback) and exit."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log progress details.")] = False) -> None:
    """Pneumonia detection on pediatric chest X-rays."""
    _setup_logging(verbose)


# ----------------------------------------------------------------------------------------- predict


@app.command()
def predict(
    inputs: Annotated[list[Path], typer.Argument(help="Image files (JPEG, PNG, DICOM) or folders of them.")],
    model: ModelOption = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the results as a JSON list here.")] = None,
    csv_out: Annotated[Path | None, typer.Option("--csv", help="Write the results as CSV here.")] = None,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 16,
) -> None:
    """Classify files; one row per input file (result or error), in input order.

    Exits with status 1 when any file failed, so scripts notice.
    """
    from pneumo.errors import PneumoError
    from pneumo.inference import Predictor, iter_image_files

    try:
        predictor = Predictor(model)
    except PneumoError as err:
        _fail(err.message)
    files = iter_image_files(inputs)
    if not files:
        _fail("no input files found.")
    rows = prediction_rows(files, predictor.predict_many(files, batch_size=batch_size))
    _write_rows(rows, json_out, csv_out)
    failed = sum("error" in row for row in rows)
    for row in rows:
        if "error" in row:
            typer.echo(f"{row['file']}\tERROR {row['error']['code']}: {row['error']['message']}")
        else:
            typer.echo(f"{row['file']}\t{row['label']}\tp={row['probability']:.3f}\t(threshold {row['threshold']:.3f})")
    typer.echo(f"{len(rows) - failed} predicted, {failed} failed", err=True)
    if failed:
        raise typer.Exit(1)


def prediction_rows(files: list[Path], results: list[Any]) -> list[dict[str, Any]]:
    """One JSON-able row per file: the prediction's fields, or ``file`` + ``error``."""
    from pneumo.errors import PneumoError

    rows: list[dict[str, Any]] = []
    for path, result in zip(files, results, strict=True):
        if isinstance(result, PneumoError):
            rows.append({"file": str(path), "error": result.to_dict()})
        else:
            row = result.to_dict()
            row.pop("source", None)
            rows.append({"file": str(path), **row})
    return rows


def _write_rows(rows: list[dict[str, Any]], json_out: Path | None, csv_out: Path | None) -> None:
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(rows, indent=2) + "\n")
    if csv_out is not None:
        csv_out.parent.mkdir(parents=True, exist_ok=True)
        fields = ["file", "label", "probability", "threshold", "error_code", "error_message"]
        with csv_out.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
            writer.writeheader()
            for row in rows:
                error = row.get("error") or {}
                writer.writerow({**row, "error_code": error.get("code", ""), "error_message": error.get("message", "")})


def run() -> None:  # pragma: no cover - console entry point alias
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
