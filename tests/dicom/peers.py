"""Real DICOM peers and fixtures for the node's tests: the test model, Orthanc, a pynetdicom Storage SCP as
destination, a node factory, SCU helpers and test films.

Test modules take the fixtures with ``from peers import *`` (``__all__`` lists the fixtures only) and import the
helpers by name: a ``conftest.py`` in this folder would shadow ``tests/conftest.py``, which the shared helpers
import by name.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from app_helpers import dicom_bytes, xray_array
from model_helpers import SURFACE_META, tiny_bundle
from orthanc_helpers import ORTHANC_AET, PNEUMO_AET, Orthanc, free_port, orthanc_available
from pydicom.uid import generate_uid

from pneumo.dicom.analysis import Analyser
from pneumo.dicom.node import Destination, DicomNode, NodeConfig, RetryPolicy
from pneumo.dicom.policy import AccessPolicy, CallerRule
from pneumo.inference import Predictor

SINK_AET = "SINK"
#: The fixtures (``from peers import *``).
__all__ = ["bundle", "node_factory", "pacs", "predictor", "sink_factory"]


class Sink:
    """A real pynetdicom Storage SCP as the destination, accepting only ``sop_classes``; keeps what it stores."""

    def __init__(self, sop_classes: list[str]) -> None:
        from pynetdicom import AE, evt

        self.received: list[pydicom.Dataset] = []
        self._lock = threading.Lock()
        ae = AE(ae_title=SINK_AET)
        for sop_class in sop_classes:
            ae.add_supported_context(sop_class, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
        self.port = free_port()
        self.server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._on)])
        self.destination = Destination(SINK_AET, "127.0.0.1", self.port)

    def _on(self, event: Any) -> int:
        with self._lock:
            self.received.append(event.dataset)
        return 0x0000

    def of_class(self, sop_class: str) -> list[pydicom.Dataset]:
        with self._lock:
            return [ds for ds in self.received if ds.SOPClassUID == sop_class]

    def close(self) -> None:
        self.server.shutdown()


def dcmtk(tool: str) -> str | None:
    """The path of dcmtk's ``tool`` (``storescu``, ``echoscu``, ``dsrdump``), not a same-named Python script."""
    for folder in ("/usr/bin", "/usr/local/bin", "/opt/homebrew/bin"):
        path = shutil.which(tool, path=folder)
        if path is not None:
            run = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30)
            if "dcmtk" in (run.stdout + run.stderr).lower() or "offis" in (run.stdout + run.stderr).lower():
                return path
    return None


def wait_until(check: Callable[[], Any], timeout: float = 60.0) -> Any:
    """Poll ``check`` until it returns something truthy (the node is asynchronous); its last value."""
    deadline = time.monotonic() + timeout
    value = check()
    while not value and time.monotonic() < deadline:
        time.sleep(0.1)
        value = check()
    return value


def audit_lines(node: DicomNode) -> list[dict[str, Any]]:
    """The node's audit log, complete lines only (the node may be writing one as it is read)."""
    assert node.config.audit_log is not None
    text = node.config.audit_log.read_text()
    return [json.loads(line) for line in text[: text.rfind("\n") + 1].splitlines()]


def audited(node: DicomNode, event: str) -> int:
    """How many ``event`` lines the audit log holds now."""
    return sum(line["event"] == event for line in audit_lines(node))


def film(**fields: Any) -> bytes:
    """A small frontal chest DX instance of a fresh study (``fields`` override the header)."""
    header = {
        "StudyInstanceUID": generate_uid(),
        "SeriesInstanceUID": generate_uid(),
        "PatientID": "P1",
        "PatientName": "Test^Child",
        "ViewPosition": "AP",
        "InstanceNumber": 1,
        **fields,
    }
    modality = header.pop("Modality", "DX")
    return dicom_bytes(xray_array(), modality=modality, **header)


def store(
    port: int, datasets: list[bytes], calling: str = "SENDER", called: str = PNEUMO_AET, **kwargs: Any
) -> list[int]:
    """C-STORE ``datasets`` with a real pynetdicom SCU: the statuses (-1: none), [] when not associated."""
    from pynetdicom import AE

    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    parsed = [pydicom.dcmread(io.BytesIO(data)) for data in datasets]
    for sop_class, syntax in dict.fromkeys((str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for ds in parsed):
        ae.add_requested_context(sop_class, syntax)
    assoc = ae.associate("127.0.0.1", port, ae_title=called, **kwargs)
    if not assoc.is_established:
        return []
    try:
        return [int(getattr(assoc.send_c_store(ds), "Status", -1)) for ds in parsed]
    finally:
        assoc.release()


def echo(port: int, calling: str = "SENDER", called: str = PNEUMO_AET, **kwargs: Any) -> bool:
    """True when a C-ECHO association with the node is established and answered."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title=called, **kwargs)
    if not assoc.is_established:
        return False
    try:
        status = assoc.send_c_echo()
        return bool(status) and int(status.Status) == 0
    finally:
        assoc.release()


@pytest.fixture(scope="session")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_bundle(tmp_path_factory.mktemp("bundle"), head="wide", **SURFACE_META)[0]


@pytest.fixture(scope="session")
def predictor(bundle: Path) -> Predictor:
    return Predictor(bundle)  # what the node runs: the bundle's ONNX graph, heatmaps from CAM


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    reason = orthanc_available()
    if reason:
        pytest.skip(reason)
    with Orthanc(tmp_path_factory.mktemp("orthanc"), pneumo_port=free_port()) as server:
        yield server


@pytest.fixture
def sink_factory() -> Iterator[Callable[..., Sink]]:
    made: list[Sink] = []

    def make(*sop_classes: str) -> Sink:
        classes = list(sop_classes) or [pydicom.uid.Comprehensive3DSRStorage, pydicom.uid.SecondaryCaptureImageStorage]
        made.append(Sink(classes))
        return made[-1]

    yield make
    for sink in made:
        sink.close()


@pytest.fixture
def node_factory(predictor: Predictor, tmp_path: Path) -> Iterator[Callable[..., DicomNode]]:
    """Start a node on a free port (``node.port``), stopped at the end; options go to :class:`NodeConfig`."""
    started: list[DicomNode] = []

    def make(destination: Destination, heatmap: bool = False, start: bool = True, **options: Any) -> DicomNode:
        options.setdefault("access", AccessPolicy(callers=(CallerRule.parse("SENDER"), CallerRule.parse(ORTHANC_AET))))
        options.setdefault("retry", RetryPolicy(max_attempts=3, first_delay_s=0.2, max_delay_s=0.5))
        options.setdefault("spool", tmp_path / f"spool{len(started)}")
        options.setdefault("audit_log", tmp_path / f"audit{len(started)}.jsonl")
        config = NodeConfig(destination, port=options.pop("port", free_port()), ae_title=PNEUMO_AET, **options)
        node = DicomNode(config, Analyser.from_predictor(predictor, heatmap))
        if start:
            node.start()
            started.append(node)
        return node

    yield make
    for node in started:
        node.stop()
