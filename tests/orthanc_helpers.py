"""A real Orthanc PACS on loopback for the DICOM tests and benchmark, and the instances pushed to it.

``Orthanc`` starts Debian's ``Orthanc`` binary with a generated configuration (free ports, a
temporary storage folder, the DICOMweb plugin, pneumo registered as a modality), waits for its
REST API and stops it on exit. Tests skip where the binary is absent.
"""

from __future__ import annotations

import io
import json
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pydicom
from app_helpers import dicom_bytes, xray_array
from pydicom.encaps import encapsulate
from pydicom.uid import MPEG2MPML, generate_uid

ORTHANC_BINARY = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
#: Where Debian's orthanc-dicomweb package puts the plugin.
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
ORTHANC_AET = "ORTHANC"
#: The auto-routing script of docs/dicom.md: every new CR/DX film goes to pneumo.
ROUTE_LUA = """
function OnStoredInstance(instanceId, tags, metadata, origin)
  if tags["Modality"] == "CR" or tags["Modality"] == "DX" then
    SendToModality(instanceId, "pneumo")
  end
end
"""
PNEUMO_AET = "PNEUMO"


def orthanc_available() -> str | None:
    """Why the Orthanc tests cannot run here, or ``None`` when they can."""
    if not Path(ORTHANC_BINARY).is_file():
        return "Orthanc is not installed (Debian package 'orthanc'; .ci/run installs it)"
    if not DICOMWEB_PLUGIN.is_file():
        return f"the Orthanc DICOMweb plugin is missing at {DICOMWEB_PLUGIN} (Debian package 'orthanc-dicomweb')"
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Orthanc:
    """Orthanc on loopback; ``with Orthanc(folder, pneumo_port) as pacs: pacs.rest.get(...)``."""

    def __init__(self, folder: Path, pneumo_port: int, lua: str | None = None) -> None:
        self.folder = folder
        self.lua = lua
        self.http_port, self.dicom_port = free_port(), free_port()
        self.pneumo_port = pneumo_port
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.process: subprocess.Popen[bytes] | None = None
        # A new connection per request: reusing a keep-alive connection that Orthanc is closing at that
        # moment ends in "Server disconnected without sending a response" (seen once in CI under load).
        self.rest = httpx.Client(base_url=self.url, timeout=60, limits=httpx.Limits(max_keepalive_connections=0))

    def config(self) -> dict[str, Any]:
        lua = self.folder / "route.lua"
        if self.lua is not None:
            lua.write_text(self.lua)
        return {
            "LuaScripts": [str(lua)] if self.lua is not None else [],
            "Name": "pneumo-test",
            "StorageDirectory": str(self.folder / "storage"),
            "IndexDirectory": str(self.folder / "index"),
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomAet": ORTHANC_AET,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": False,
            "DicomModalities": {"pneumo": [PNEUMO_AET, "127.0.0.1", self.pneumo_port]},
            "Plugins": [str(DICOMWEB_PLUGIN)],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False},
            "SaveJobs": False,
            "StableAge": 1,
        }

    def __enter__(self) -> Orthanc:
        config = self.folder / "orthanc.json"
        config.write_text(json.dumps(self.config(), indent=2))
        log = (self.folder / "orthanc.log").open("wb")
        self.process = subprocess.Popen([ORTHANC_BINARY, str(config)], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited at start:\n{(self.folder / 'orthanc.log').read_text()[-3000:]}")
            try:
                if self.rest.get("/system").status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.__exit__()
        raise RuntimeError("Orthanc did not answer on its REST port within 60 s")

    def __exit__(self, *exc: object) -> None:
        self.rest.close()
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    # --- REST helpers ---

    def upload(self, data: bytes) -> str:
        """Store one DICOM file; returns Orthanc's instance ID."""
        answer = self.rest.post("/instances", content=data, headers={"Content-Type": "application/dicom"})
        answer.raise_for_status()
        return str(answer.json()["ID"])

    def route_to_pneumo(self, instance_ids: list[str]) -> dict[str, Any]:
        """C-STORE the instances to the ``pneumo`` modality (synchronously)."""
        answer = self.rest.post(
            "/modalities/pneumo/store", json={"Resources": instance_ids, "Synchronous": True}, timeout=120
        )
        answer.raise_for_status()
        return dict(answer.json())

    def study_instances(self, study_uid: str) -> list[pydicom.Dataset]:
        """Every instance Orthanc holds in the study, parsed from its stored file."""
        found = self.rest.post("/tools/find", json={"Level": "Instance", "Query": {"StudyInstanceUID": study_uid}})
        found.raise_for_status()
        files = [self.rest.get(f"/instances/{iid}/file").content for iid in found.json()]
        return [pydicom.dcmread(io.BytesIO(data)) for data in files]

    def instances_of(self, study_uid: str, modality: str) -> list[pydicom.Dataset]:
        files = [self.rest.get(f"/instances/{iid}/file").content for iid in self.instance_ids(study_uid, modality)]
        return [pydicom.dcmread(io.BytesIO(data)) for data in files]

    def instance_ids(self, study_uid: str, modality: str) -> list[str]:
        """Orthanc IDs of the study's instances in series of ``modality``."""
        query = {"StudyInstanceUID": study_uid, "Modality": modality}
        found = self.rest.post("/tools/find", json={"Level": "Series", "Query": query, "Expand": True})
        found.raise_for_status()
        return [iid for series in found.json() for iid in series["Instances"]]

    def wait_for(self, study_uid: str, modality: str, count: int, timeout: float = 120) -> list[pydicom.Dataset]:
        """Poll until the study holds ``count`` instances of ``modality`` (pneumo's answers arrive asynchronously)."""
        deadline = time.monotonic() + timeout
        while len(self.instance_ids(study_uid, modality)) < count and time.monotonic() < deadline:
            time.sleep(0.1)
        return self.instances_of(study_uid, modality)


# --- the instances the tests push ---

PATIENT = {
    "PatientName": "Test^Child",
    "PatientID": "PNEUMO-TEST-0042",
    "PatientBirthDate": "20200101",
    "PatientSex": "F",
}


def study_fields(study_uid: str | None = None) -> dict[str, Any]:
    """Patient and study identifiers shared by the instances of one test study."""
    return {
        **PATIENT,
        "StudyInstanceUID": study_uid or generate_uid(),
        "StudyDate": "20240312",
        "StudyTime": "101500",
        "AccessionNumber": "ACC-7781",
        "StudyID": "S1",
        "ReferringPhysicianName": "Ref^Doctor",
    }


def study_files(study: dict[str, Any], pixels: np.ndarray | None = None) -> dict[str, bytes]:
    """Named DICOM files of one study: chest films of every kind pneumo must read, and the ones it must refuse.

    Args:
        study: :func:`study_fields`.
        pixels: 8-bit grayscale (H, W) chest picture to use; default: the synthetic one of the tests.
    """
    series = generate_uid()

    def film(
        stored: np.ndarray,
        bits: int,
        number: int,
        modality: str = "DX",
        photometric: str = "MONOCHROME2",
        **fields: Any,
    ) -> bytes:
        return dicom_bytes(
            stored,
            bits_stored=bits,
            modality=modality,
            photometric=photometric or "MONOCHROME2",
            SeriesInstanceUID=fields.pop("SeriesInstanceUID", series),
            InstanceNumber=number,
            ViewPosition=fields.pop("ViewPosition", "AP"),
            **study,
            **fields,
        )

    def scaled(bits: int) -> np.ndarray:
        if pixels is None:
            return xray_array("orthanc", size=128, bits=bits)
        values = np.round(pixels.astype(np.float64) / 255.0 * (2**bits - 1))
        return values.astype(np.uint16 if bits > 8 else np.uint8)

    files = {
        "mono2_8bit": film(scaled(8), 8, 1),
        "mono2_12bit": film(scaled(12), 12, 2, modality="CR"),
        "mono2_16bit": film(scaled(16), 16, 3),
        "mono1_12bit": film(4095 - scaled(12), 12, 4, photometric="MONOCHROME1"),
        "ct_slice": film(scaled(12), 12, 1, modality="CT", SeriesInstanceUID=generate_uid()),
        "lateral": film(scaled(12), 12, 5, ViewPosition="LL"),
    }
    # Broken: the header promises more pixels than the file holds (pydicom cannot build the array).
    broken = pydicom.dcmread(io.BytesIO(film(scaled(12), 12, 6)))
    broken.PixelData = broken.PixelData[: len(broken.PixelData) // 3]
    files["broken"] = _encode(broken)
    # Compressed with a syntax pneumo does not read (MPEG-2 video; every JPEG family is decoded since issue 21).
    compressed = pydicom.dcmread(io.BytesIO(film(scaled(12), 12, 7)))
    compressed.file_meta.TransferSyntaxUID = MPEG2MPML
    compressed.PixelData = encapsulate([b"\xff\xd8\xff\xc3 not a real codestream \xff\xd9"])
    compressed["PixelData"].VR = "OB"
    files["compressed"] = _encode(compressed)
    return files


#: What each file of :func:`study_files` must get: ``None`` a finding, else the error code in its report.
EXPECTED_CODES: dict[str, str | None] = {
    "mono2_8bit": None,
    "mono2_12bit": None,
    "mono2_16bit": None,
    "mono1_12bit": None,
    "ct_slice": "unsupported_modality",
    "lateral": "lateral_view",
    "broken": "corrupt_image",
    "compressed": "unsupported_transfer_syntax",
}


def _encode(ds: pydicom.Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def content_items(report: pydicom.Dataset) -> dict[str, pydicom.Dataset]:
    """The report's content items by concept meaning, at any depth of the TID 1500 tree."""
    from pneumo.dicom.sr import report_items

    return report_items(report)
