"""Progress bars: off unless the command line turns them on, on stderr when on, never on stdout."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from pneumo.core import progress


@pytest.fixture(autouse=True)
def _restore() -> Iterator[None]:
    before = progress.enabled()
    yield
    progress.configure(force=before)


def test_bars_are_off_by_default_and_when_not_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    assert progress.configure() is False  # pytest's stderr is not a terminal
    assert list(progress.track(range(5), "counting")) == [0, 1, 2, 3, 4]
    with progress.task("working", 3) as advance:
        advance(3)
    with progress.status("exporting"):
        pass
    assert capsys.readouterr() == ("", "")


def test_quiet_wins_over_a_terminal() -> None:
    assert progress.configure(quiet=True, force=True) is False


def test_bars_draw_on_stderr_when_on(capsys: pytest.CaptureFixture[str]) -> None:
    assert progress.configure(force=True) is True
    assert list(progress.track([1, 2, 3], "caching features")) == [1, 2, 3]
    with progress.status("exporting the fp32 graph"):
        pass
    out, err = capsys.readouterr()
    assert out == ""
    assert "caching features" in err and "3/3" in err
    assert "exporting the fp32 graph: done in" in err


def test_a_bar_may_run_inside_a_status(capsys: pytest.CaptureFixture[str]) -> None:
    """A step's status line and a bar inside it (fit the gate: features of every training image) coexist."""
    progress.configure(force=True)
    with progress.status("fitting the gate"):
        assert sum(progress.track(range(4), "features")) == 6
    err = capsys.readouterr().err
    assert err.index("fitting the gate ...") < err.index("features") < err.index("fitting the gate: done in")
