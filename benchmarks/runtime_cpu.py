"""Model-only cost per image of ONNX Runtime and OpenVINO on the default bundle's two graphs, at 1 and 2 threads.

Reports, per runner, wall time and **process CPU time** per image at batch 1 and batch 32. On a
shared machine the wall figures move with everyone else's load; the CPU figures move far less and
say what each runtime costs a core (``cores x 1000 / CPU ms`` bounds an idle machine's throughput).
The eight runners are measured in interleaved rounds in one process (issue 23, docs/performance.md).

Usage::

    PYTHONPATH=src python benchmarks/runtime_cpu.py --out benchmarks/results/model_cpu_round6.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from pneumo.core.bundle import default_bundle_path, read_meta
from pneumo.inference.openvino import OpenVinoRunner
from pneumo.inference.runners import OnnxRunner, find_int8, find_onnx


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/model_cpu_round6.json"))
    args = parser.parse_args()
    folder = default_bundle_path()
    meta = read_meta(folder)
    int8, fp32 = find_int8(folder, meta), find_onnx(folder, meta)
    if int8 is None or fp32 is None:
        raise SystemExit("needs the INT8 graph and the fp32 export (`pneumo export onnx`)")
    size = meta.preprocess.input_size
    rng = np.random.default_rng(0)
    one = rng.normal(0, 0.5, (1, 3, size, size)).astype(np.float32)
    batch = rng.normal(0, 0.5, (32, 3, size, size)).astype(np.float32)
    runners: dict[str, Any] = {}
    for threads in (1, 2):
        runners |= {
            f"ort-int8 t{threads}": OnnxRunner(int8, kind="int8", threads=threads),
            f"ort-fp32 t{threads}": OnnxRunner(fp32, threads=threads),
            f"ov-int8 t{threads}": OpenVinoRunner(int8, graph="int8", threads=threads),
            f"ov-fp32 t{threads}": OpenVinoRunner(fp32, graph="fp32", threads=threads),
        }
    for run in runners.values():
        run(one), run(batch)
    figures: dict[str, dict[str, list[float]]] = {k: {"w1": [], "c1": [], "w32": [], "c32": []} for k in runners}
    for _ in range(args.rounds):
        for name, run in runners.items():
            for _ in range(10):
                t0, c0 = time.perf_counter(), time.process_time()
                run(one)
                figures[name]["w1"].append(time.perf_counter() - t0)
                figures[name]["c1"].append(time.process_time() - c0)
            t0, c0 = time.perf_counter(), time.process_time()
            run(batch)
            figures[name]["w32"].append(time.perf_counter() - t0)
            figures[name]["c32"].append((time.process_time() - c0) / len(batch))
    result: dict[str, Any] = {}
    for name, f in figures.items():
        result[name] = {
            "b1_cpu_ms_median": round(float(np.median(f["c1"])) * 1e3, 2),
            "b1_wall_ms_min": round(min(f["w1"]) * 1e3, 2),
            "b1_wall_ms_p50": round(float(np.median(f["w1"])) * 1e3, 2),
            "b32_cpu_ms_per_image_median": round(float(np.median(f["c32"])) * 1e3, 2),
            "b32_ips_max": round(len(batch) / min(f["w32"]), 1),
            "b32_ips_median": round(len(batch) / float(np.median(f["w32"])), 1),
        }
        print(name, result[name], flush=True)
    result["loadavg"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
