"""Files to probabilities on few cores: how to share them between decoding and the model (issue 23).

``Predictor.predict_many`` is bound by decoding (a full-resolution JPEG costs about as much CPU as the
model). Strategies compared, interleaved round by round on the same files, one process:

- ``overlap``: a pool of one decode thread per core works two batches ahead while the model runs
  with one thread per core (the round-5 Predictor: the cores are oversubscribed while both run);
- ``alternate``: a batch is decoded with one thread per core, then the model runs on it with one
  thread per core; never both at once;
- ``split``: the model runs with half the cores (at least one thread) while one decode thread per
  other core works two batches ahead (on 2 cores: one core each);
- ``split_all``: as ``split``, with one decode thread per core (decoding may take every core while
  the model waits for its batch);
- ``predictor``: what ``Predictor.predict_many`` does now: ``split_all``, except that a batch whose
  successors are all decoded already runs with every core;
- ``per_core``: no hand-over at all: each of one thread per core takes a chunk of ``batch / (2 x cores)``
  files, decodes it and runs a one-thread model on it (data parallel, as a multi-worker server is).

Each figure: images per second (wall) and CPU milliseconds per image (process time, all threads,
spin-waiting included). On a shared machine the wall figures move with the load; the ratios within
a round and the CPU figures move less. ``cores / CPU per image`` bounds what an otherwise idle machine
would reach.

Usage::

    PYTHONPATH=src python benchmarks/predict_many_overlap.py --out benchmarks/results/predict_many_overlap.json
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from pneumo.core.environment import available_cores
from pneumo.inference import Predictor
from pneumo.inference.bench import synthesize_xrays
from pneumo.inference.bench.floor import machine_info
from pneumo.inference.openvino import OpenVinoRunner
from pneumo.inference.runners import OnnxRunner


def _runner(predictor: Predictor, threads: int) -> Any:
    runner: Any = predictor.runner
    if isinstance(runner, OpenVinoRunner):
        return OpenVinoRunner(runner.path, graph=runner.graph, threads=threads)
    return OnnxRunner(runner.path, kind=runner.kind, threads=threads)


def _forward(predictor: Predictor, prepared: list[Any]) -> None:
    arrays = [p[1] for p in prepared if not isinstance(p, Exception)]
    if arrays:
        predictor.forward(np.stack(arrays))


def predictor(model: Predictor, blobs: list[bytes], batch: int) -> None:
    model.predict_many(blobs, batch_size=batch)


def alternate(predictor: Predictor, blobs: list[bytes], batch: int, pool: ThreadPoolExecutor) -> None:
    for start in range(0, len(blobs), batch):
        _forward(predictor, list(pool.map(predictor._decode_and_prepare, blobs[start : start + batch])))


def ahead(predictor: Predictor, blobs: list[bytes], batch: int, pool: ThreadPoolExecutor) -> None:
    """Decode threads two batches ahead of the model (what ``split`` runs, with a smaller model)."""
    futures = [pool.submit(predictor._decode_and_prepare, b) for b in blobs[: 2 * batch]]
    submitted = len(futures)
    for start in range(0, len(blobs), batch):
        done = [f.result() for f in futures[start : start + batch]]
        futures += [pool.submit(predictor._decode_and_prepare, b) for b in blobs[submitted : submitted + batch]]
        submitted = min(len(blobs), submitted + batch)
        _forward(predictor, done)


def per_core(single: Predictor, blobs: list[bytes], chunk: int, pool: ThreadPoolExecutor) -> None:
    """Each pool thread decodes its own chunk and runs ``single`` (a one-thread model) on it."""

    def work(part: list[bytes]) -> None:
        _forward(single, [single._decode_and_prepare(b) for b in part])

    list(pool.map(work, [blobs[start : start + chunk] for start in range(0, len(blobs), chunk)]))


def _strategies(
    base: Predictor,
    half: Predictor,
    single: Predictor,
    pools: dict[int, ThreadPoolExecutor],
    blobs: list[bytes],
    batch: int,
    cores: int,
) -> dict[str, Callable[[], None]]:
    rest = max(1, cores - cores // 2)
    return {
        "overlap": lambda: ahead(base, blobs, batch, pools[cores]),
        "alternate": lambda: alternate(base, blobs, batch, pools[cores]),
        "split": lambda: ahead(half, blobs, batch, pools[rest]),
        "split_all": lambda: ahead(half, blobs, batch, pools[cores]),
        "predictor": lambda: predictor(base, blobs, batch),
        "per_core": lambda: per_core(single, blobs, max(1, batch // (2 * cores)), pools[cores]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="auto,int8", help="backends to run the strategies on")
    parser.add_argument("--images", type=int, default=96, help="files per run (16 synthetic films, repeated)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/predict_many_overlap.json"))
    args = parser.parse_args()
    cores = available_cores()
    with tempfile.TemporaryDirectory() as tmp:
        films = [f.read_bytes() for f in synthesize_xrays(Path(tmp), 16)]
    blobs = [films[i % len(films)] for i in range(args.images)]
    result: dict[str, Any] = {"cores": cores, "images": args.images, "batch": args.batch}
    result["machine_before"] = machine_info()
    for backend in args.backends.split(","):
        base = Predictor(backend=backend, check_ood=False)
        half = Predictor(backend=backend, check_ood=False, runner=_runner(base, max(1, cores // 2)))
        single = Predictor(backend=backend, check_ood=False, runner=_runner(base, 1))
        pools = {n: ThreadPoolExecutor(n) for n in {cores, max(1, cores - cores // 2)}}
        strategies = _strategies(base, half, single, pools, blobs, args.batch, cores)
        for run in strategies.values():  # warm-up: pools started, first-call allocations
            run()
        wall: dict[str, list[float]] = {name: [] for name in strategies}
        cpu: dict[str, list[float]] = {name: [] for name in strategies}
        for _ in range(args.rounds):
            for name, run in strategies.items():
                c0, t0 = time.process_time(), time.perf_counter()
                run()
                wall[name].append(len(blobs) / (time.perf_counter() - t0))
                cpu[name].append((time.process_time() - c0) / len(blobs) * 1e3)
        label = f"{backend} ({base.backend}, {getattr(base.runner, 'graph', base.backend)} graph)"
        result[label] = {
            name: {
                "ips_median": round(float(np.median(wall[name])), 1),
                "ips_max": round(float(max(wall[name])), 1),
                "cpu_ms_per_image_median": round(float(np.median(cpu[name])), 2),
                "idle_bound_ips": round(cores * 1e3 / float(np.median(cpu[name])), 1),
            }
            for name in strategies
        }
        for pool in pools.values():
            pool.shutdown()
        for name, row in result[label].items():
            print(label, name, row, flush=True)
    result["machine_after"] = machine_info()
    result["loadavg"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
