"""Inference speed on this machine, torch eager vs ONNX Runtime, side by side (the README's performance table).

    python benchmarks/bench_inference.py [--bundle BUNDLE] [--images DIR] [--gradcam] [--out FILE]

Same measurement as ``pneumo bench`` (see :mod:`pneumo.inference.bench` for what is timed and how); this
script adds the defaults used for the published table (more latency passes) and writes
``benchmarks/results/bench_inference.json``. Run it on an otherwise idle machine: the JSON
records the load average at the end of the run, so a noisy result can be recognised.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from pneumo.inference.bench import BenchSettings, format_table, run_bench

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=None, help="Model bundle (default: the shipped one).")
    parser.add_argument("--images", type=Path, default=None, help="Full-resolution images (default: synthesized).")
    parser.add_argument("--n-images", type=int, default=16, help="Synthesized images / most files taken from --images.")
    parser.add_argument("--runs", type=int, default=5, help="Passes over the images for the latency percentiles.")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=3, help="Timed batches per throughput figure.")
    parser.add_argument("--gradcam", action="store_true", help="Also time one Grad-CAM map per image.")
    parser.add_argument("--backends", default="torch,onnx", help="Comma-separated: torch, onnx.")
    parser.add_argument("--torch-threads", type=int, default=None, help="Threads of the torch backend.")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "bench_inference.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    settings = BenchSettings(
        bundle=args.bundle,
        images=args.images,
        max_images=args.n_images,
        n_synthetic=args.n_images,
        runs=args.runs,
        batch_size=args.batch_size,
        batches=args.batches,
        gradcam=args.gradcam,
        backends=tuple(b.strip() for b in args.backends.split(",") if b.strip()),
        torch_threads=args.torch_threads,
    )
    result = run_bench(settings)
    result["command"] = " ".join(["python", "benchmarks/bench_inference.py", *sys.argv[1:]])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(format_table(result))
    if "speedup_onnx_vs_torch" in result:
        print(f"ONNX Runtime / torch eager: {result['speedup_onnx_vs_torch']}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
