"""The ``pneumo dicom listen`` and ``pneumo dicomweb`` commands (registered on the main typer app in :mod:`pneumo.cli`).

Thin, like every command: parse options, build the :class:`~pneumo.dicom.analysis.Analyser`
over the one Predictor, run the node or the DICOMweb worker until Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Annotated, Any

import typer

from pneumo.cli.common import ModelOption, fail

dicom_app = typer.Typer(help="pneumo as a DICOM node: a Storage SCP that answers with structured reports.")

_Heatmap = Annotated[
    bool, typer.Option("--heatmap", help="Also send a Secondary Capture of the heatmap overlay (new series).")
]
_Audit = Annotated[Path | None, typer.Option("--audit-log", help="Append one JSON line per answered instance here.")]
_NoOod = Annotated[
    bool, typer.Option("--no-ood", help="Do not refuse images the not-a-chest-X-ray gate rejects (score kept).")
]


def _analyser(model: Path | None, heatmap: bool, no_ood: bool) -> Any:
    from pneumo.core.errors import PneumoError
    from pneumo.dicom.analysis import Analyser
    from pneumo.inference import Predictor

    try:
        return Analyser.from_predictor(Predictor(model, check_ood=not no_ood), heatmap=heatmap)
    except PneumoError as err:
        fail(err.message)


def _stop_on_signals() -> threading.Event:
    """An event set by SIGTERM or SIGINT, so the node stops cleanly (the spool keeps what is left)."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    return stop


@dicom_app.command("listen")
def listen(
    destination: Annotated[
        str, typer.Option("--destination", help="Where reports go, AET@HOST:PORT (e.g. ORTHANC@127.0.0.1:4242).")
    ],
    port: Annotated[int, typer.Option(help="TCP port of the Storage SCP.")] = 11112,
    host: Annotated[str, typer.Option(help="Address to listen on; loopback by default.")] = "127.0.0.1",
    ae_title: Annotated[str, typer.Option("--ae-title", help="This node's AE title.")] = "PNEUMO",
    allow_caller: Annotated[
        list[str] | None,
        typer.Option("--allow-caller", help="Calling AE title allowed to send (repeatable); others are rejected."),
    ] = None,
    spool: Annotated[Path, typer.Option(help="Folder where received instances wait until answered.")] = Path(
        "pneumo-spool"
    ),
    audit_log: _Audit = None,
    heatmap: _Heatmap = False,
    model: ModelOption = None,
    no_ood: _NoOod = False,
) -> None:
    """Receive chest X-rays by C-STORE and send a structured report for each to --destination."""
    from pneumo.dicom.node import Destination, DicomNode, NodeConfig

    try:
        target = Destination.parse(destination)
    except ValueError as err:
        fail(str(err))
    if not 0 <= port < 65536 or not 0 < len(ae_title) <= 16:
        fail("--port must be 0-65535 and --ae-title 1 to 16 characters.")
    config = NodeConfig(
        destination=target,
        spool=spool,
        host=host,
        port=port,
        ae_title=ae_title,
        allowed_callers=tuple(allow_caller or ()),
        audit_log=audit_log,
    )
    node = DicomNode(config, _analyser(model, heatmap, no_ood))
    stop = _stop_on_signals()
    try:
        node.start()
    except OSError as err:
        fail(f"cannot listen on {host}:{port} ({err.strerror or err}); choose another --port.")
    typer.echo(f"pneumo DICOM node {ae_title} on {host}:{node.port}, reports to {target}", err=True)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        node.stop()
        typer.echo("pneumo DICOM node stopped; unanswered instances stay in the spool.", err=True)


def dicomweb(
    url: Annotated[str, typer.Option("--url", help="DICOMweb service root, e.g. http://127.0.0.1:8042/dicom-web.")],
    study: Annotated[
        list[str] | None, typer.Option("--study", help="Study Instance UID to process (repeatable).")
    ] = None,
    since: Annotated[
        str | None, typer.Option("--since", help="Also process every study dated YYYYMMDD or later (QIDO-RS).")
    ] = None,
    poll: Annotated[float, typer.Option(help="Seconds between polls; 0 runs once and exits.")] = 0.0,
    audit_log: _Audit = None,
    heatmap: _Heatmap = False,
    model: ModelOption = None,
    no_ood: _NoOod = False,
) -> None:
    """Classify studies on a DICOMweb server (WADO-RS) and store a report for each instance back (STOW-RS)."""
    import re

    from pneumo.core.errors import PneumoError
    from pneumo.dicom.analysis import AuditLog
    from pneumo.dicom.dicomweb import DicomWebWorker, connect

    if not study and since is None:
        fail("give --study UID (repeatable) and/or --since YYYYMMDD.")
    if since is not None and not re.fullmatch(r"\d{8}", since):
        fail(f"--since must be a date YYYYMMDD, got {since!r}.")
    worker = DicomWebWorker(connect(url), _analyser(model, heatmap, no_ood), AuditLog(audit_log))
    try:
        outcomes = worker.run(study or [], since, poll, _stop_on_signals())
    except PneumoError as err:
        fail(err.message, code=1)
    for outcome in outcomes:
        answer = f"{outcome.label} p={outcome.probability:.3f}" if outcome.label else f"no result ({outcome.code})"
        typer.echo(f"{outcome.sop_instance_uid}\t{answer}")
    typer.echo(f"{len(outcomes)} instance(s) answered", err=True)
