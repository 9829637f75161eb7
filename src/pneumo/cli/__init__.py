"""The ``pneumo`` command line (typer): predict, train, evaluate, robustness, compare, export, ood, bench, app,
serve, dicom, dicomweb.

Each command is a thin wrapper in its own module: it parses options, calls one library function
and reports. Heavy imports happen inside the commands, so ``pneumo --help`` stays fast.
"""

from __future__ import annotations

from typing import Annotated

import typer

from pneumo.cli import bench, evaluation, export, predict, serve
from pneumo.cli import train as train_command
from pneumo.cli.common import fail, require_train_extra, setup_logging
from pneumo.cli.dicom import dicom_app, dicomweb

app = typer.Typer(
    name="pneumo",
    help="Pneumonia detection on pediatric chest X-rays (decision support, not a diagnosis).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log progress details.")] = False) -> None:
    """Pneumonia detection on pediatric chest X-rays."""
    setup_logging(verbose)


app.command()(predict.predict)
train_command.register(app, fail, require_train_extra)
app.command()(evaluation.evaluate)
app.command()(evaluation.robustness)
app.command()(evaluation.compare)
app.add_typer(export.export_app, name="export")
app.add_typer(export.ood_app, name="ood")
app.command()(bench.bench)
app.add_typer(serve.page_app, name="app")
app.add_typer(serve.serve_app, name="serve")
app.add_typer(dicom_app, name="dicom")
app.command("dicomweb")(dicomweb)
