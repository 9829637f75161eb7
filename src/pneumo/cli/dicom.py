"""The ``pneumo dicom listen`` / ``pneumo dicom status`` and ``pneumo dicomweb`` commands.

Thin, like every command: parse options into :class:`~pneumo.dicom.node.NodeConfig` (or the DICOMweb
worker's arguments), build the :class:`~pneumo.dicom.analysis.Analyser` over the one Predictor, run
until Ctrl-C or SIGTERM. Every option is documented in ``docs/dicom.md`` (the conformance statement).
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from pneumo.cli.common import ModelOption, fail

dicom_app = typer.Typer(help="pneumo as a DICOM node: a Storage SCP that answers with structured reports.")

_Heatmap = Annotated[
    bool, typer.Option("--heatmap", help="Also send a Secondary Capture of the heatmap overlay (new series).")
]
_Audit = Annotated[Path | None, typer.Option("--audit-log", help="Append one JSON line per audited event here.")]
_NoOod = Annotated[
    bool, typer.Option("--no-ood", help="Do not refuse images the not-a-chest-X-ray gate rejects (score kept).")
]
_MaxAge = Annotated[
    float,
    typer.Option("--max-age-years", help="Oldest patient analysed (older: 'outside intended use'). Model: ages 1-5."),
]
_BodyPart = Annotated[
    list[str] | None,
    typer.Option("--body-part", help="BodyPartExamined value accepted (repeatable); default CHEST and its synonyms."),
]


def _service_logging() -> None:
    """Log lines of a long-running service carry a timestamp; pynetdicom's own chatter stays out."""
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%dT%H:%M:%S%z")
    logger = logging.getLogger("pneumo")
    for handler in logger.handlers:
        handler.setFormatter(formatter)
    if logger.level > logging.INFO or logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)
    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)


def _analyser(model: Path | None, heatmap: bool, no_ood: bool, max_age: float = 17.0, parts: Any = None) -> Any:
    from pneumo.core.errors import PneumoError
    from pneumo.dicom.analysis import Analyser
    from pneumo.dicom.intended_use import CHEST_BODY_PARTS, IntendedUse
    from pneumo.inference import Predictor

    use = IntendedUse(max_age_years=max_age, body_parts=tuple(p.upper() for p in parts) if parts else CHEST_BODY_PARTS)
    try:
        return Analyser.from_predictor(Predictor(model, check_ood=not no_ood), heatmap=heatmap, intended_use=use)
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
        str, typer.Option("--destination", help="Where results go, AET@HOST:PORT (e.g. ORTHANC@127.0.0.1:4242).")
    ],
    port: Annotated[int, typer.Option(help="TCP port of the Storage SCP.")] = 11112,
    host: Annotated[str, typer.Option(help="Address to listen on; loopback by default.")] = "127.0.0.1",
    ae_title: Annotated[str, typer.Option("--ae-title", help="This node's AE title (called AE title).")] = "PNEUMO",
    allow_caller: Annotated[
        list[str] | None,
        typer.Option(
            "--allow-caller", help="Allowed caller, repeatable: AE, AE@IP, AE@NETWORK/PREFIX or *@NETWORK/PREFIX."
        ),
    ] = None,
    any_called_ae: Annotated[
        bool, typer.Option("--any-called-ae", help="Accept associations addressed to any called AE title.")
    ] = False,
    spool: Annotated[Path, typer.Option(help="Folder where received instances wait until answered.")] = Path(
        "pneumo-spool"
    ),
    audit_log: _Audit = None,
    heatmap: _Heatmap = False,
    model: ModelOption = None,
    no_ood: _NoOod = False,
    max_age_years: _MaxAge = 17.0,
    body_part: _BodyPart = None,
    max_associations: Annotated[int, typer.Option(help="Associations admitted at once.")] = 32,
    max_pending: Annotated[int, typer.Option(help="Connections not yet associated (more evict the oldest).")] = 16,
    acse_timeout: Annotated[float, typer.Option(help="Seconds a connection may take to request association.")] = 10.0,
    dimse_timeout: Annotated[float, typer.Option(help="Seconds to wait for an expected DIMSE message.")] = 60.0,
    network_timeout: Annotated[float, typer.Option(help="Seconds an association may stay idle.")] = 60.0,
    max_pdu: Annotated[int, typer.Option(help="Maximum PDU length received (bytes).")] = 262144,
    max_request_kb: Annotated[int, typer.Option(help="Largest A-ASSOCIATE-RQ accepted (KB).")] = 64,
    max_instance_mb: Annotated[int, typer.Option(help="Largest C-STORE dataset accepted (MB).")] = 1024,
    max_attempts: Annotated[int, typer.Option(help="Tries per item before it becomes a dead letter.")] = 10,
    retry_max_delay: Annotated[float, typer.Option(help="Longest pause between two tries (seconds).")] = 300.0,
    min_free_mb: Annotated[int, typer.Option(help="Free space kept on the spool's disk (below: 0xA700).")] = 256,
    tls_cert: Annotated[Path | None, typer.Option(help="DICOM TLS: this node's certificate (PEM).")] = None,
    tls_key: Annotated[Path | None, typer.Option(help="DICOM TLS: this node's private key (PEM).")] = None,
    tls_ca: Annotated[Path | None, typer.Option(help="DICOM TLS: CA that signs the callers' certificates.")] = None,
) -> None:
    """Receive chest X-rays by C-STORE and send a structured report for each to --destination."""
    import tempfile

    from pneumo.dicom.node import Destination, DicomNode, NodeConfig, RetryPolicy
    from pneumo.dicom.pipeline import limit_malloc_arenas
    from pneumo.dicom.policy import AccessPolicy, CallerRule

    try:
        target = Destination.parse(destination)
        callers = tuple(CallerRule.parse(text) for text in allow_caller or ())
    except ValueError as err:
        fail(str(err))
    if not 0 <= port < 65536 or not 0 < len(ae_title) <= 16:
        fail("--port must be 0-65535 and --ae-title 1 to 16 characters.")
    tls = (tls_cert, tls_key, tls_ca)
    if any(tls) and not all(tls):
        fail("DICOM TLS needs all three of --tls-cert, --tls-key and --tls-ca (the CA of the callers' certificates).")
    if min(max_associations, max_pending, max_attempts) < 1 or min(acse_timeout, dimse_timeout, network_timeout) <= 0:
        fail("limits must be at least 1 and timeouts above 0.")
    _service_logging()
    limit_malloc_arenas()
    access = AccessPolicy(
        callers=callers,
        check_called_ae=not any_called_ae,
        max_associations=max_associations,
        max_pending=max_pending,
        request_timeout_s=acse_timeout,
        dimse_timeout_s=dimse_timeout,
        network_timeout_s=network_timeout,
        max_request_bytes=max_request_kb * 1024,
        max_pdu_bytes=max_pdu,
        max_instance_bytes=max_instance_mb * 2**20,
    )
    config = NodeConfig(
        destination=target,
        spool=spool,
        host=host,
        port=port,
        ae_title=ae_title,
        access=access,
        audit_log=audit_log,
        retry=RetryPolicy(max_attempts=max_attempts, max_delay_s=retry_max_delay),
        tls=(tls_cert, tls_key, tls_ca) if tls_cert and tls_key and tls_ca else None,
        min_free_bytes=min_free_mb * 2**20,
    )
    node = DicomNode(config, _analyser(model, heatmap, no_ood, max_age_years, body_part))
    # pynetdicom writes arriving datasets to the temp folder: on the spool's disk, a rename makes them durable.
    tempfile.tempdir = str(node.spool.tmp)
    stop = _stop_on_signals()
    try:
        node.start()
    except (OSError, ValueError) as err:
        fail(f"cannot start the node on {host}:{port} ({getattr(err, 'strerror', None) or err}).")
    typer.echo(f"pneumo DICOM node {ae_title} on {host}:{node.port}, reports to {target}", err=True)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        node.stop()
        typer.echo("pneumo DICOM node stopped; unanswered instances stay in the spool.", err=True)


@dicom_app.command("status")
def status(
    spool: Annotated[Path, typer.Option(help="The spool folder of the node.")] = Path("pneumo-spool"),
    as_json: Annotated[bool, typer.Option("--json", help="Print the status as JSON.")] = False,
    health: Annotated[
        bool, typer.Option("--health", help="Exit 1 unless every stage is alive (for a container health check).")
    ] = False,
) -> None:
    """Queue depth, oldest item, failures, dead letters and last delivery of a running node (from SPOOL/status.json)."""
    from pneumo.dicom.pipeline import STATUS_STALE_S
    from pneumo.dicom.spool import read_json

    state = read_json(spool / "status.json")
    if not state:
        fail(f"no status in {spool}/status.json: is a node running with --spool {spool}?", code=1)
    age = time.time() - float(state.get("time", 0))
    if age > STATUS_STALE_S:
        state["healthy"] = False
        state.setdefault("problems", []).append(f"status is {age:.0f} s old: the node is not running")
    if as_json:
        typer.echo(json.dumps(state, indent=1, default=str))
    else:
        _print_status(state, spool)
    if health and not state.get("healthy"):
        raise typer.Exit(1)


def _print_status(state: dict[str, Any], spool: Path) -> None:
    queue = state.get("queue", {})
    oldest = queue.get("oldest_age_s")
    typer.echo(f"health: {'ok' if state.get('healthy') else 'FAILING: ' + '; '.join(state.get('problems', []))}")
    for name, stage in state.get("stages", {}).items():
        extra = (
            f", {stage.get('restarts', 0)} restart(s), {stage.get('errors', 0)} error(s)" if "errors" in stage else ""
        )
        typer.echo(f"  stage {name}: {'alive' if stage.get('alive') else 'NOT ALIVE'}{extra}")
    typer.echo(
        f"queue: {queue.get('incoming', 0)} to analyse, {queue.get('outgoing', 0)} to deliver"
        + (f", oldest {oldest:.0f} s" if oldest is not None else "")
    )
    last = state.get("last_delivery")
    when = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(last["time"])) if last else "never"
    typer.echo(f"last delivery: {when}")
    typer.echo(f"dead letters: {state.get('dead_letters', 0)} (in {spool / 'failed'})")
    for failure in state.get("failures", [])[-10:]:
        dead = "dead letter" if failure.get("dead_letter") else f"attempt {failure.get('attempts')}"
        typer.echo(f"  {failure.get('stage')} {failure.get('sop_instance_uid')}: {dead}: {failure.get('reason')}")


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
    max_age_years: _MaxAge = 17.0,
    body_part: _BodyPart = None,
) -> None:
    """Classify studies on a DICOMweb server (WADO-RS) and store a report for each instance back (STOW-RS)."""
    import re

    from pneumo.core.errors import PneumoError
    from pneumo.dicom.audit import AuditLog
    from pneumo.dicom.dicomweb import DicomWebWorker, connect

    if not study and since is None:
        fail("give --study UID (repeatable) and/or --since YYYYMMDD.")
    if since is not None and not re.fullmatch(r"\d{8}", since):
        fail(f"--since must be a date YYYYMMDD, got {since!r}.")
    if poll > 0:
        _service_logging()
    analyser = _analyser(model, heatmap, no_ood, max_age_years, body_part)
    worker = DicomWebWorker(connect(url), analyser, AuditLog(audit_log, (analyser.model.name, analyser.model.version)))

    def show(outcome: Any) -> None:
        answer = (
            f"{outcome.label} p={outcome.probability:.3f}" if outcome.label else f"{outcome.status} ({outcome.code})"
        )
        typer.echo(f"{outcome.sop_instance_uid}\t{answer}")
        sys.stdout.flush()

    try:
        counts = worker.run(study or [], since, poll, _stop_on_signals(), on_outcome=show)
    except PneumoError as err:
        fail(err.message, code=1)
    typer.echo(f"{sum(counts.values())} instance(s) answered", err=True)
