"""pneumo over DICOMweb: find studies (QIDO-RS), fetch their instances (WADO-RS), store reports back (STOW-RS).

The HTTP side is ``dicomweb-client``'s; the analysis is the same :class:`~pneumo.dicom.analysis.Analyser`
as the DIMSE node's, so both paths give the same report for the same file. What this module adds
is the bookkeeping a poll needs: which instances are pneumo's own output (never classified:
that would loop), and which were already answered (remembered in memory and, across restarts,
read back from the audit log).
"""

from __future__ import annotations

import io
import logging
import threading
from collections.abc import Iterable
from typing import Any

from pydicom.dataset import Dataset

from pneumo.core.errors import PneumoError
from pneumo.dicom.analysis import Analyser, AuditLog, Outcome
from pneumo.dicom.sr import sc_series_uid, sr_series_uid

log = logging.getLogger(__name__)

#: WADO-RS media type asking for each instance in the transfer syntax it is stored in ("*"), so a
#: compressed film is not transcoded (or refused) by the server; the decoder question is pneumo's.
_AS_STORED = (("application/dicom", "*"),)


class DicomWebError(PneumoError):
    """The DICOMweb server could not be reached or refused a request."""

    code = "dicomweb_error"


def connect(url: str) -> Any:
    """A ``DICOMwebClient`` for the service root ``url`` (e.g. ``http://127.0.0.1:8042/dicom-web``)."""
    from dicomweb_client.api import DICOMwebClient

    return DICOMwebClient(url=url.rstrip("/"))


def _value(attributes: dict[str, Any], tag: str) -> str | None:
    values = attributes.get(tag, {}).get("Value")
    return str(values[0]) if values else None


def find_studies(client: Any, since: str) -> list[str]:
    """Study Instance UIDs of studies dated ``since`` (YYYYMMDD) or later (QIDO-RS)."""
    try:
        studies = client.search_for_studies(search_filters={"StudyDate": f"{since}-"})
    except Exception as err:  # requests raises many types: all mean "the server did not answer this"
        raise DicomWebError(f"QIDO-RS search for studies since {since} failed ({type(err).__name__}).") from err
    return [uid for uid in (_value(study, "0020000D") for study in studies) if uid]


class DicomWebWorker:
    """Answers the instances of studies on a DICOMweb server, each once.

    Args:
        client: a ``DICOMwebClient``.
        analyser: the shared analysis (model, heatmap).
        audit: the audit log; instances it already lists as answered are skipped.
    """

    def __init__(self, client: Any, analyser: Analyser, audit: AuditLog) -> None:
        self.client = client
        self.analyser = analyser
        self.audit = audit
        self.done: set[str] = audit.finished_uids()

    def process_study(self, study_uid: str) -> list[Outcome]:
        """Classify every instance of the study not answered yet and STOW-RS the reports into it."""
        model = self.analyser.model
        own_series = {sr_series_uid(study_uid, model), sc_series_uid(study_uid, model)}
        try:
            found = self.client.search_for_instances(study_instance_uid=study_uid)
        except Exception as err:
            raise DicomWebError(f"QIDO-RS search for the instances of a study failed ({type(err).__name__}).") from err
        outcomes: list[Outcome] = []
        for attributes in found:
            series, sop = _value(attributes, "0020000E"), _value(attributes, "00080018")
            if not series or not sop or series in own_series or sop in self.done:
                continue
            outcome = self._process_instance(study_uid, series, sop)
            if outcome is not None:
                outcomes.append(outcome)
        return outcomes

    def _process_instance(self, study_uid: str, series_uid: str, sop_uid: str) -> Outcome | None:
        try:
            dataset = self.client.retrieve_instance(study_uid, series_uid, sop_uid, media_types=_AS_STORED)
        except Exception as err:  # not remembered as done: the next poll tries again
            log.warning(
                "WADO-RS retrieve of an instance failed (%s); it is retried on the next poll.", type(err).__name__
            )
            return None
        outcome = self.analyser.analyse(_encode(dataset))
        self.done.add(sop_uid)
        if outcome.status == "ignored":  # pneumo's output for another model version
            return None
        if outcome.objects:
            try:
                self.client.store_instances(outcome.objects, study_instance_uid=study_uid)
            except Exception as err:
                self.done.discard(sop_uid)
                raise DicomWebError(f"STOW-RS of a report failed ({type(err).__name__}).") from err
        self.audit.write(outcome.audit(self.analyser.model, "dicomweb"))
        log.info("Answered an instance over DICOMweb: %s %s", outcome.status, outcome.code or outcome.label)
        return outcome

    def run(
        self,
        studies: Iterable[str] = (),
        since: str | None = None,
        poll_s: float = 0.0,
        stop: threading.Event | None = None,
    ) -> list[Outcome]:
        """Process ``studies`` and, with ``since``, every study dated since then; repeat every ``poll_s`` seconds.

        With ``poll_s`` 0 it runs once; otherwise until ``stop`` is set. A failed poll (server
        down) is logged and retried at the next interval rather than ending the loop.
        """
        stop = stop or threading.Event()
        outcomes: list[Outcome] = []
        while True:
            try:
                targets = list(dict.fromkeys([*studies, *(find_studies(self.client, since) if since else [])]))
                for study_uid in targets:
                    outcomes += self.process_study(study_uid)
            except DicomWebError as err:
                if poll_s <= 0:
                    raise
                log.warning("%s Retrying in %g s.", err.message, poll_s)
            if poll_s <= 0 or stop.wait(poll_s):
                return outcomes


def _encode(dataset: Dataset) -> bytes:
    """A retrieved dataset as the bytes of a DICOM file (what the one inference path reads)."""
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
