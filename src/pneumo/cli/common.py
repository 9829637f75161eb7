"""What every ``pneumo`` command shares: the model option, one-line errors, logging, the training-extra check."""

from __future__ import annotations

import importlib.util
import logging
import sys
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

ModelOption = Annotated[
    Path | None, typer.Option("--model", "-m", help="Model bundle folder; default: the bundle shipped with pneumo.")
]


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (test runners swap it per invocation)."""

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def setup_logging(verbose: bool) -> None:
    """Configure pneumo's own logger only: Lightning and others keep their handlers (no duplicate lines)."""
    logger = logging.getLogger("pneumo")
    if not logger.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO if verbose else logging.WARNING)


def require_train_extra(command: str) -> None:
    """Stop with one line when a training-stack command runs from the base (serving-only) install."""
    missing = [name for name in ("torch", "timm", "lightning") if importlib.util.find_spec(name) is None]
    if missing:
        need = ", ".join(missing)
        fail(f"`pneumo {command}` needs the training extra ({need} missing): pip install 'pneumo[train]'")


def fail(message: str, code: int = 2) -> NoReturn:
    """Print a one-line error (never a traceback) and exit."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)
