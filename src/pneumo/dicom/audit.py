"""The audit log: one JSON line per event, all in ONE shape, that never takes the node down.

Every line has the same keys (``null`` where one does not apply), documented in ``docs/dicom.md``::

    {"time", "event", "channel", "calling_ae", "called_ae", "peer", "sop_instance_uid", "outcome",
     "reason", "result_uids", "result", "probability", "threshold", "model", "model_version", "detail"}

Events: ``association_accepted``, ``association_rejected``, ``association_aborted``,
``instance_received``, ``instance_refused``, ``instance_analysed``, ``result_delivered``,
``delivery_failed``, ``dead_letter``. No patient name, patient ID, accession number or study UID
is ever written: the SOP Instance UID identifies the object, and the PACS maps it to a patient.

A full disk (``ENOSPC``) or any other write error must not stop the pipeline (it did: the worker
thread died and the node went on answering C-STORE with success). Lines that cannot be written
wait in a bounded backlog and are written, in order, with the next line that can be; the failure
is logged once per streak and shows in ``pneumo dicom status``.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections import deque
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: The keys of every audit line, in order.
AUDIT_KEYS = (
    "time",
    "event",
    "channel",
    "calling_ae",
    "called_ae",
    "peer",
    "sop_instance_uid",
    "outcome",
    "reason",
    "result_uids",
    "result",
    "probability",
    "threshold",
    "model",
    "model_version",
    "detail",
)
#: Lines kept in memory while the log cannot be written (oldest dropped beyond, and counted).
BACKLOG_LINES = 10_000


def audit_record(event: str, **fields: Any) -> dict[str, Any]:
    """A record in the one audit shape: ``event`` plus ``fields``, every other key ``None``.

    Raises:
        ValueError: a field that is not one of :data:`AUDIT_KEYS` (the shape is a contract).
    """
    unknown = set(fields) - set(AUDIT_KEYS)
    if unknown:
        raise ValueError(f"audit fields {sorted(unknown)} are not in the audit shape {AUDIT_KEYS}.")
    record: dict[str, Any] = dict.fromkeys(AUDIT_KEYS)
    record.update(fields)
    record["time"] = datetime.now(UTC).isoformat(timespec="milliseconds")
    record["event"] = event
    return record


class AuditLog:
    """Append-only JSON lines, safe to call from several threads; ``write`` never raises.

    Args:
        path: the JSON-lines file, or ``None`` for no audit log.
        model: ``(name, version)`` added to every line.
    """

    def __init__(self, path: Path | None, model: tuple[str, str] | None = None) -> None:
        self.path = path
        self.model = model
        self._lock = threading.Lock()
        self._backlog: deque[str] = deque(maxlen=BACKLOG_LINES)
        #: Lines lost because the backlog overflowed while the log could not be written.
        self.dropped = 0
        #: The last write error (``None`` while writing works).
        self.error: str | None = None
        if path is not None:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                self.error = f"{err.strerror or err}"

    @property
    def healthy(self) -> bool:
        return self.error is None

    def event(self, event: str, **fields: Any) -> dict[str, Any]:
        """Write one event in the audit shape (see :func:`audit_record`); returns the record."""
        if self.model is not None:
            fields.setdefault("model", self.model[0])
            fields.setdefault("model_version", self.model[1])
        record = audit_record(event, **fields)
        self.write(record)
        return record

    def write(self, record: dict[str, Any]) -> None:
        """Append ``record`` (and any backlog before it); on failure keep it in the backlog, never raise."""
        if self.path is None:
            return
        line = json.dumps(record, default=str) + "\n"
        with self._lock:
            if len(self._backlog) == self._backlog.maxlen:
                self.dropped += 1
            self._backlog.append(line)
            try:
                with self.path.open("a", encoding="utf-8") as handle:
                    while self._backlog:
                        handle.write(self._backlog[0])
                        handle.flush()
                        self._backlog.popleft()
                    os.fsync(handle.fileno())
            except OSError as err:
                if self.error is None:
                    log.error(
                        "The audit log %s cannot be written (%s); %d line(s) wait in memory and are written when "
                        "it can be. Free space or fix permissions.",
                        self.path,
                        err.strerror or err,
                        len(self._backlog),
                    )
                self.error = f"{err.strerror or err}"
                return
            if self.error is not None:
                log.warning("The audit log %s is writable again; the waiting lines were written.", self.path)
            self.error = None

    @property
    def backlog(self) -> int:
        return len(self._backlog)

    def records(self) -> Iterator[dict[str, Any]]:
        """Every readable record, oldest first (a line cut by a crash is skipped)."""
        if self.path is None or not self.path.is_file():
            return
        with self.path.open(encoding="utf-8", errors="replace") as handle:
            for line in handle:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(record, dict):
                    yield record

    def finished_uids(self, channel: str) -> set[str]:
        """SOP Instance UIDs of ``channel`` already answered (delivered, dead-lettered or pneumo's own output)."""
        done: set[str] = set()
        for record in self.records():
            if record.get("channel") != channel or not record.get("sop_instance_uid"):
                continue
            event, outcome = record.get("event"), record.get("outcome")
            if event in ("result_delivered", "dead_letter") or (event == "instance_analysed" and outcome == "ignored"):
                done.add(str(record["sop_instance_uid"]))
        return done
