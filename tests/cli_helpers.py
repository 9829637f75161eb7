"""For command-line tests run in-process: put back what ``pneumo``'s start-up sets for the whole process.

Import the fixture into each such test module (``from cli_helpers import restore_process_state``).

``setup_logging`` (every invocation) stops pneumo's records at pneumo's own stderr handler, quiets
Lightning's logger and filters known-harmless warnings, which is right for a command-line process
and wrong for the tests that run after these in the same session (``caplog`` listens at the root).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator

import pytest

from pneumo.core import progress


@pytest.fixture(autouse=True, scope="module")
def restore_process_state() -> Iterator[None]:
    """Module-scoped and autouse, so it is set up before the modules' own fixtures that invoke the CLI."""
    logger = logging.getLogger("pneumo")
    propagate, level, handlers = logger.propagate, logger.level, list(logger.handlers)
    filters, bars = list(warnings.filters), progress.enabled()
    yield
    logger.propagate, logger.handlers[:] = propagate, handlers
    logger.setLevel(level)
    warnings.filters[:] = filters
    progress.configure(force=bars)
