"""The spool's dead letters: an entry appears whole (its reason with it), and a crash mid-way loses nothing."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from pneumo.dicom import spool as spool_module
from pneumo.dicom.spool import Spool


def _instance(spool: Spool, name: str = "1.2.3.dcm") -> Path:
    path = spool.incoming / name
    path.write_bytes(b"DICM instance bytes")
    return path


def test_a_dead_letter_is_visible_only_with_its_reason_and_files(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", min_free_bytes=0)
    entry = spool.dead_letter([_instance(spool)], "1.2.3", {"stage": "deliver", "reason": "refused"})
    assert entry.parent == spool.failed and not entry.name.startswith(".")
    assert sorted(p.name for p in entry.iterdir()) == ["1.2.3.dcm", "reason.json"]
    assert json.loads((entry / "reason.json").read_text())["reason"] == "refused"
    assert [p.name for p in spool.failed.iterdir()] == [entry.name]  # nothing hidden left behind
    assert spool.count(spool.failed) == 1 and not list(spool.incoming.iterdir())


def test_a_crash_before_the_entry_is_renamed_shows_nothing_half_made_and_clean_finishes_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: the entry's folder was counted (health, status) before reason.json was written into it."""
    spool = Spool(tmp_path / "spool", min_free_bytes=0)
    source = _instance(spool)
    real_replace = os.replace

    def crash_on_the_entry(src: str | Path, dst: str | Path) -> None:
        if Path(dst).parent == spool.failed:  # the last step: the built entry renamed into place
            raise KeyboardInterrupt("the process dies here")
        real_replace(src, dst)

    monkeypatch.setattr(spool_module.os, "replace", crash_on_the_entry)
    with pytest.raises(KeyboardInterrupt):
        spool.dead_letter([source], "1.2.3", {"stage": "analyse", "reason": "bad pixels"})
    monkeypatch.undo()
    assert spool.count(spool.failed) == 0 and spool.dead_letters() == []  # what health and status read
    assert not source.exists()  # the instance is in the hidden entry, not lost

    restarted = Spool(tmp_path / "spool", min_free_bytes=0)
    restarted.clean()
    (entry,) = restarted.failed.iterdir()
    assert sorted(p.name for p in entry.iterdir()) == ["1.2.3.dcm", "reason.json"]
    assert [r["reason"] for r in restarted.dead_letters()] == ["bad pixels"]


def test_clean_drops_a_dead_letter_that_died_before_holding_anything(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", min_free_bytes=0)
    (spool.failed / ".1.2.3-0000abcd.staging").mkdir()
    spool.clean()
    assert list(spool.failed.iterdir()) == []
