"""The supervised pipeline: every acknowledged instance ends delivered or as a dead letter with its reason.

Real peers only: pynetdicom SCUs send, a pynetdicom Storage SCP (``Sink``) or nothing at all is the
destination, dcmtk's ``storescu`` is a third-party sender, and ``/dev/full`` is a disk that is full.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom
import pytest
from orthanc_helpers import free_port
from peers import *  # noqa: F403  (the fixtures)
from peers import Sink, audit_lines, audited, dcmtk, film, store, wait_until
from typer.testing import CliRunner

from pneumo.cli import app
from pneumo.dicom.analysis import Analyser
from pneumo.dicom.node import Destination, DicomNode, RetryPolicy
from pneumo.dicom.spool import Quota

SR = pydicom.uid.Comprehensive3DSRStorage
SC = pydicom.uid.SecondaryCaptureImageStorage


def test_a_destination_refusing_sr_gets_the_overlay_and_the_sr_is_a_reported_dead_letter(
    node_factory: Callable[..., DicomNode], sink_factory: Callable[..., Sink]
) -> None:
    """Before: ValueError 'No presentation context for Comprehensive SR' killed the worker; nothing more came."""
    sink = sink_factory(SC)
    node = node_factory(sink.destination, heatmap=True)
    assert store(node.port, [film(), film()]) == [0, 0]
    assert wait_until(lambda: len(sink.of_class(SC)) == 2), "the overlays the destination accepts are delivered"
    # An item's last step is its result_delivered line (after its dead letter, its failure and their audit).
    assert wait_until(lambda: node.health()["dead_letters"] == 2 and audited(node, "result_delivered") == 2)
    state = node.health()
    assert state["healthy"] and state["stages"]["analyse"]["alive"] and state["stages"]["deliver"]["alive"]
    assert all("does not accept Comprehensive 3D SR" in f["reason"] for f in state["failures"] if f["dead_letter"])
    reasons = [json.loads((entry / "reason.json").read_text()) for entry in node.spool.failed.iterdir()]
    assert {r["stage"] for r in reasons} == {"deliver"} and all(r["file"].endswith(".dcm") for r in reasons)
    lines = audit_lines(node)
    assert [line["outcome"] for line in lines if line["event"] == "result_delivered"] == ["partial", "partial"]
    assert sum(line["event"] == "dead_letter" for line in lines) == 2
    assert store(node.port, [film()]) == [0], "the node still answers after the refusals"
    assert wait_until(lambda: len(sink.of_class(SC)) == 3)


def test_an_unreachable_destination_ends_in_dead_letters_within_the_retry_bound(
    node_factory: Callable[..., DicomNode],
) -> None:
    """Before: retried every 5 s forever, the whole queue blocked behind the first item, and no reason shown."""
    node = node_factory(Destination("NOBODY", "127.0.0.1", free_port()), retry=RetryPolicy(3, 0.1, 0.2))
    assert store(node.port, [film(), film(), film()]) == [0, 0, 0]
    done = {"incoming": 0, "outgoing": 0, "oldest_age_s": None}
    assert wait_until(lambda: node.health()["queue"] == done and audited(node, "dead_letter") == 3, timeout=90), (
        "each dead letter is noted and audited just after it is counted"
    )
    assert node.health()["dead_letters"] == 3
    state = node.health()
    dead = [f for f in state["failures"] if f["dead_letter"]]
    assert len(dead) == 3 and all(f["attempts"] == 3 and "association" in f["reason"] for f in dead)
    lines = audit_lines(node)
    assert sum(line["event"] == "delivery_failed" for line in lines) == 6  # two retries each, then the dead letter
    assert {line["reason"] for line in lines if line["event"] == "dead_letter"} == {dead[0]["reason"]}


def test_a_full_audit_disk_does_not_stop_the_pipeline(
    node_factory: Callable[..., DicomNode], sink_factory: Callable[..., Sink]
) -> None:
    """Before: ENOSPC on the audit log killed the worker thread; C-STORE went on answering success, nothing came."""
    sink = sink_factory()
    node = node_factory(sink.destination, audit_log=Path("/dev/full"))  # every write: ENOSPC
    assert store(node.port, [film(), film()]) == [0, 0]
    assert wait_until(lambda: len(sink.of_class(SR)) == 2)
    state = node.health()
    assert not state["healthy"] and state["audit"]["error"] and state["audit"]["backlog"] > 0
    assert any("audit log cannot be written" in problem for problem in state["problems"])
    assert state["stages"]["analyse"]["alive"] and state["stages"]["deliver"]["alive"]


class _DiesOnce(Analyser):
    """The real analyser, except that the first call raises what no ``except Exception`` catches."""

    died = False

    def analyse(self, source: Path | bytes) -> Any:
        if not _DiesOnce.died:
            _DiesOnce.died = True
            raise SystemExit("a stage thread ends")
        return super().analyse(source)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the death is the point
def test_a_dead_stage_is_restarted_and_the_instance_still_answered(
    node_factory: Callable[..., DicomNode], sink_factory: Callable[..., Sink]
) -> None:
    sink = sink_factory()
    node = node_factory(sink.destination, start=False)
    node.pipeline.analyser = _DiesOnce(node.analyser.predictor, node.analyser.model)
    node.start()
    try:
        assert store(node.port, [film()]) == [0]
        assert wait_until(lambda: len(sink.of_class(SR)) == 1), "the supervisor restarted the stage"
        assert node.health()["stages"]["analyse"]["restarts"] == 1
    finally:
        node.stop()


class _AlwaysFails(Analyser):
    """The real analyser, except that building anything fails (say, a disk that cannot take the results)."""

    def analyse(self, source: Path | bytes) -> Any:
        raise OSError(28, "No space left on device")


def test_an_instance_that_always_fails_analysis_becomes_a_dead_letter_with_its_reason(
    node_factory: Callable[..., DicomNode], sink_factory: Callable[..., Sink]
) -> None:
    node = node_factory(sink_factory().destination, start=False, retry=RetryPolicy(3, 0.1, 0.2))
    node.pipeline.analyser = _AlwaysFails(node.analyser.predictor, node.analyser.model)
    node.start()
    try:
        assert store(node.port, [film()]) == [0]
        assert wait_until(lambda: not node.health()["queue"]["incoming"] and audited(node, "dead_letter") == 1)
        assert node.health()["dead_letters"] == 1
        entry = next(node.spool.failed.iterdir())
        reason = json.loads((entry / "reason.json").read_text())
        assert (reason["stage"], reason["attempts"]) == ("analyse", 3) and "No space left" in reason["reason"]
        assert any(path.suffix == ".dcm" for path in entry.iterdir()), "the received instance is kept"
        events = [line["event"] for line in audit_lines(node)]
        assert events.count("analysis_failed") == 2 and events.count("dead_letter") == 1
    finally:
        node.stop()


@pytest.mark.slow  # three films analysed, a node stopped and another started: about 30 s on 2 busy cores
def test_dcmtk_storescu_is_answered_and_restart_resumes_from_the_spool(
    node_factory: Callable[..., DicomNode], sink_factory: Callable[..., Sink], tmp_path: Path
) -> None:
    storescu = dcmtk("storescu")
    if storescu is None:
        pytest.skip("dcmtk's storescu is not installed (Debian package dcmtk)")
    files = [tmp_path / f"film{i}.dcm" for i in range(3)]
    for path in files:
        path.write_bytes(film())
    spool = tmp_path / "spool-restart"
    down = node_factory(Destination("NOBODY", "127.0.0.1", free_port()), spool=spool, retry=RetryPolicy(100, 30, 30))
    command = [storescu, "-aet", "SENDER", "-aec", "PNEUMO", "127.0.0.1", str(down.port), *map(str, files)]
    subprocess.run(command, check=True, capture_output=True, timeout=120)
    assert wait_until(lambda: len(list((spool / "outgoing").iterdir())) == 3), "analysed, waiting for the destination"
    down.stop()
    (spool / "tmp" / ".left-over.part").write_bytes(b"half a file")  # what a disk-full used to leave forever
    sink = sink_factory()
    node_factory(sink.destination, spool=spool)
    assert wait_until(lambda: len(sink.of_class(SR)) == 3)
    assert not (spool / "tmp" / ".left-over.part").exists()
    assert wait_until(lambda: not any((spool / "outgoing").iterdir()))


def test_rejected_datasets_stay_under_their_quota(
    node_factory: Callable[..., DicomNode], sink_factory: Callable[..., Sink]
) -> None:
    """Before: rejected/ kept every unparseable dataset forever."""
    node = node_factory(sink_factory().destination, rejected_quota=Quota(max_entries=2, max_bytes=2**30))
    no_study = [film(StudyInstanceUID="") for _ in range(4)]
    assert store(node.port, no_study) == [0xC210] * 4
    assert len(list(node.spool.rejected.iterdir())) == 2
    refused = [line for line in audit_lines(node) if line["event"] == "instance_refused"]
    assert [line["reason"] for line in refused] == ["missing_identifiers"] * 4


def test_status_command_shows_the_queue_and_fails_health_when_the_node_is_gone(
    node_factory: Callable[..., DicomNode], tmp_path: Path
) -> None:
    node = node_factory(Destination("NOBODY", "127.0.0.1", free_port()), retry=RetryPolicy(50, 30, 30))
    assert store(node.port, [film()]) == [0]
    assert wait_until(lambda: node.health()["queue"]["outgoing"] == 1 and node.health()["failures"])
    node.pipeline.write_status()
    runner = CliRunner()
    shown = runner.invoke(app, ["dicom", "status", "--spool", str(node.config.spool), "--health"])
    assert shown.exit_code == 0, shown.output
    assert "1 to deliver" in shown.output and "stage deliver: alive" in shown.output and "attempt 1" in shown.output
    node.stop()
    stale = json.loads((node.config.spool / "status.json").read_text())
    stale["time"] -= 60  # what a killed node leaves behind
    (node.config.spool / "status.json").write_text(json.dumps(stale))
    gone = runner.invoke(app, ["dicom", "status", "--spool", str(node.config.spool), "--health"])
    assert gone.exit_code == 1 and "not running" in gone.output


def test_health_fails_while_a_stage_is_not_alive(node_factory: Callable[..., DicomNode]) -> None:
    node = node_factory(Destination("NOBODY", "127.0.0.1", free_port()), start=False)
    state = node.health()
    assert not state["healthy"]
    assert {"receive stage is not alive", "analyse stage is not alive", "deliver stage is not alive"} <= set(
        state["problems"]
    )
    node.start()
    try:
        assert node.health()["healthy"]
    finally:
        node.stop()


@pytest.mark.slow  # a fresh interpreter loads the model: 10-20 s on a busy 2-core machine
def test_listen_health_check_passes_while_running_and_fails_after_a_kill(bundle: Path, tmp_path: Path) -> None:
    port, spool = free_port(), tmp_path / "spool"
    command = [sys.executable, "-m", "pneumo.cli", "dicom", "listen", "--port", str(port), "--allow-caller", "SENDER"]
    command += ["--destination", f"NOBODY@127.0.0.1:{free_port()}", "--spool", str(spool), "-m", str(bundle)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}
    process = subprocess.Popen(command, stderr=subprocess.PIPE, env=env, text=True)
    health = [sys.executable, "-m", "pneumo.cli", "dicom", "status", "--spool", str(spool), "--health"]
    try:
        assert process.stderr is not None
        line = process.stderr.readline()
        while line and "pneumo DICOM node" not in line:
            line = process.stderr.readline()
        assert wait_until(lambda: (spool / "status.json").is_file())
        assert store(port, [film()]) == [0]
        assert subprocess.run(health, env=env, capture_output=True, timeout=120).returncode == 0
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    time.sleep(16)  # the status goes stale
    assert subprocess.run(health, env=env, capture_output=True, timeout=120).returncode == 1
