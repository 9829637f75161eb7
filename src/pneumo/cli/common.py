"""What every ``pneumo`` command shares: the model option, one-line errors, logging, progress, the extras check."""

from __future__ import annotations

import importlib.util
import logging
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

ModelOption = Annotated[
    Path | None, typer.Option("--model", "-m", help="Model bundle folder; default: the bundle shipped with pneumo.")
]

#: Warnings the training stack prints on every run that say nothing about the user's run (checked
#: with Lightning 2.6, torch 2.9-2.14): the eval-mode notice is our frozen BatchNorm stages, on purpose.
KNOWN_HARMLESS_WARNINGS = (
    r".*is deprecated, use `isinstance\(treespec, TreeSpec\)",  # Lightning's own use of torch's pytree
    r"Found \d+ module\(s\) in eval mode at the start of training",  # the frozen stages, by design
    r"The number of training batches .* is smaller than the logging interval",
    r"The '(train|val)_dataloader' does not have many workers",  # a CPU run reads cached tensors
    r"Checkpoint directory .* exists and is not empty",
    r".*`training_step` returned `None`",
)

#: The extras of ``pyproject.toml`` and the modules that tell whether each is installed.
EXTRAS = {
    "train": ("torch", "timm", "lightning"),
    "app": ("streamlit", "pandas"),
}


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (test runners swap it per invocation)."""

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def setup_logging(verbose: bool, quiet: bool = False) -> None:
    """Configure pneumo's logger, the progress bars and the training stack's chatter, for a command line run.

    pneumo's logger gets one stderr handler and does not propagate (a library that configures the root
    logger would otherwise print every line twice). Lightning's INFO banners (accelerators, seeds, its
    promotional tip) and :data:`KNOWN_HARMLESS_WARNINGS` are kept for ``--verbose``. This is the command
    line's choice: importing the library silences nothing.
    """
    from pneumo.core import progress

    logger = logging.getLogger("pneumo")
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.INFO if verbose else logging.WARNING)
    progress.configure(quiet=quiet)
    _verbosity["verbose"] = verbose
    quiet_training_stack()
    if not verbose:
        for pattern in KNOWN_HARMLESS_WARNINGS:
            warnings.filterwarnings("ignore", message=pattern)


_verbosity = {"verbose": False}


def quiet_training_stack() -> None:
    """Lightning's INFO lines (seed, accelerators, its tip) only with ``--verbose``.

    Call it again once Lightning is imported: its ``__init__`` sets its logger back to INFO.
    """
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.INFO if _verbosity["verbose"] else logging.WARNING)


def missing_modules(extra: str) -> list[str]:
    """The modules of ``extra`` (:data:`EXTRAS`) that are not installed."""
    return [name for name in EXTRAS[extra] if importlib.util.find_spec(name) is None]


def require_extra(command: str, extra: str) -> None:
    """Stop with one line when ``pneumo COMMAND`` needs an extra the install lacks (the base is the serving node)."""
    missing = ", ".join(missing_modules(extra))
    if missing:
        fail(f"`pneumo {command}` needs the {extra} extra ({missing} missing): pip install 'pneumo[{extra}]'")


def require_train_extra(command: str) -> None:
    """Stop with one line when a training-stack command runs from the base (serving-only) install."""
    require_extra(command, "train")


def check_data_root(root: str | Path | None, splits: Sequence[str] = ("train", "")) -> Path:
    """The data root, or a one-line error before anything heavy loads: it must exist and hold class folders.

    ``splits``: the sub-folders (``""`` for the root itself) one of which must hold ``NORMAL/`` and
    ``PNEUMONIA/``.
    """
    if not root:
        fail("no training data: pass --data DATA_ROOT (a folder with train/NORMAL and train/PNEUMONIA).")
    path = Path(root).expanduser()
    if not path.is_dir():
        fail(f"data root {path} does not exist; pass a folder with train/NORMAL and train/PNEUMONIA "
             "(README.md, 'Get the data').")  # fmt: skip
    for split in splits:
        folder = path / split if split else path
        if (folder / "NORMAL").is_dir() and (folder / "PNEUMONIA").is_dir():
            return path
    wanted = " or ".join(f"{path / s if s else path}/NORMAL and PNEUMONIA" for s in splits)
    fail(f"data root {path} has no class folders; expected {wanted}. Check it with: pneumo data check {path}")


def fail(message: str, code: int = 2) -> NoReturn:
    """Print a one-line error (never a traceback) and exit."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)
