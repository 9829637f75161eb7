"""Peak memory and CPU time of decoding each hostile input of issue 22, in a fresh process per input, before and after.

    python benchmarks/hostile_decode.py [--before-src /work/wt-base/src] [--only NAME ...]
                                        [--out benchmarks/results/hostile_decode.json]

Each input (made by ``tests/hostile_decode_inputs.py``) is decoded by ``read_image`` in a child
interpreter whose high-water mark is reset just before the call (after a warm-up decode, so imports
and codec plugins are not charged to the input); the figures are that peak minus the RSS before it,
the CPU seconds (user + system) and the wall seconds of the call, and the answer (the error code, or
"decodes"). The Deflated-header row calls ``pneumo.core.decode.dicom.read_header`` after, and plain
``pydicom.dcmread(..., stop_before_pixels=True)`` before (what the DICOM node did). ``--before-src``
measures an older checkout's ``src`` the same way, with the pylibjpeg codecs hidden from it (it did
not depend on them), so before and after sit side by side. A child that runs past ``--timeout``
seconds is killed and reported as such.

"After" decodes in-process, without the worker pool of ``pneumo.core.decode.isolate``: the figures
are the decoding's own cost. The ``isolated`` column decodes through the pool as the Predictor does:
its figures are the *calling* process's (the worker's cost is the "after" column), its wall
seconds the time to the answer, hand-over included.

``--films DIR`` also measures what isolation costs: each JPEG under DIR (the 14 full-resolution
films of ../shared/data/fullres_samples) decoded in draft mode in-process and through a worker,
the cost of the scan pre-check alone, and the same film as a 12-bit uncompressed DICOM (what a
PACS sends) in-process and through a worker; median of ``--repeats`` runs each.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from hostile_decode_inputs import HOSTILE_22  # noqa: E402

BUDGET_MB, BUDGET_CPU_S = 300, 2.0

_PROBE = r"""
import json, os, resource, sys, time
from pathlib import Path

hidden = set(filter(None, os.environ.get("HIDE_MODULES", "").split(",")))
if hidden:  # the code before did not install the pylibjpeg codecs: measure it without them
    import importlib.abc
    class _Hide(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in hidden:
                raise ImportError(name)
    sys.meta_path.insert(0, _Hide())
try:
    from pneumo.core.errors import PneumoError
    from pneumo.core.decode import read_image
except ImportError:  # the layout before issue 20 (core.io)
    from pneumo.core.errors import PneumoError
    from pneumo.core.io import read_image

def rss_kb(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    return 0

mode, data = sys.argv[1], Path(sys.argv[2]).read_bytes()
if mode == "header":
    try:
        from pneumo.core.decode.dicom import read_header
        from pneumo.core.decode import DEFAULT_LIMITS
        call = lambda: read_header(data, DEFAULT_LIMITS)
    except ImportError:
        import io, pydicom
        call = lambda: pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
elif mode == "isolated":
    from pneumo.core.decode.isolate import DecodePool
    pool = DecodePool(workers=1)
    call = lambda: pool.read_image(data, draft_size=224)
else:
    call = lambda: read_image(data)
for warm in sys.argv[3:]:  # warm-up (a PNG, a DICOM): imports and decoder plugins are not the input's cost
    try:
        read_image(Path(warm).read_bytes())
        if mode == "isolated":
            pool.read_image(Path(warm).read_bytes())
    except PneumoError:
        pass
try:
    Path("/proc/self/clear_refs").write_text("5")
    reset = True
except OSError:
    reset = False
before = rss_kb("VmRSS:")
cpu0, wall0 = time.process_time(), time.perf_counter()
code = "decodes"
try:
    call()
except PneumoError as err:
    code = err.code
except Exception as err:
    code = "crash: " + type(err).__name__
cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
peak = rss_kb("VmHWM:") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"peak_extra_mb": round((peak - before) / 1024, 1), "cpu_s": round(cpu, 3),
                  "wall_s": round(wall, 3), "code": code}))
"""


def measure(data: bytes, mode: str, src: Path, hide: str, timeout: float) -> dict:
    """One decode of ``data`` in a fresh child running ``src``; its peak extra RSS, CPU and wall seconds, answer."""
    from codec_inputs import film, native_dicom
    from PIL import Image

    with tempfile.TemporaryDirectory() as workdir:
        target, warm, warm_dicom = Path(workdir) / "input.bin", Path(workdir) / "warm.png", Path(workdir) / "warm.dcm"
        target.write_bytes(data)
        Image.new("L", (128, 128), 90).save(warm)
        warm_dicom.write_bytes(native_dicom(film(96, 96, 12), 12))
        env = {**os.environ, "PYTHONPATH": str(src), "HIDE_MODULES": hide, "OMP_NUM_THREADS": "1"}
        start = time.perf_counter()
        try:
            done = subprocess.run(
                [sys.executable, "-c", _PROBE, mode, str(target), str(warm), str(warm_dicom)],
                capture_output=True,
                text=True,
                timeout=timeout,
                env=env,
                check=False,
            )
        except subprocess.TimeoutExpired:
            return {"code": f"killed after {timeout:.0f} s", "wall_s": round(time.perf_counter() - start, 1)}
    if done.returncode != 0:
        return {"code": f"child died (exit {done.returncode})", "error": done.stderr.strip().splitlines()[-1:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def film_overhead(folder: Path, repeats: int) -> dict:
    """Median ms per film, JPEG and DICOM, in-process and through a worker, and the JPEG scan pre-check alone."""
    import statistics

    import numpy as np
    from codec_inputs import native_dicom
    from PIL import Image

    from pneumo.core.decode import DEFAULT_LIMITS, isolate, read_image
    from pneumo.core.decode.codestreams import check_jpeg_scans

    films = sorted(folder.rglob("*.jpeg"))
    pool = isolate.DecodePool(workers=1)
    forced = isolate.DecodePool(workers=1)
    forced.isolates = lambda fmt: True  # type: ignore[method-assign]  # every format through the worker
    forced.read_image(films[0].read_bytes(), draft_size=224)  # start the workers: not a film's cost
    pool.read_image(native_dicom(np.full((96, 96), 900, np.uint16), 12))
    rows = []
    for film in films:
        data = film.read_bytes()
        with Image.open(film) as image:
            dicom = native_dicom(np.asarray(image.convert("L"), dtype=np.uint16) * 16, 12)
        keys = ("in_process_ms", "worker_ms", "scan_check_ms", "dicom_in_process_ms", "dicom_worker_ms")
        timings: dict[str, list[float]] = {key: [] for key in keys}
        for _ in range(repeats):
            for key, call in (
                ("in_process_ms", lambda d=data: pool.read_image(d, draft_size=224)),
                ("worker_ms", lambda d=data: forced.read_image(d, draft_size=224)),
                ("scan_check_ms", lambda d=data: check_jpeg_scans(d, DEFAULT_LIMITS)),
                ("dicom_in_process_ms", lambda d=dicom: read_image(d, draft_size=224)),
                ("dicom_worker_ms", lambda d=dicom: pool.read_image(d, draft_size=224)),
            ):
                start = time.perf_counter()
                call()
                timings[key].append((time.perf_counter() - start) * 1000)
        medians = {key: round(statistics.median(values), 2) for key, values in timings.items()}
        rows.append({"film": film.name, "bytes": len(data), "dicom_bytes": len(dicom), **medians})
    pool.close()
    forced.close()
    summary = {key: round(statistics.median(row[key] for row in rows), 2) for key in rows[0] if key.endswith("_ms")}
    return {"films": len(rows), "median": summary, "rows": rows}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("--before-src", type=Path, default=None, help="src folder of the code to compare with.")
    parser.add_argument("--only", nargs="*", default=None, help="names of the inputs to measure (default: all).")
    parser.add_argument("--labels", nargs="*", default=None, help="columns to measure (before, after, isolated).")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds before a child is killed.")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "hostile_decode.json")
    parser.add_argument("--films", type=Path, default=None, help="folder of full-resolution JPEGs: isolation overhead.")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if args.films is not None:
        sys.path.insert(0, str(REPO / "src"))
        overhead = film_overhead(args.films, args.repeats)
        print(json.dumps(overhead["median"]))
        old = json.loads(args.out.read_text()) if args.out.exists() else {}
        old["isolation_overhead"] = {**overhead, "load_average": [round(x, 2) for x in os.getloadavg()]}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(old, indent=2) + "\n")
        return 0

    runs = [("after", REPO / "src", "", "decode"), ("isolated", REPO / "src", "", "isolated")]
    if args.before_src is not None:
        runs.insert(0, ("before", args.before_src.resolve(), "pylibjpeg,libjpeg,openjpeg,rle", "decode"))
    if args.labels:
        runs = [run for run in runs if run[0] in args.labels]
    old_rows = {r["input"]: r for r in json.loads(args.out.read_text())["rows"]} if args.out.exists() else {}
    rows = []
    for name, (maker, expected) in HOSTILE_22.items():
        if args.only and name not in args.only:
            continue
        data = maker()
        row: dict = {**old_rows.get(name, {}), "input": name, "file_bytes": len(data)}
        row["expected_after"] = expected or "decodes"
        for label, src, hide, mode in runs:
            if name.endswith("_header") and mode != "decode":
                continue
            row[label] = measure(data, "header" if name.endswith("_header") else mode, src, hide, args.timeout)
        rows.append(row)
        print(json.dumps(row), flush=True)
    for name, old in old_rows.items():  # rows not measured this time are kept
        if name not in {row["input"] for row in rows}:
            rows.append(old)
    ok = all(
        "after" in row
        and row["after"].get("code") == row["expected_after"]
        and (row["after"].get("peak_extra_mb") or 0) <= BUDGET_MB
        and (row["after"].get("cpu_s") or 0) <= BUDGET_CPU_S
        for row in rows
    )
    result = {
        **(json.loads(args.out.read_text()) if args.out.exists() else {}),
        "budget": {"peak_extra_mb": BUDGET_MB, "cpu_s": BUDGET_CPU_S},
        "within_budget": ok,
        "rows": rows,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "command": " ".join(["python", "benchmarks/hostile_decode.py", *sys.argv[1:]]),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    labels = ["before", "after", "isolated"]
    print(f"\n{'input':36s} " + " ".join(f"{label:>34s}" for label in labels))
    for row in rows:
        cells = []
        for label in labels:
            m = row.get(label, {})
            cells.append(
                f"{m.get('peak_extra_mb', '-')!s:>7s} MB {m.get('cpu_s', '-')!s:>7s} s {m.get('code')!s:>14.14s}"
            )
        print(f"{row['input']:36s} " + " ".join(cells))
    print(f"budget {BUDGET_MB} MB, {BUDGET_CPU_S} s CPU: {'PASS' if ok else 'FAIL'}; wrote {args.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
