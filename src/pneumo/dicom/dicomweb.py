"""pneumo over DICOMweb: find studies (QIDO-RS), fetch their instances (WADO-RS), store results back (STOW-RS).

The HTTP side is ``dicomweb-client``'s; the analysis is the same :class:`~pneumo.dicom.analysis.Analyser`
as the DIMSE node's, so both paths give the same report for the same file. What this module adds:

* the bookkeeping a poll needs: pneumo's own series are skipped (classifying them would loop), and
  an instance is answered once (in memory for this run and, across restarts, from the audit log);
* bounded memory: an instance is fetched as the bytes the server stores (its header then goes
  through the one bounded reader, :func:`pneumo.dicom.header.read_header`, instead of a plain
  ``dcmread`` that inflates a Deflated file whole), and the worker keeps no past outcomes (it used
  to keep every outcome, pixel data of the overlays included: 2.9 MB more per instance, forever).
  :meth:`DicomWebWorker.run` reports each outcome to a callback as it happens and returns counts.
"""

from __future__ import annotations

import io
import logging
import threading
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

from pydicom.dataset import Dataset

from pneumo.core.errors import PneumoError
from pneumo.dicom.analysis import Analyser, Outcome
from pneumo.dicom.audit import AuditLog
from pneumo.dicom.codes import sc_series_uid, sr_series_uid

log = logging.getLogger(__name__)

#: WADO-RS Accept header asking for each instance in the transfer syntax it is stored in ("*"), so a
#: compressed film is not transcoded (or refused) by the server; the decoder question is pneumo's.
_AS_STORED = 'multipart/related; type="application/dicom"; transfer-syntax=*'
CHANNEL = "dicomweb"


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


def retrieve_bytes(client: Any, study_uid: str, series_uid: str, sop_uid: str) -> bytes:
    """The instance as the server stores it (WADO-RS, ``transfer-syntax=*``), as the bytes of a DICOM file.

    dicomweb-client's ``retrieve_instance`` parses the part with a plain ``dcmread``; its own URL and
    multipart helpers give the raw part instead. Where they are missing (another client version),
    the parsed dataset is written back to bytes.
    """
    try:
        from dicomweb_client.api import _Transaction  # type: ignore[attr-defined]

        url = client._get_instances_url(_Transaction.RETRIEVE, study_uid, series_uid, sop_uid)
        response = client._http_get(url, headers={"Accept": _AS_STORED})
        parts = client._decode_multipart_message(response, stream=False)
        return bytes(next(iter(parts)))
    except (AttributeError, ImportError):
        dataset = client.retrieve_instance(study_uid, series_uid, sop_uid, media_types=(("application/dicom", "*"),))
        return _encode(dataset)


class DicomWebWorker:
    """Answers the instances of studies on a DICOMweb server, each once.

    Args:
        client: a ``DICOMwebClient``.
        analyser: the shared analysis (model, heatmap, intended use).
        audit: the audit log; instances it already lists as answered are skipped.
    """

    def __init__(self, client: Any, analyser: Analyser, audit: AuditLog) -> None:
        self.client = client
        self.analyser = analyser
        self.audit = audit
        #: SOP Instance UIDs answered (a set of short strings: the only state kept between polls).
        self.done: set[str] = audit.finished_uids(CHANNEL)

    def process_study(self, study_uid: str, on_outcome: Callable[[Outcome], None] | None = None) -> Counter[str]:
        """Classify every instance of the study not answered yet and STOW-RS the results into it."""
        model = self.analyser.model
        own_series = {sr_series_uid(study_uid, model), sc_series_uid(study_uid, model)}
        try:
            found = self.client.search_for_instances(study_instance_uid=study_uid)
        except Exception as err:
            raise DicomWebError(f"QIDO-RS search for the instances of a study failed ({type(err).__name__}).") from err
        counts: Counter[str] = Counter()
        for attributes in found:
            series, sop = _value(attributes, "0020000E"), _value(attributes, "00080018")
            if not series or not sop or series in own_series or sop in self.done:
                continue
            outcome = self._process_instance(study_uid, series, sop)
            if outcome is None:
                continue
            counts[outcome.status] += 1
            if on_outcome is not None:
                on_outcome(outcome)
            outcome.objects.clear()  # nothing of it outlives this instance
        return counts

    def _process_instance(self, study_uid: str, series_uid: str, sop_uid: str) -> Outcome | None:
        try:
            data = retrieve_bytes(self.client, study_uid, series_uid, sop_uid)
        except Exception as err:  # not remembered as done: the next poll tries again
            log.warning(
                "WADO-RS retrieve of an instance failed (%s); it is retried on the next poll.", type(err).__name__
            )
            return None
        outcome = self.analyser.analyse(data)
        del data
        self.audit.event("instance_analysed", channel=CHANNEL, **outcome.audit_fields())
        if outcome.status == "ignored":  # pneumo's output for another model version
            self.done.add(sop_uid)
            return None
        if outcome.objects:
            try:
                self.client.store_instances(outcome.objects, study_instance_uid=study_uid)
            except Exception as err:
                raise DicomWebError(f"STOW-RS of a result failed ({type(err).__name__}).") from err
        self.done.add(sop_uid)
        fields = outcome.audit_fields()
        self.audit.event(
            "result_delivered", channel=CHANNEL, sop_instance_uid=sop_uid, outcome="delivered",
            result_uids=fields["result_uids"], reason=outcome.code,
        )  # fmt: skip
        log.info("Answered an instance over DICOMweb: %s %s", outcome.status, outcome.code or outcome.label)
        return outcome

    def run(
        self,
        studies: Iterable[str] = (),
        since: str | None = None,
        poll_s: float = 0.0,
        stop: threading.Event | None = None,
        on_outcome: Callable[[Outcome], None] | None = None,
    ) -> Counter[str]:
        """Process ``studies`` and, with ``since``, every study dated since then; repeat every ``poll_s`` seconds.

        With ``poll_s`` 0 it runs once; otherwise until ``stop`` is set. A failed poll (server
        down) is logged and retried at the next interval rather than ending the loop. Each outcome
        goes to ``on_outcome`` as it happens; the return value counts outcomes by status.
        """
        stop = stop or threading.Event()
        studies = list(studies)
        counts: Counter[str] = Counter()
        while True:
            try:
                targets = list(dict.fromkeys([*studies, *(find_studies(self.client, since) if since else [])]))
                for study_uid in targets:
                    counts += self.process_study(study_uid, on_outcome)
            except DicomWebError as err:
                if poll_s <= 0:
                    raise
                log.warning("%s Retrying in %g s.", err.message, poll_s)
            if poll_s <= 0 or stop.wait(poll_s):
                return counts


def _encode(dataset: Dataset) -> bytes:
    """A retrieved dataset as the bytes of a DICOM file (what the one inference path reads)."""
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
