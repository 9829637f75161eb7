"""pneumo as a DICOM node: a Storage SCP that answers every chest radiograph with a structured report.

The flow (see ``docs/dicom.md``, which is also the conformance statement)::

    PACS --A-ASSOCIATE--> Guard (host, AE titles, limits, TLS)          pneumo.dicom.guard
         --C-STORE------> written to SPOOL/tmp as it arrives (pynetdicom's chunked receive)
                          -> header read within bounds -> fsync + rename into SPOOL/incoming -> 0x0000
    supervised stages:    analyse (report + overlay) -> SPOOL/outgoing -> deliver -> audit
                          (retries with backoff, then SPOOL/failed with the reason)   pneumo.dicom.pipeline

The network protocol is pynetdicom's. This module wires the pieces: the SCP's event handlers (a
sender hears "success" only for an instance on disk; every association, refusal, abort and
instance is audited in the one shape of :mod:`pneumo.dicom.audit`) and the pipeline that drains
the spool. Logs never carry patient data: only error codes, counts and SOP Instance UIDs.
"""

from __future__ import annotations

import contextlib
import logging
import ssl
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pneumo.dicom.analysis import Analyser
from pneumo.dicom.audit import AuditLog
from pneumo.dicom.delivery import Destination
from pneumo.dicom.guard import Guard, GuardedServer
from pneumo.dicom.header import HeaderError, read_header
from pneumo.dicom.pipeline import Pipeline, RetryPolicy
from pneumo.dicom.policy import AccessPolicy
from pneumo.dicom.spool import Quota, Spool

log = logging.getLogger(__name__)

#: C-STORE statuses the SCP answers (PS3.4 Annex B.2.3); documented in docs/dicom.md.
STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700  # the spool could not be written: nothing was accepted, the sender keeps it
STATUS_CANNOT_UNDERSTAND = 0xC210  # the dataset cannot be parsed or lacks the identifiers a report needs

__all__ = ["AccessPolicy", "Destination", "DicomNode", "NodeConfig", "RetryPolicy"]


@dataclass(frozen=True)
class NodeConfig:
    """How ``pneumo dicom listen`` runs (the CLI maps its options onto this).

    Attributes:
        destination: where results go.
        spool: folder of the spool (created).
        host, port, ae_title: where and as whom the SCP listens (loopback by default).
        access: callers, called-AE check, association and PDU limits, timeouts.
        audit_log: JSON-lines file, or ``None`` for none.
        retry: retries and backoff of analysis and delivery, before a dead letter.
        send_timeout: ACSE/DIMSE/network timeout when sending to the destination.
        tls: ``(certificate, key, client CA)``: DICOM TLS with a client certificate required.
        min_free_bytes: free space kept on the spool's file system (below it, C-STORE gets 0xA700).
        rejected_quota, failed_quota: limits of ``SPOOL/rejected`` and ``SPOOL/failed``.
    """

    destination: Destination
    spool: Path
    host: str = "127.0.0.1"
    port: int = 11112
    ae_title: str = "PNEUMO"
    access: AccessPolicy = field(default_factory=AccessPolicy)
    audit_log: Path | None = None
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    send_timeout: float = 30.0
    tls: tuple[Path, Path, Path] | None = None
    min_free_bytes: int = 256 * 2**20
    rejected_quota: Quota = field(default_factory=lambda: Quota(200, 2**30))
    failed_quota: Quota = field(default_factory=Quota)


class DicomNode:
    """The Storage SCP and the supervised pipeline that drains its spool (``start`` / ``stop``, or ``with``).

    The pipeline processes anything already in the spool when it starts: instances accepted
    before a crash or a restart are answered then.
    """

    def __init__(self, config: NodeConfig, analyser: Analyser) -> None:
        self.config = config
        self.analyser = analyser
        self.spool = Spool(config.spool, config.min_free_bytes, config.rejected_quota, config.failed_quota)
        self.audit = AuditLog(config.audit_log, (analyser.model.name, analyser.model.version))
        self.guard = Guard(config.access, config.ae_title, self._refused)
        self.pipeline = Pipeline(
            self.spool,
            analyser,
            config.destination,
            self.audit,
            config.ae_title,
            config.retry,
            config.send_timeout,
            receive_alive=self._receiving,
        )
        self._server: Any = None
        self._server_thread: threading.Thread | None = None

    def __enter__(self) -> DicomNode:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        """The port actually bound (useful with ``port=0``)."""
        return int(self._server.server_address[1]) if self._server else self.config.port

    def health(self) -> dict[str, Any]:
        """The pipeline's status (stages alive, queue, failures, dead letters, last delivery, audit)."""
        return self.pipeline.status()

    def start(self) -> None:
        from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, _config, evt
        from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]  # generated at import

        # Received datasets go to a file as they arrive, never whole into memory (a 300 MB C-STORE cost +926 MB).
        _config.STORE_RECV_CHUNKED_DATASET = True
        self.spool.clean()
        access = self.config.access
        ae = AE(ae_title=self.config.ae_title)
        # Every storage SOP class and transfer syntax is accepted, so that a CT, a compressed film or
        # an SR gets a report saying why there is no result instead of a bare association failure.
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(str(context.abstract_syntax), ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)
        ae.maximum_pdu_size = access.max_pdu_bytes
        ae.acse_timeout = access.request_timeout_s
        ae.dimse_timeout = access.dimse_timeout_s
        ae.network_timeout = access.network_timeout_s
        ae.require_called_aet = False  # the Guard checks it, and audits the refusal
        # pynetdicom counts the threads of unassociated and closing connections too; the Guard enforces the real
        # limits first, and this margin only keeps pynetdicom's count from refusing what the Guard admitted.
        ae.maximum_associations = access.max_associations + 4 * access.max_pending
        if not access.callers:
            log.warning("No --allow-caller given: any calling AE title from any host may send instances.")
        handlers: list[Any] = [
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_ABORTED, self._on_aborted),
            (evt.EVT_CONN_CLOSE, self._on_closed),
        ]
        tls: ssl.SSLContext | None = None
        if self.config.tls is not None:
            from pneumo.dicom.policy import tls_server_context

            tls = tls_server_context(*self.config.tls)
        self._server = ae.make_server(
            (self.config.host, self.config.port),
            ssl_context=tls,
            evt_handlers=handlers,
            server_class=GuardedServer,
            guard=self.guard,
        )
        self._server_thread = threading.Thread(target=self._server.serve_forever, name="pneumo-dicom-scp", daemon=True)
        self._server_thread.start()
        self.pipeline.start()
        log.info(
            "DICOM node %s listening on %s:%d%s", self.config.ae_title, self.config.host, self.port,
            " (TLS, client certificate required)" if tls else "",
        )  # fmt: skip

    def stop(self) -> None:
        """Stop accepting, let the stages finish the items in hand; the rest waits in the spool."""
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        if self._server_thread is not None:
            self._server_thread.join(timeout=10)
            self._server_thread = None
        self.pipeline.stop()

    def _receiving(self) -> bool:
        return self._server_thread is not None and self._server_thread.is_alive()

    # --- the association: who, and the audit of each step ---

    @staticmethod
    def _sender(assoc: Any) -> dict[str, Any]:
        primitive = getattr(assoc.requestor, "primitive", None)
        return {
            "calling_ae": str(getattr(primitive, "calling_ae_title", "") or assoc.requestor.ae_title or "") or None,
            "called_ae": str(getattr(primitive, "called_ae_title", "") or "") or None,
            "peer": f"{assoc.requestor.address}:{assoc.requestor.port}",
        }

    def _refused(
        self,
        reason: str,
        peer: str,
        calling_ae: str | None = None,
        called_ae: str | None = None,
        detail: dict[str, Any] | None = None,
    ) -> None:
        event = "instance_refused" if reason == "instance_too_large" else "association_rejected"
        self.audit.event(
            event, channel="dimse", calling_ae=calling_ae, called_ae=called_ae, peer=peer, outcome="refused",
            reason=reason, detail=detail,
        )  # fmt: skip
        log.warning("Refused a connection from %s (%s).", peer, reason)

    def _on_requested(self, event: Any) -> None:
        assoc = event.assoc
        sender = self._sender(assoc)
        raw = getattr(assoc.dul.socket, "raw", None)
        decision = self.guard.admit(raw, sender["calling_ae"] or "", sender["called_ae"] or "", assoc.requestor.address)
        if decision is None:
            return
        reason, (result, source, diagnostic) = decision
        self.audit.event("association_rejected", channel="dimse", **sender, outcome="rejected", reason=reason)
        log.warning("Rejected an association from %s (%s).", sender["peer"], reason)
        assoc.acse.send_reject(result, source, diagnostic)
        assoc.kill()

    def _on_accepted(self, event: Any) -> None:
        self.audit.event("association_accepted", channel="dimse", **self._sender(event.assoc), outcome="accepted")

    def _on_aborted(self, event: Any) -> None:
        self.audit.event("association_aborted", channel="dimse", **self._sender(event.assoc), outcome="aborted")

    def _on_closed(self, event: Any) -> None:
        assoc = event.assoc
        self.guard.close(getattr(assoc.dul.socket, "raw", None))
        message = getattr(assoc.dimse, "message", None)  # a dataset cut off mid-transfer: its temp file goes
        partial = getattr(message, "_data_set_path", None)
        if isinstance(partial, Path):
            partial.unlink(missing_ok=True)

    # --- receiving: nothing is answered "success" before it is on disk ---

    def _on_store(self, event: Any) -> int:
        sender = self._sender(event.assoc)
        try:
            source: Path | bytes = Path(event.dataset_path)
        except AttributeError:  # chunked receive off (another pynetdicom user in this process): bytes
            source = bytes(event.encoded_dataset())
        try:
            header = read_header(source, self.analyser.predictor.limits)
        except HeaderError as err:
            with contextlib.suppress(OSError):
                self.spool.adopt(source, err.sop_instance_uid, self.spool.rejected)
            self.audit.event(
                "instance_refused", channel="dimse", **sender, sop_instance_uid=err.sop_instance_uid,
                outcome="refused", reason=err.code, detail={"status": f"0x{STATUS_CANNOT_UNDERSTAND:04X}"},
            )  # fmt: skip
            log.warning("Refused a received dataset (%s): answered 0x%04X.", err.code, STATUS_CANNOT_UNDERSTAND)
            return STATUS_CANNOT_UNDERSTAND
        uid = str(header.SOPInstanceUID)
        del header
        try:
            self.spool.check_free_space()
            self.spool.adopt(source, uid, self.spool.incoming, meta={**sender, "received": time.time()})
        except OSError as err:
            self.audit.event(
                "instance_refused", channel="dimse", **sender, sop_instance_uid=uid, outcome="refused",
                reason="spool_unwritable", detail={"error": err.strerror or str(err), "status": "0xA700"},
            )  # fmt: skip
            log.error(
                "The spool cannot be written (%s); answered 0x%04X.", err.strerror or err, STATUS_OUT_OF_RESOURCES
            )
            return STATUS_OUT_OF_RESOURCES
        self.audit.event("instance_received", channel="dimse", **sender, sop_instance_uid=uid, outcome="accepted")
        self.pipeline.wake()
        return STATUS_SUCCESS
