"""Time from a PACS push to the report back in the PACS, through a real Orthanc on loopback.

    python benchmarks/dicom_roundtrip.py [--n 20] [--model BUNDLE] [--data ../shared/data] [--out FILE]

Starts Orthanc (Debian package) with the test configuration and pneumo's DICOM node in this
process (the shipped model by default, backend "auto" as ``pneumo dicom listen`` runs it), uploads
``--n`` chest films as 12-bit DX instances (real full-resolution films from ``--data`` when present,
else the tests' synthetic ones), answers one warm-up instance, then measures per configuration
(without and with ``--heatmap``):

- ``sequential``: for each instance alone, from the start of Orthanc's ``/modalities/pneumo/store``
  to its SR being in Orthanc (looked up by its SOP Instance UID, which pneumo derives
  deterministically); the latency a radiographer sees.
- ``batch``: all instances pushed in one request, time until the last SR is stored, divided by
  ``--n``; what a study of several films costs per film.

Target: under 2 s per instance (exit status 1 when the sequential p50 misses it). Writes JSON
and prints a table. The JSON records the load average: this machine is shared, so a noisy run
can be recognised.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from orthanc_helpers import ORTHANC_AET, PNEUMO_AET, Orthanc, free_port, orthanc_available, study_fields  # noqa: E402

TARGET_S = 2.0


def _films(data: Path, n: int) -> list[np.ndarray]:
    from PIL import Image

    files = sorted((data / "fullres_samples").rglob("*.jpeg")) if (data / "fullres_samples").is_dir() else []
    if files:
        return [np.asarray(Image.open(files[i % len(files)]).convert("L")) for i in range(n)]
    from conftest import synthetic_xray

    return [np.asarray(synthetic_xray(f"bench-{i}", i % 2 == 0, 1024)) for i in range(n)]


def _instances(films: list[np.ndarray]) -> tuple[str, list[bytes]]:
    from app_helpers import dicom_bytes
    from pydicom.uid import generate_uid

    study, series = study_fields(), generate_uid()
    files = [
        dicom_bytes(
            np.round(film.astype(np.float64) / 255 * 4095).astype(np.uint16),
            bits_stored=12,
            SeriesInstanceUID=series,
            InstanceNumber=i + 1,
            **study,
        )
        for i, film in enumerate(films)
    ]
    return str(study["StudyInstanceUID"]), files


def _report_uid(data: bytes, model: Any) -> str:
    import pydicom

    from pneumo.dicom.codes import derived_uid

    uid = str(pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).SOPInstanceUID)
    return derived_uid(uid, "pneumo-sr", model.name, model.version)


def _wait(pacs: Orthanc, report_uids: list[str], timeout: float = 300) -> float:
    deadline = time.monotonic() + timeout
    pending = list(report_uids)
    while pending:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{len(pending)} report(s) did not arrive within {timeout} s")
        if pacs.rest.post("/tools/lookup", content=pending[0]).json():
            pending.pop(0)
        else:
            time.sleep(0.005)
    return time.perf_counter()


def _measure(pacs: Orthanc, predictor: Any, heatmap: bool, n: int, films: list[np.ndarray], spool: Path) -> dict:
    from pneumo.dicom.analysis import Analyser
    from pneumo.dicom.node import Destination, DicomNode, NodeConfig
    from pneumo.dicom.policy import AccessPolicy, CallerRule

    analyser = Analyser.from_predictor(predictor, heatmap=heatmap)
    destination = Destination(ORTHANC_AET, "127.0.0.1", pacs.dicom_port)
    access = AccessPolicy(callers=(CallerRule.parse(ORTHANC_AET),))
    config = NodeConfig(destination, spool, port=pacs.pneumo_port, ae_title=PNEUMO_AET, access=access)
    with DicomNode(config, analyser):
        _, warm = _instances(films[:1])
        pacs.route_to_pneumo([pacs.upload(warm[0])])
        _wait(pacs, [_report_uid(warm[0], analyser.model)])

        _, files = _instances(films)
        ids = [pacs.upload(data) for data in files]
        sequential = []
        for iid, data in zip(ids, files):
            start = time.perf_counter()
            pacs.route_to_pneumo([iid])
            sequential.append(_wait(pacs, [_report_uid(data, analyser.model)]) - start)

        _, files = _instances(films)
        ids = [pacs.upload(data) for data in files]
        start = time.perf_counter()
        pacs.route_to_pneumo(ids)
        batch = _wait(pacs, [_report_uid(data, analyser.model) for data in files]) - start
    ordered = sorted(sequential)
    return {
        "heatmap": heatmap,
        "n": n,
        "sequential_s": {
            "p50": round(statistics.median(ordered), 3),
            "p95": round(ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))], 3),
            "max": round(ordered[-1], 3),
            "mean": round(statistics.fmean(ordered), 3),
        },
        "batch_total_s": round(batch, 3),
        "batch_per_instance_s": round(batch / n, 3),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=20, help="Instances per measurement.")
    parser.add_argument("--model", type=Path, default=None, help="Model bundle (default: the shipped one).")
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "dicom_roundtrip.json")
    args = parser.parse_args()
    reason = orthanc_available()
    if reason:
        print(f"cannot run: {reason}", file=sys.stderr)
        return 2

    from pneumo.inference.predictor import Predictor

    predictor = Predictor(args.model)
    films = _films(args.data, args.n)
    with tempfile.TemporaryDirectory() as folder, Orthanc(Path(folder), pneumo_port=free_port()) as pacs:
        runs = [
            _measure(pacs, predictor, heatmap, args.n, films, Path(folder) / f"spool{heatmap}")
            for heatmap in (False, True)
        ]
    result = {
        "runs": runs,
        "target_s": TARGET_S,
        "model": {"name": predictor.meta.name, "version": predictor.meta.version, "backend": predictor.backend},
        "films": "real full-resolution (fullres_samples)" if (args.data / "fullres_samples").is_dir() else "synthetic",
        "film_px": [int(films[0].shape[1]), int(films[0].shape[0])],
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "load_avg_end": os.getloadavg()},
        "command": " ".join(["python", "benchmarks/dicom_roundtrip.py", *sys.argv[1:]]),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'heatmap':>8} {'p50 s':>7} {'p95 s':>7} {'max s':>7} {'batch s/inst':>13}")
    for run in runs:
        seq = run["sequential_s"]
        print(
            f"{run['heatmap']!s:>8} {seq['p50']:>7} {seq['p95']:>7} {seq['max']:>7} {run['batch_per_instance_s']:>13}"
        )
    print(f"wrote {args.out}")
    return 0 if all(run["sequential_s"]["p50"] < TARGET_S for run in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
