"""Memory of the DICOM node under what arrives: films with heatmaps, a huge C-STORE, a 4 GB association request.

    python benchmarks/dicom_memory.py [--films 20] [--big-mb 300] [--model BUNDLE] [--data ../shared/data] [--out FILE]

Runs ``pneumo dicom listen --heatmap`` as its own process (the shipped model by default) with a
pynetdicom Storage SCP in this process as the destination, and reads the node's resident memory
(``/proc/PID/status``: VmRSS now, VmHWM the peak) around each step:

- ``steady_heatmap``: RSS after ``--films`` full-resolution 12-bit DX films (real ones from
  ``--data`` when present) were answered with a report and an overlay;
- ``big_cstore``: peak growth while one ``--big-mb`` MB C-STORE is received, spooled and answered
  (issue 21: +926 MB before chunked receive);
- ``association_4gb``: growth while 64 MB of an A-ASSOCIATE-RQ that declares 4 GB are sent
  (before: buffered as it arrived).

Targets (issue 21): at most 300 MB steady with heatmaps on, at most +300 MB peak per instance.
Writes JSON (``benchmarks/results/dicom_memory.json``) and prints a table; exit status 1 when a
target is missed. Memory, not time: the load average is recorded but does not matter here.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

STEADY_TARGET_MB = 300.0
PEAK_TARGET_MB = 300.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _memory_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of ``pid`` in MB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def _reset_peak(pid: int) -> None:
    """Reset VmHWM to the current RSS (Linux: write 5 to clear_refs), so the next peak is this step's."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def _films(data: Path, n: int) -> list[bytes]:
    from app_helpers import dicom_bytes
    from PIL import Image
    from pydicom.uid import generate_uid

    files = sorted((data / "fullres_samples").rglob("*.jpeg")) if (data / "fullres_samples").is_dir() else []
    study = generate_uid()
    out = []
    for i in range(n):
        if files:
            gray = np.asarray(Image.open(files[i % len(files)]).convert("L"), dtype=np.float64)
        else:
            gray = np.random.default_rng(i).uniform(0, 255, (1500, 1200))
        out.append(
            dicom_bytes(
                np.round(gray / 255 * 4095).astype(np.uint16),
                StudyInstanceUID=study,
                SeriesInstanceUID=generate_uid(),
                PatientID="BENCH",
                ViewPosition="PA",
                InstanceNumber=i + 1,
            )
        )
    return out


def _store(port: int, datasets: list[Any]) -> list[int]:
    from pynetdicom import AE

    ae = AE(ae_title="BENCH")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 600
    for ds in datasets:
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="PNEUMO")
    if not assoc.is_established:
        raise RuntimeError("the node did not accept the association")
    try:
        return [int(assoc.send_c_store(ds).Status) for ds in datasets]
    finally:
        assoc.release()


def _sink() -> tuple[Any, int, list[int]]:
    from pynetdicom import AE, AllStoragePresentationContexts, evt

    received: list[int] = []
    ae = AE(ae_title="SINK")
    ae.supported_contexts = AllStoragePresentationContexts
    port = _free_port()

    def on_store(event: Any) -> int:
        received.append(1)
        return 0

    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    return server, port, received


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--films", type=int, default=20)
    parser.add_argument("--big-mb", type=int, default=300)
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "dicom_memory.json")
    args = parser.parse_args()

    import pydicom

    server, sink_port, received = _sink()
    port = _free_port()
    result: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as folder:
        command = [sys.executable, "-m", "pneumo.cli", "dicom", "listen", "--heatmap", "--port", str(port)]
        command += ["--destination", f"SINK@127.0.0.1:{sink_port}", "--spool", f"{folder}/spool"]
        command += ["--allow-caller", "BENCH", "--max-instance-mb", str(args.big_mb + 64)]
        command += ["--min-free-mb", "16"] + (["-m", str(args.model)] if args.model else [])
        env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
        node = subprocess.Popen(command, stderr=subprocess.PIPE, env=env, text=True)
        try:
            assert node.stderr is not None
            line = node.stderr.readline()
            while line and "pneumo DICOM node" not in line:
                line = node.stderr.readline()
            result["started_mb"] = round(_memory_mb(node.pid)[0], 1)

            films = [pydicom.dcmread(io.BytesIO(data)) for data in _films(args.data, args.films)]
            _store(port, films)
            deadline = time.monotonic() + 600
            while len(received) < 2 * len(films) and time.monotonic() < deadline:
                time.sleep(0.2)
            time.sleep(2)
            rss, peak = _memory_mb(node.pid)
            result["steady_heatmap"] = {
                "films": len(films),
                "objects_delivered": len(received),
                "rss_mb": round(rss, 1),
                "peak_mb": round(peak, 1),
                "film_px": list(films[0].pixel_array.shape),
            }
            del films

            rows = int((args.big_mb * 2**20 / 2) ** 0.5)
            from app_helpers import dicom_bytes

            big = dicom_bytes(np.zeros((rows, rows), np.uint16), StudyInstanceUID="1.2.3", SeriesInstanceUID="1.2.3.4")
            big_ds = pydicom.dcmread(io.BytesIO(big))
            del big
            _reset_peak(node.pid)
            before = _memory_mb(node.pid)[0]
            delivered = len(received)
            statuses = _store(port, [big_ds])
            deadline = time.monotonic() + 600
            while len(received) == delivered and time.monotonic() < deadline:  # its report: analysed too
                time.sleep(0.2)
            peak = _memory_mb(node.pid)[1]
            result["big_cstore"] = {
                "mb": round(rows * rows * 2 / 2**20, 1),
                "status": f"0x{statuses[0]:04X}",
                "rss_before_mb": round(before, 1),
                "peak_growth_mb": round(peak - before, 1),
            }
            del big_ds

            time.sleep(2)
            _reset_peak(node.pid)
            before = _memory_mb(node.pid)[0]
            sent = 0
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                sock.sendall(b"\x01\x00" + struct.pack(">L", 0xFFFFFFF0))
                try:
                    while sent < 64 * 2**20:
                        sock.sendall(b"\x00" * 2**20)
                        sent += 2**20
                except OSError:
                    pass
            time.sleep(1)
            peak = _memory_mb(node.pid)[1]
            result["association_4gb"] = {"bytes_sent_before_cut": sent, "peak_growth_mb": round(peak - before, 1)}
        finally:
            node.terminate()
            node.wait(timeout=120)
            server.shutdown()

    result.update(
        targets={"steady_mb": STEADY_TARGET_MB, "peak_growth_mb": PEAK_TARGET_MB},
        machine={"cpus": os.cpu_count(), "python": platform.python_version(), "load_avg_end": os.getloadavg()},
        command=" ".join(["python", "benchmarks/dicom_memory.py", *sys.argv[1:]]),
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    steady, big, rq = result["steady_heatmap"], result["big_cstore"], result["association_4gb"]
    print(f"{'step':<18} {'value':>12}  target")
    print(f"{'started':<18} {result['started_mb']:>9.1f} MB")
    print(f"{'steady, heatmaps':<18} {steady['rss_mb']:>9.1f} MB  <= {STEADY_TARGET_MB:.0f} MB")
    print(f"{'big C-STORE peak':<18} {big['peak_growth_mb']:>+9.1f} MB  <= +{PEAK_TARGET_MB:.0f} MB ({big['mb']} MB)")
    print(f"{'4 GB A-ASSOC-RQ':<18} {rq['peak_growth_mb']:>+9.1f} MB  cut after {rq['bytes_sent_before_cut']} bytes")
    print(f"wrote {args.out}")
    ok = steady["rss_mb"] <= STEADY_TARGET_MB and big["peak_growth_mb"] <= PEAK_TARGET_MB
    return 0 if ok and rq["peak_growth_mb"] <= PEAK_TARGET_MB else 1


if __name__ == "__main__":
    sys.exit(main())
