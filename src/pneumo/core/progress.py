"""Progress bars for long work (feature caching, evaluation, robustness, quantization, folders of files).

One choice for the whole command line: rich (already installed with typer, and what Lightning's own
epoch bar uses), drawn on stderr so stdout stays the command's output. Bars are off unless the
command line turns them on (:func:`configure`: a terminal on stderr and no ``--quiet``), so a
library call inside someone else's process never draws on their terminal.

Library code reports work through :func:`track` (an iterable) or :func:`task` (a counter it
advances); both cost nothing when bars are off.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress

T = TypeVar("T")

_enabled = False


def configure(*, quiet: bool = False, force: bool | None = None) -> bool:
    """Turn bars on for this process when stderr is a terminal and not ``quiet``; ``force`` overrides the check.

    Returns whether bars are now on.
    """
    global _enabled
    _enabled = (sys.stderr.isatty() if force is None else force) and not quiet
    return _enabled


def enabled() -> bool:
    """Whether the command line asked for progress bars (Lightning's epoch bar follows this too)."""
    return _enabled


def _progress() -> Progress:
    from rich import progress as rich

    columns = (rich.BarColumn(), rich.MofNCompleteColumn(), rich.TimeElapsedColumn(), rich.TimeRemainingColumn())
    return rich.Progress(rich.TextColumn("{task.description}"), *columns, console=_console(), transient=False)


def _console() -> Console:
    from rich.console import Console

    return Console(stderr=True)


def _nothing(n: int = 1) -> None:
    return None


@contextmanager
def task(description: str, total: int | None) -> Iterator[Callable[[int], None]]:
    """A bar of ``total`` steps while the block runs; yields ``advance(n)``. A no-op when bars are off."""
    if not _enabled:
        yield _nothing
        return
    bar = _progress()
    with bar:
        handle = bar.add_task(description, total=total)

        def advance(n: int = 1) -> None:
            bar.advance(handle, n)

        yield advance


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Yield ``items`` while a bar counts them (``total`` defaults to ``len(items)`` where it has one)."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with task(description, total) as advance:
        for item in items:
            yield item
            advance(1)


@contextmanager
def status(description: str) -> Iterator[None]:
    """A line when a step without a count starts (an export, a fit) and one with its time when it ends.

    For the steps at the end of a training run that used to pass in silence. Plain lines, not a live
    spinner, so a bar may run inside the step (rich allows one live display at a time). A no-op when off.
    """
    if not _enabled:
        yield
        return
    import time

    console = _console()
    started = time.perf_counter()
    console.print(f"{description} ...")
    yield
    console.print(f"{description}: done in {time.perf_counter() - started:.1f} s")
