"""Sending results to the destination PACS: one association, every object the destination accepts.

A destination may refuse a SOP class (e.g. it stores Secondary Captures but not Comprehensive 3D
SR): the presentation context for that class is rejected at association time. That object is
then *refused*, a permanent answer no retry will change, while the objects whose class was
accepted are still sent. Before, the whole batch failed with ``ValueError: No presentation context``,
which killed the worker thread (with ``--heatmap``) or blocked the queue forever (without).

:func:`send` reports per object: stored, refused (with the reason) or failed (transient: the
association could not be made, or the C-STORE status says "out of resources"); the pipeline
(:mod:`pneumo.dicom.pipeline`) decides on retries and dead letters.
"""

from __future__ import annotations

import re
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.dataset import Dataset

#: Transfer syntaxes offered for every object pneumo sends (what highdicom writes, and its implicit twin).
SEND_SYNTAXES = ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2")
#: C-STORE statuses that may succeed later (PS3.4 B.2.3: A7xx out of resources); other failures are permanent.
_TRANSIENT_STATUS = range(0xA700, 0xA800)


@dataclass(frozen=True)
class Destination:
    """A DICOM node to send results to, written ``AET@HOST:PORT``."""

    ae_title: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Destination:
        match = re.fullmatch(r"([^@\s\\]{1,16})@([^:\s]+):(\d{1,5})", text.strip())
        if not match or not 0 < int(match.group(3)) < 65536:
            raise ValueError(f"destination {text!r} is not AET@HOST:PORT (e.g. ORTHANC@127.0.0.1:4242).")
        return cls(match.group(1), match.group(2), int(match.group(3)))

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


@dataclass
class DeliveryReport:
    """What happened to each object of one delivery, by its index in the list sent."""

    stored: list[int] = field(default_factory=list)
    refused: dict[int, str] = field(default_factory=dict)
    failed: dict[int, str] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return not self.refused and not self.failed


def send(
    destination: Destination,
    objects: Sequence[Path | Dataset],
    calling_ae_title: str,
    timeout: float = 30.0,
    max_pdu: int = 65536,
    ssl_context: ssl.SSLContext | None = None,
) -> DeliveryReport:
    """C-STORE ``objects`` (datasets, or spooled files read when sent) to ``destination`` in one association.

    Never raises for a network answer: the report says, per object, stored, refused or failed.
    """
    import pydicom
    from pynetdicom import AE

    report = DeliveryReport()
    classes: dict[int, str] = {}
    for index, item in enumerate(objects):
        try:
            header = item if isinstance(item, Dataset) else pydicom.dcmread(item, specific_tags=["SOPClassUID"])
            classes[index] = str(header.SOPClassUID)
        except Exception as err:  # a spooled result that cannot be read back will never become readable
            report.refused[index] = f"the spooled result cannot be read ({type(err).__name__})"
    ae = AE(ae_title=calling_ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.maximum_pdu_size = max_pdu
    for sop_class in dict.fromkeys(classes.values()):
        ae.add_requested_context(sop_class, list(SEND_SYNTAXES))
    if not classes:
        return report
    tls = (ssl_context, "") if ssl_context is not None else None
    try:
        assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title, tls_args=tls)
    except Exception as err:  # an unresolvable host name or a TLS setup error: transient, the pipeline retries
        reason = f"cannot connect to {destination} ({type(err).__name__}: {err})"
        report.failed.update(dict.fromkeys(classes, reason))
        return report
    refused_classes = {str(cx.abstract_syntax) for cx in assoc.rejected_contexts}
    if not assoc.is_established and refused_classes >= set(classes.values()):  # accepted, but none of them
        for index, sop_class in classes.items():
            name = pydicom.uid.UID(sop_class).name
            report.refused[index] = f"{destination} does not accept {name} ({sop_class}): presentation context rejected"
        return report
    if not assoc.is_established:
        what = "rejected" if assoc.is_rejected else "did not accept or answer"
        report.failed.update(dict.fromkeys(classes, f"{destination} {what} the association"))
        return report
    try:
        accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
        for index, sop_class in classes.items():
            if sop_class not in accepted:
                name = pydicom.uid.UID(sop_class).name
                report.refused[index] = (
                    f"{destination} does not accept {name} ({sop_class}): presentation context rejected"
                )
                continue
            try:
                status = assoc.send_c_store(objects[index])
            except Exception as err:  # a dropped connection mid-send: transient
                report.failed[index] = f"C-STORE to {destination} failed ({type(err).__name__})"
                continue
            code = int(getattr(status, "Status", -1)) if status else -1
            if code == 0 or 0xB000 <= code <= 0xBFFF:  # success, or a warning: the object was stored
                report.stored.append(index)
            elif code == -1 or code in _TRANSIENT_STATUS:
                report.failed[index] = f"{destination} answered C-STORE with {_status(code)}"
            else:
                report.refused[index] = f"{destination} answered C-STORE with {_status(code)}"
            if not assoc.is_established:  # the destination aborted: the rest waits for the next attempt
                for rest in classes:
                    if rest not in report.stored and rest not in report.refused:
                        report.failed.setdefault(rest, f"{destination} aborted the association")
                break
    finally:
        if assoc.is_established:
            assoc.release()
    return report


def _status(code: int) -> str:
    return "no answer" if code < 0 else f"status 0x{code & 0xFFFF:04X}"
