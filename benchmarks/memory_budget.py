"""Peak memory of decoding each hostile input of issue 12, in a fresh process per input: the decoding budget.

    python benchmarks/memory_budget.py [--before-src DIR] [--out benchmarks/results/memory_budget.json]

Each input (made by ``tests/hostile_inputs.py``: a Deflated DICOM whose private element inflates
to 1 GB, a DICOM whose JPEG frame declares 13000 x 13000, flat 16-bit PNG, float TIFF and RGBA
PNG of 6000 x 6000) is decoded by ``pneumo.core.decode.read_image`` in a child interpreter whose
high-water mark is reset just before the call; the figure is that peak minus the RSS before it.
``--before-src`` measures another checkout's ``src`` too (e.g. ``git archive d910f73 src | tar -x
-C /tmp/before``), so before/after sit side by side. The budget is 300 MB (docs/reliability.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from hostile_inputs import HOSTILE, measure_decode  # noqa: E402

BUDGET_MB = 300


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("--before-src", type=Path, default=None, help="src folder of the code to compare with.")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "memory_budget.json")
    args = parser.parse_args()

    sources = {"after": REPO / "src"}
    if args.before_src is not None:
        sources = {"before": args.before_src.resolve(), **sources}
    rows = []
    for name, (maker, expected) in HOSTILE.items():
        data = maker()
        row = {"input": name, "file_bytes": len(data), "expected": expected or "decodes"}
        for label, src in sources.items():
            env = {**os.environ, "PYTHONPATH": str(src)}
            with tempfile.TemporaryDirectory() as workdir:
                start = time.perf_counter()
                measured = measure_decode(data, Path(workdir), env)
            row[label] = {**measured, "seconds": round(time.perf_counter() - start, 2)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    after_ok = all(
        (row["after"].get("peak_extra_mb") or 0) <= BUDGET_MB and row["after"].get("code") == HOSTILE[row["input"]][1]
        for row in rows
    )
    result = {
        "budget_mb": BUDGET_MB,
        "within_budget": after_ok,
        "rows": rows,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "command": " ".join(["python", "benchmarks/memory_budget.py", *sys.argv[1:]]),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"\n{'input':24s} {'bytes':>10s} "
        + " ".join(f"{label + ' MB':>10s} {label + ' code':>20s}" for label in sources)
    )
    for row in rows:
        cells = " ".join(f"{row[label]['peak_extra_mb']!s:>10s} {row[label]['code']!s:>20s}" for label in sources)
        print(f"{row['input']:24s} {row['file_bytes']:10d} {cells}")
    print(f"budget {BUDGET_MB} MB: {'PASS' if after_ok else 'FAIL'}; wrote {args.out}")
    return 0 if after_ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
