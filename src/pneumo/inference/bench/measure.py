"""Measuring one backend: latency by stage, throughput, CPU time, peak RSS (in this process or a fresh one)."""

from __future__ import annotations

import importlib
import json
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pneumo.core.errors import PneumoError
from pneumo.inference.bench.settings import BenchSettings, settings_from_json, settings_json

#: Bench columns ``openvino-int8`` and ``openvino-fp32``: OpenVINO on that graph of the bundle.
OPENVINO_PREFIX = "openvino-"


def _ms(values: Sequence[float], q: float) -> float:
    return round(float(np.percentile(np.asarray(values) * 1e3, q)), 3)


def _peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)  # Linux: kilobytes


def bench_backend(backend: str, bundle: Path | None, files: Sequence[Path], settings: BenchSettings) -> dict[str, Any]:
    """Measure one backend in this process (see :mod:`pneumo.inference.bench` for what and how)."""
    for module in settings.preload:  # e.g. the training stack's torch backend registers itself on import
        importlib.import_module(module)
    previous = None
    if backend == "torch" and settings.torch_threads:
        import torch  # only the torch backend's own settings need it

        previous = torch.get_num_threads()
        torch.set_num_threads(settings.torch_threads)
    try:
        start = time.perf_counter()
        predictor = _predictor(backend, bundle)
        return _measure(predictor, time.perf_counter() - start, files, settings)
    finally:
        if previous is not None:  # the caller's process keeps its own thread setting
            import torch

            torch.set_num_threads(previous)


def _predictor(backend: str, bundle: Path | None) -> Any:
    """The Predictor of a bench column: a backend name, or ``openvino-int8`` / ``openvino-fp32`` (that graph)."""
    from pneumo.inference.predictor import Predictor

    if not backend.startswith(OPENVINO_PREFIX):
        return Predictor(bundle, backend=backend, check_ood=False)
    from pneumo.core.bundle import read_meta, resolve_bundle
    from pneumo.inference.openvino import OpenVinoRunner, bundle_graphs

    folder = resolve_bundle(bundle)
    graph = backend.removeprefix(OPENVINO_PREFIX)
    runner = OpenVinoRunner(bundle_graphs(folder, read_meta(folder))[graph], graph=graph)
    return Predictor(folder, runner=runner, check_ood=False)


def _measure(predictor: Any, load_s: float, files: Sequence[Path], settings: BenchSettings) -> dict[str, Any]:
    blobs = [Path(f).read_bytes() for f in files]
    for blob in blobs[:2]:  # warm-up: first-call allocations, lazy initializations
        predictor.predict(blob)

    total: list[float] = []
    stages: dict[str, list[float]] = {"decode": [], "preprocess": [], "model": []}
    cpu_start = time.process_time()
    for _ in range(settings.runs):
        for blob in blobs:
            t0 = time.perf_counter()
            predictor.predict(blob)
            total.append(time.perf_counter() - t0)
    cpu_ms = (time.process_time() - cpu_start) / len(total) * 1e3
    for blob in blobs:
        t0 = time.perf_counter()
        decoded = predictor.decode(blob)
        t1 = time.perf_counter()
        tensor = predictor.prepare(decoded)[None]
        t2 = time.perf_counter()
        predictor.forward(tensor)
        stages["decode"].append(t1 - t0)
        stages["preprocess"].append(t2 - t1)
        stages["model"].append(time.perf_counter() - t2)

    batch_files = [blobs[i % len(blobs)] for i in range(settings.batch_size)]
    batch = np.stack([predictor.prepare(predictor.decode(b)) for b in batch_files])
    predictor.forward(batch)
    t0 = time.perf_counter()
    for _ in range(settings.batches):
        predictor.forward(batch)
    model_ips = settings.batches * settings.batch_size / (time.perf_counter() - t0)
    # Files to probabilities: several batches, so the decode pipeline's fill and drain weigh little.
    many = [blobs[i % len(blobs)] for i in range(settings.batches * settings.batch_size)]
    predictor.predict_many(batch_files, batch_size=settings.batch_size)  # warm-up: the decode pool starts
    t0 = time.perf_counter()
    results = predictor.predict_many(many, batch_size=settings.batch_size)
    e2e_ips = len(many) / (time.perf_counter() - t0)
    failed = sum(isinstance(r, PneumoError) for r in results)

    out: dict[str, Any] = {
        "backend": predictor.backend,
        "graph": getattr(predictor.runner, "graph", None)
        or (predictor.backend if predictor.backend != "torch" else None),
        "throughput_ips": round(model_ips, 2),
        "e2e_throughput_ips": round(e2e_ips, 2),
        "latency_p50_ms": _ms(total, 50),
        "latency_p95_ms": _ms(total, 95),
        "latency_mean_ms": round(float(np.mean(total) * 1e3), 3),
        "cpu_ms_per_image": round(cpu_ms, 3),
        "stage_p50_ms": {name: _ms(values, 50) for name, values in stages.items()},
        "load_s": round(load_s, 3),
        "threads": _torch_threads() if predictor.backend == "torch" else _onnx_threads(predictor),
        "failed": failed,
    }
    if settings.gradcam:
        out["gradcam_p50_ms"] = _gradcam_ms(predictor, blobs)
    out["peak_rss_mb"] = _peak_rss_mb()
    return out


def _torch_threads() -> int:
    import torch

    return int(torch.get_num_threads())


def _onnx_threads(predictor: Any) -> int | None:
    if getattr(predictor.runner, "threads", None):  # OpenVINO
        return int(predictor.runner.threads)
    runner = predictor.onnx_runner
    options = getattr(getattr(runner, "session", None), "get_session_options", None)
    return int(options().intra_op_num_threads) if options else None


def _gradcam_ms(predictor: Any, blobs: Sequence[bytes]) -> float | None:
    """p50 of one heatmap (decode excluded): CAM from ONNX where possible; None when no explainer works."""
    from pneumo.inference.cam import make_explainer

    try:
        explainer = make_explainer(predictor)
    except PneumoError:
        return None
    decoded = [predictor.decode(blob) for blob in blobs]
    explainer.explain(decoded[0])
    times = []
    for image in decoded:
        t0 = time.perf_counter()
        explainer.explain(image)
        times.append(time.perf_counter() - t0)
    return _ms(times, 50)


def bench_isolated(backend: str, bundle: Path | None, files: Sequence[Path], settings: BenchSettings) -> dict[str, Any]:
    """:func:`bench_backend` in a fresh Python process (clean RSS, thread pools and allocator).

    A plain subprocess rather than ``multiprocessing``: spawn re-imports the caller's
    ``__main__``, which fails under ``python -``, notebooks and some launchers.
    """
    with tempfile.TemporaryDirectory(prefix="pneumo-bench-child-") as tmp:
        out = Path(tmp) / "result.json"
        job = {
            "backend": backend,
            "bundle": str(bundle) if bundle is not None else None,
            "files": [str(f) for f in files],
            "settings": settings_json(settings),
            "out": str(out),
        }
        code = "from pneumo.inference.bench.measure import child_main; child_main()"
        proc = subprocess.run(
            [sys.executable, "-c", code], input=json.dumps(job), capture_output=True, text=True, check=False
        )
        if proc.returncode != 0 or not out.is_file():
            raise PneumoError(
                f"The {backend} benchmark process failed (exit {proc.returncode}): {proc.stderr.strip()[-1500:]}",
                code="bench_failed",
            )
        return dict(json.loads(out.read_text()))


def child_main() -> None:
    """Entry point of the benchmark subprocess: a JSON job on stdin, the result in the job's ``out`` file."""
    job = json.loads(sys.stdin.read())
    settings = settings_from_json(job["settings"])
    bundle = Path(job["bundle"]) if job["bundle"] else None
    result = bench_backend(job["backend"], bundle, [Path(f) for f in job["files"]], settings)
    Path(job["out"]).write_text(json.dumps(result))
