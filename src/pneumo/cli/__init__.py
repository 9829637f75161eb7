"""The ``pneumo`` command line (typer): predict, train, evaluate, robustness, compare, data, export, ood, bench,
app, serve, dicom, dicomweb.

Each command is a thin wrapper in its own module: it parses options, calls one library function
and reports. Heavy imports happen inside the commands, so ``pneumo --help`` stays fast.
"""

from __future__ import annotations

from typing import Annotated

import typer

from pneumo.cli import bench, evaluation, export, predict, serve
from pneumo.cli import data as data_command
from pneumo.cli import train as train_command
from pneumo.cli.common import fail, require_train_extra, setup_logging
from pneumo.cli.dicom import dicom_app, dicomweb

# rich_markup_mode=None: click's plain help. typer's rich panels print "<bool>" beside every flag
# (--help, --no-ood, ...) as if it took a value.
app = typer.Typer(
    name="pneumo",
    help="Pneumonia detection on pediatric chest X-rays (decision support, not a diagnosis).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _version(value: bool) -> None:
    if value:
        from pneumo import __version__

        typer.echo(f"pneumo {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log progress details and library banners.")] = False,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="No progress bars (off anyway when not a terminal).")
    ] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Pneumonia detection on pediatric chest X-rays."""
    setup_logging(verbose, quiet)


app.command()(predict.predict)
train_command.register(app, fail, require_train_extra)
app.command()(evaluation.evaluate)
app.command()(evaluation.robustness)
app.command()(evaluation.compare)
app.add_typer(data_command.data_app, name="data")
app.add_typer(export.export_app, name="export")
app.add_typer(export.ood_app, name="ood")
app.command()(bench.bench)
app.add_typer(serve.page_app, name="app")
app.add_typer(serve.serve_app, name="serve")
app.add_typer(dicom_app, name="dicom")
app.command("dicomweb")(dicomweb)
for _group in (data_command.data_app, export.export_app, export.ood_app, dicom_app):
    _group.rich_markup_mode = None  # the same plain help in every group
