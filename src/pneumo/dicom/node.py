"""pneumo as a DICOM node: a Storage SCP that answers every chest radiograph with a structured report.

The flow (see ``docs/dicom.md``)::

    modality / PACS --C-STORE--> SCP --write + fsync--> spool/incoming/<SOP UID>.dcm --> answer 0x0000
    worker: spool file -> Analyser (the one Predictor) -> SR (+ Grad-CAM SC)
            --C-STORE--> destination PACS -> audit line -> spool file removed

The network protocol is pynetdicom's; this module only adds what a DICOM library cannot know:
the spool that makes an accepted instance survive a crash or restart (it is on disk before the
sender hears "success", and leaves the disk only after its report was stored at the
destination), and the worker that drains it. Logs never carry patient data: only error codes,
counts and spool file names.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset

from pneumo.core.errors import PneumoError
from pneumo.dicom.analysis import Analyser, AuditLog, Outcome, read_header

log = logging.getLogger(__name__)

#: C-STORE statuses the SCP answers (PS3.4 Annex B.2.3); documented in docs/dicom.md.
STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700  # the spool could not be written: nothing was accepted, the sender keeps it
STATUS_CANNOT_UNDERSTAND = 0xC210  # the dataset cannot be parsed or lacks the identifiers a report needs
#: Transfer syntaxes the destination is offered for reports and overlays.
_SEND_SYNTAXES = ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"]


class DestinationError(PneumoError):
    """The destination node refused the association or a C-STORE; the results stay in the spool."""

    code = "destination_unavailable"


@dataclass(frozen=True)
class Destination:
    """A DICOM node to send reports to, written ``AET@HOST:PORT``."""

    ae_title: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Destination:
        match = re.fullmatch(r"([^@\s]{1,16})@([^:\s]+):(\d{1,5})", text.strip())
        if not match or not 0 < int(match.group(3)) < 65536:
            raise ValueError(f"destination {text!r} is not AET@HOST:PORT (e.g. ORTHANC@127.0.0.1:4242).")
        return cls(match.group(1), match.group(2), int(match.group(3)))

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


class Spool:
    """Received instances on disk until their report is stored: ``incoming/`` (to do) and ``rejected/``."""

    def __init__(self, root: Path) -> None:
        self.incoming = root / "incoming"
        self.rejected = root / "rejected"
        self.failed = root / "failed"
        for folder in (self.incoming, self.rejected, self.failed):
            folder.mkdir(parents=True, exist_ok=True)

    def put(self, data: bytes, sop_instance_uid: str | None, folder: Path | None = None) -> Path:
        """Write ``data`` durably (temp file, fsync, atomic rename, fsync of the folder) and return its path."""
        folder = folder or self.incoming
        safe = sop_instance_uid if sop_instance_uid and re.fullmatch(r"[0-9.]{1,64}", sop_instance_uid) else None
        target = folder / f"{safe or uuid.uuid4().hex}.dcm"
        temp = folder / f".{uuid.uuid4().hex}.part"
        with temp.open("wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, target)
        directory = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
        return target

    def pending(self) -> list[Path]:
        """Spooled instances not yet answered, oldest first (left-over ``.part`` files are ignored)."""
        files = [p for p in self.incoming.glob("*.dcm") if p.is_file()]
        return sorted(files, key=lambda p: (p.stat().st_mtime_ns, p.name))


def send(destination: Destination, datasets: list[Dataset], calling_ae_title: str, timeout: float = 30.0) -> None:
    """C-STORE ``datasets`` to ``destination`` in one association.

    Raises:
        DestinationError: the association or any C-STORE failed (nothing is forgotten by the caller).
    """
    from pynetdicom import AE

    ae = AE(ae_title=calling_ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    for sop_class in dict.fromkeys(str(ds.SOPClassUID) for ds in datasets):
        ae.add_requested_context(sop_class, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title)
    if not assoc.is_established:
        raise DestinationError(f"{destination} refused or did not answer the association.")
    try:
        for ds in datasets:
            status = assoc.send_c_store(ds)
            code = int(getattr(status, "Status", -1)) if status else -1
            if code != 0 and not 0xB000 <= code <= 0xBFFF:  # success, or a warning (the object was stored)
                raise DestinationError(f"{destination} answered C-STORE with status 0x{code & 0xFFFF:04X}.")
    finally:
        assoc.release()


@dataclass(frozen=True)
class NodeConfig:
    """How ``pneumo dicom listen`` runs (the CLI maps its options onto this).

    Attributes:
        destination: where reports go.
        spool: folder of the spool (created).
        host, port, ae_title: where and as whom the SCP listens (loopback by default).
        allowed_callers: calling AE titles accepted; empty accepts any caller.
        audit_log: JSON-lines file, or ``None`` for none.
        retry_s: pause before trying an unreachable destination again.
    """

    destination: Destination
    spool: Path
    host: str = "127.0.0.1"
    port: int = 11112
    ae_title: str = "PNEUMO"
    allowed_callers: tuple[str, ...] = ()
    audit_log: Path | None = None
    retry_s: float = 5.0


class DicomNode:
    """The Storage SCP and the worker that drains the spool (``start`` / ``stop``, or ``with``).

    The worker processes anything already in the spool when it starts: instances accepted
    before a crash or a restart are answered then.
    """

    def __init__(self, config: NodeConfig, analyser: Analyser) -> None:
        self.config = config
        self.analyser = analyser
        self.spool = Spool(config.spool)
        self.audit = AuditLog(config.audit_log)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._server: Any = None
        self._worker: threading.Thread | None = None

    def __enter__(self) -> DicomNode:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        """The port actually bound (useful with ``port=0``)."""
        return int(self._server.server_address[1]) if self._server else self.config.port

    def start(self) -> None:
        from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
        from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]  # generated at import

        ae = AE(ae_title=self.config.ae_title)
        # Every storage SOP class and transfer syntax is accepted, so that a CT, a compressed film or
        # an SR gets a report saying why there is no result instead of a bare association failure.
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(str(context.abstract_syntax), ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)
        if self.config.allowed_callers:
            ae.require_calling_aet = list(self.config.allowed_callers)
        else:
            log.warning("No --allow-caller given: any calling AE title may send instances to this node.")
        self._stop.clear()
        self._worker = threading.Thread(target=self._drain, name="pneumo-dicom-worker", daemon=True)
        self._worker.start()
        self._server = ae.start_server(
            (self.config.host, self.config.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._on_store)]
        )
        log.info("DICOM node %s listening on %s:%d", self.config.ae_title, self.config.host, self.port)

    def stop(self) -> None:
        """Stop accepting, let the worker finish the instance in hand; the rest waits in the spool."""
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        self._stop.set()
        self._wake.set()
        if self._worker is not None:
            self._worker.join(timeout=120)
            self._worker = None

    # --- receiving: nothing is answered "success" before it is on disk ---

    def _on_store(self, event: Any) -> int:
        try:
            data = bytes(event.encoded_dataset())
        except Exception:
            log.warning("A received dataset could not be encoded to a file; answered 0x%04X.", STATUS_CANNOT_UNDERSTAND)
            return STATUS_CANNOT_UNDERSTAND
        header = read_header(data)
        try:
            if isinstance(header, Outcome):  # kept for inspection, and the sender hears the failure
                path = self.spool.put(data, header.sop_instance_uid, self.spool.rejected)
                self.audit.write(header.audit(self.analyser.model, "dimse"))
                log.warning("Rejected a received dataset (%s), kept as %s.", header.code, path.name)
                return STATUS_CANNOT_UNDERSTAND
            self.spool.put(data, str(header.SOPInstanceUID))
        except OSError as err:
            log.error("The spool cannot be written (%s); answered 0x%04X.", err.strerror, STATUS_OUT_OF_RESOURCES)
            return STATUS_OUT_OF_RESOURCES
        self._wake.set()
        return STATUS_SUCCESS

    # --- processing: from the spool, so a restart picks up where the last run stopped ---

    def _drain(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()
            waiting = False
            for path in self.spool.pending():
                if self._stop.is_set():
                    return
                if not self.process(path):
                    waiting = True
                    break
            self._wake.wait(self.config.retry_s if waiting else 1.0)

    def process(self, path: Path) -> bool:
        """Answer one spooled instance; False when the destination is unreachable (the file stays)."""
        try:
            data = path.read_bytes()
        except FileNotFoundError:  # a duplicate was already answered
            return True
        try:
            outcome = self.analyser.analyse(data)
        except Exception:  # even building the "no result" report failed: keep the file aside, say so
            log.exception("Could not build a report for spool file %s; moved to failed/.", path.name)
            os.replace(path, self.spool.failed / path.name)
            uid = path.stem if re.fullmatch(r"[0-9.]{1,64}", path.stem) else None
            self.audit.write(Outcome("rejected", uid, code="internal_error").audit(self.analyser.model, "dimse"))
            return True
        if outcome.objects:
            try:
                send(self.config.destination, outcome.objects, self.config.ae_title)
            except PneumoError as err:
                log.warning("%s %d instance(s) wait in the spool.", err.message, len(self.spool.pending()))
                return False
        self.audit.write(outcome.audit(self.analyser.model, "dimse"))
        log.info("Answered a spooled instance: %s %s", outcome.status, outcome.code or outcome.label)
        if outcome.status == "rejected":  # e.g. a file dropped into the spool by hand: kept, never deleted
            os.replace(path, self.spool.rejected / path.name)
        else:
            path.unlink(missing_ok=True)
        return True
