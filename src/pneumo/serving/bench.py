"""``pneumo bench``: how fast is inference on *this* machine, per backend, measured side by side.

What is measured, for each backend (``int8`` = the bundle's quantized ONNX graph, ``onnx`` = the
fp32 ONNX graph, ``torch`` = eager PyTorch; those not available here are skipped and listed):

- **latency** (p50, p95, ms): one full-resolution JPEG, from its bytes in memory to the
  calibrated probability (:meth:`Predictor.predict`: decode, preprocess, model, answer), and the
  median of each stage, so a slow total says where its time goes;
- **throughput** (images/s): the model alone on preprocessed batches of 32 (``throughput_ips``),
  and files to probabilities through :meth:`Predictor.predict_many` at batch 32 (``e2e_throughput_ips``);
- **CPU time** per single image, all threads, spin-waiting included: it shows what a backend
  costs the rest of the machine (and exposes thread pools that burn cores while waiting);
- **peak RSS** (MB) of the process;
- optionally the cost of one heatmap (``--gradcam``): CAM from the ONNX graph on the ONNX
  backends, Grad-CAM on the torch one;
- **cold start and memory** (:mod:`pneumo.serving.bench_startup`, default backend): wall time and
  peak RSS of ``pneumo predict one.jpeg``, seconds until ``pneumo serve`` answers ``/health``, and
  the server's RSS after ``serve_predictions`` uploads.

Each backend runs in a fresh process (``isolate=True``), so its peak RSS is its own and the two
runtimes' thread pools never compete. Neither backend's thread settings are tuned by the bench:
PyTorch uses its default (one thread per core; ``torch_threads`` changes it, to show how much
eager PyTorch depends on it), ONNX Runtime the Predictor's session (one intra-op thread per core,
spin-waiting within a run only), which is what a user gets.

The result also states the **physical floor**: the model's FLOPs per image
(:class:`torch.utils.flop_counter.FlopCounterMode`, 2 FLOPs per multiply-add) over the CPU's peak
fp32 rate, assumed to be ``cores x GHz x 32`` (two 256-bit FMA units per core = 2 x 8 lanes x 2
FLOPs per cycle: AVX2 on AMD Zen and Intel Haswell and later; the GHz is the clock the kernel
reports, not a boost clock). No real network reaches that rate (depthwise convolutions are
memory-bound), so the ratio says how far from the limit the model runs, not what is attainable.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pneumo.core.io import IMAGE_EXTENSIONS
from pneumo.serving.bench_floor import bench_versions, machine_info, model_flops, physical_floor


@dataclass
class BenchSettings:
    """What ``pneumo bench`` runs.

    Attributes:
        bundle: the model bundle; None is the default bundle.
        images: folder of full-resolution images; None synthesizes ``n_synthetic`` JPEGs.
        max_images: at most this many files are taken from ``images``.
        n_synthetic: number of synthetic JPEGs (1500-2500 px, grayscale, quality 92).
        runs: passes over the images for the latency percentiles.
        batch_size: batch of the throughput measurements.
        batches: timed batches per throughput figure (after one warm-up batch).
        gradcam: also time one Grad-CAM map per image.
        backends: the backends to compare.
        isolate: run each backend in a fresh process (clean peak RSS, no competing thread pools).
        torch_threads: intra-op threads of the torch backend; None keeps torch's default (one per core).
        startup: also measure cold start and serving memory (:mod:`pneumo.serving.bench_startup`;
            on by default in ``pneumo bench``, off here so library callers opt in to ~1 min of extra work).
        serve_predictions: uploads sent to the server before its RSS is read.
    """

    bundle: Path | None = None
    images: Path | None = None
    max_images: int = 32
    n_synthetic: int = 16
    runs: int = 3
    batch_size: int = 32
    batches: int = 3
    gradcam: bool = False
    backends: tuple[str, ...] = ("int8", "onnx", "torch")
    isolate: bool = True
    torch_threads: int | None = None
    startup: bool = False
    serve_predictions: int = 1000


# ------------------------------------------------------------------------------------------- inputs


def synthesize_xrays(out_dir: Path, n: int, *, seed: int = 0) -> list[Path]:
    """Write ``n`` chest-like grayscale JPEGs of realistic size and entropy (1500-2500 px long side).

    Decoding time depends on the pixels and on the entropy-coded bytes, so the pictures have
    anatomy-like structure, rib texture and sensor noise, and come out at ~0.15-0.2 bytes per
    pixel, between the dataset's NORMAL (~0.26) and PNEUMONIA (~0.08) originals.
    """
    rng = np.random.default_rng(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(n):
        width = int(rng.integers(1500, 2501))
        height = int(width * rng.uniform(0.75, 0.95))
        y, x = (grid.astype(np.float32) for grid in np.mgrid[0:height, 0:width])
        x, y = x / width, y / height
        pixels = 170.0 - 90.0 * np.abs(x - 0.5) - 40.0 * (y - 0.5) ** 2
        for centre in (0.32, 0.68):
            pixels[((x - centre) / 0.16) ** 2 + ((y - 0.5) / 0.32) ** 2 < 1.0] -= 80.0
        pixels += 18.0 * np.sin(2 * np.pi * (14 * y + 4 * np.abs(x - 0.5))) * (np.abs(x - 0.5) > 0.05)
        field = rng.normal(0.0, 1.0, (height // 64 + 1, width // 64 + 1)).astype(np.float32)
        pixels += 12.0 * np.asarray(Image.fromarray(field, mode="F").resize((width, height), Image.Resampling.BICUBIC))
        pixels += rng.normal(0.0, 3.0, pixels.shape).astype(np.float32)
        path = out_dir / f"synthetic_{index:03d}.jpeg"
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), mode="L").save(path, quality=92)
        paths.append(path)
    return paths


def _image_files(folder: Path, limit: int) -> list[Path]:
    from pneumo.serving.inference import iter_image_files

    files = [p for p in iter_image_files([folder]) if p.suffix.lower() in IMAGE_EXTENSIONS]
    if not files:
        from pneumo.core.errors import PneumoError

        raise PneumoError(f"No images ({', '.join(sorted(IMAGE_EXTENSIONS))}) under {folder}.", code="no_images")
    return files[:limit]


# ------------------------------------------------------------------------------------- measurement


def _ms(values: Sequence[float], q: float) -> float:
    return round(float(np.percentile(np.asarray(values) * 1e3, q)), 3)


def _peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)  # Linux: kilobytes


def bench_backend(backend: str, bundle: Path | None, files: Sequence[Path], settings: BenchSettings) -> dict[str, Any]:
    """Measure one backend in this process (see the module docstring for what and how)."""
    from pneumo.serving.inference import Predictor

    previous = None
    if backend == "torch" and settings.torch_threads:
        import torch  # only the torch backend's own settings need it

        previous = torch.get_num_threads()
        torch.set_num_threads(settings.torch_threads)
    try:
        start = time.perf_counter()
        predictor = Predictor(bundle, backend=backend, check_ood=False)
        return _measure(predictor, time.perf_counter() - start, files, settings)
    finally:
        if previous is not None:  # the caller's process keeps its own thread setting
            import torch

            torch.set_num_threads(previous)


def _measure(predictor: Any, load_s: float, files: Sequence[Path], settings: BenchSettings) -> dict[str, Any]:
    from pneumo.core.errors import PneumoError

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
    t0 = time.perf_counter()
    results = predictor.predict_many(batch_files, batch_size=settings.batch_size)
    e2e_ips = len(batch_files) / (time.perf_counter() - t0)
    failed = sum(isinstance(r, PneumoError) for r in results)

    out: dict[str, Any] = {
        "backend": predictor.backend,
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
    runner = getattr(predictor, "_onnx", None)
    options = getattr(getattr(runner, "session", None), "get_session_options", None)
    return int(options().intra_op_num_threads) if options else None


def _gradcam_ms(predictor: Any, blobs: Sequence[bytes]) -> float | None:
    """p50 of one heatmap (decode excluded): CAM from ONNX where possible; None when no explainer works."""
    from pneumo.core.errors import PneumoError
    from pneumo.serving.cam import make_explainer

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


def _bench_isolated(
    backend: str, bundle: Path | None, files: Sequence[Path], settings: BenchSettings
) -> dict[str, Any]:
    """:func:`bench_backend` in a fresh Python process (clean RSS, thread pools and allocator).

    A plain subprocess rather than ``multiprocessing``: spawn re-imports the caller's
    ``__main__``, which fails under ``python -``, notebooks and some launchers.
    """
    from pneumo.core.errors import PneumoError

    with tempfile.TemporaryDirectory(prefix="pneumo-bench-child-") as tmp:
        out = Path(tmp) / "result.json"
        job = {
            "backend": backend,
            "bundle": str(bundle) if bundle is not None else None,
            "files": [str(f) for f in files],
            "settings": _settings_json(settings),
            "out": str(out),
        }
        code = "from pneumo.serving.bench import _child_main; _child_main()"
        proc = subprocess.run(
            [sys.executable, "-c", code], input=json.dumps(job), capture_output=True, text=True, check=False
        )
        if proc.returncode != 0 or not out.is_file():
            raise PneumoError(
                f"The {backend} benchmark process failed (exit {proc.returncode}): {proc.stderr.strip()[-1500:]}",
                code="bench_failed",
            )
        return dict(json.loads(out.read_text()))


def _settings_json(settings: BenchSettings) -> dict[str, Any]:
    data = asdict(settings)
    for key in ("bundle", "images"):
        data[key] = str(data[key]) if data[key] is not None else None
    data["backends"] = list(settings.backends)
    return data


def _child_main() -> None:
    """Entry point of the benchmark subprocess: a JSON job on stdin, the result in the job's ``out`` file."""
    job = json.loads(sys.stdin.read())
    raw = job["settings"]
    settings = BenchSettings(
        **{
            **raw,
            "bundle": Path(raw["bundle"]) if raw["bundle"] else None,
            "images": Path(raw["images"]) if raw["images"] else None,
            "backends": tuple(raw["backends"]),
        }
    )
    bundle = Path(job["bundle"]) if job["bundle"] else None
    result = bench_backend(job["backend"], bundle, [Path(f) for f in job["files"]], settings)
    Path(job["out"]).write_text(json.dumps(result))


# -------------------------------------------------------------------------------- machine, floor


def available_backends(folder: Path, wanted: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """The backends of ``wanted`` that can run here, and why each other one cannot."""
    import importlib.util

    from pneumo.serving.onnx_runtime import INT8_FILE, find_int8, find_onnx

    has_torch = importlib.util.find_spec("torch") is not None
    reasons = {}
    if "int8" in wanted and find_int8(folder) is None:
        reasons["int8"] = f"the bundle has no valid {INT8_FILE}"
    if "onnx" in wanted and not has_torch and find_onnx(folder) is None:
        reasons["onnx"] = "no fp32 ONNX export, and exporting one needs torch (pip install 'pneumo[train]')"
    if "torch" in wanted and not has_torch:
        reasons["torch"] = "torch is not installed (pip install 'pneumo[train]')"
    return [b for b in wanted if b not in reasons], reasons


def run_bench(settings: BenchSettings) -> dict[str, Any]:
    """Run every available backend of ``settings`` on the same inputs and return the JSON-able result."""
    from pneumo.core.bundle import resolve_bundle
    from pneumo.serving.onnx_runtime import find_onnx, select_onnx_runner

    folder = resolve_bundle(settings.bundle)
    backends, skipped = available_backends(folder, settings.backends)
    result: dict[str, Any] = {"bundle": str(folder), "settings": _settings_json(settings), "skipped": skipped}
    result["machine_before"] = machine_info()
    if "onnx" in backends and find_onnx(folder) is None:
        start = time.perf_counter()  # export once, here, so neither child pays it inside a measurement
        select_onnx_runner(folder, "onnx")
        result["onnx_export_s"] = round(time.perf_counter() - start, 2)
    with tempfile.TemporaryDirectory(prefix="pneumo-bench-") as tmp:
        if settings.images is not None:
            files = _image_files(settings.images, settings.max_images)
            result["inputs"] = f"{len(files)} files from {settings.images}"
        else:
            files = synthesize_xrays(Path(tmp), settings.n_synthetic)
            result["inputs"] = f"{len(files)} synthetic grayscale JPEGs, 1500-2500 px, quality 92"
        sizes = [Image.open(f).size for f in files]
        result["input_pixels_mean"] = int(np.mean([w * h for w, h in sizes]))
        result["input_bytes_mean"] = int(np.mean([f.stat().st_size for f in files]))
        if settings.startup:
            from pneumo.serving.bench_startup import predict_cold_start, serve_start_and_memory

            bundle = settings.bundle  # None: the default bundle, as a user runs it
            result["startup"] = {
                **predict_cold_start(files[0], bundle),
                **serve_start_and_memory(files[0], bundle, settings.serve_predictions),
            }
        for backend in backends:
            run = _bench_isolated if settings.isolate else bench_backend
            result[backend] = run(backend, folder, files, settings)
    result["machine"] = machine_info()
    result["versions"] = bench_versions()
    result["floor"] = physical_floor(model_flops(folder), result["machine"]["cores"], result["machine"]["cpu_mhz"])
    for fast, slow in (("int8", "onnx"), ("onnx", "torch"), ("int8", "torch")):
        if fast in result and slow in result:
            result[f"speedup_{fast}_vs_{slow}"] = {
                key: round(result[fast][key] / result[slow][key], 2) for key in ("throughput_ips", "e2e_throughput_ips")
            }
    return result


def format_table(result: dict[str, Any]) -> str:
    """The result as a Markdown table (one column per backend) plus the floor and the machine."""
    backends = [b for b in ("int8", "onnx", "torch") if b in result]
    batch = result.get("settings", {}).get("batch_size", 32)
    rows = [
        (f"model throughput, batch {batch} (img/s)", "throughput_ips"),
        (f"files -> probabilities, batch {batch} (img/s)", "e2e_throughput_ips"),
        ("single image, file bytes -> probability, p50 (ms)", "latency_p50_ms"),
        ("single image, p95 (ms)", "latency_p95_ms"),
        ("single image, CPU time, all threads (ms)", "cpu_ms_per_image"),
        ("  decode (JPEG draft) p50 (ms)", ("stage_p50_ms", "decode")),
        ("  preprocess (resize, normalize) p50 (ms)", ("stage_p50_ms", "preprocess")),
        ("  model p50 (ms)", ("stage_p50_ms", "model")),
        ("heatmap p50 (ms; CAM from ONNX, Grad-CAM on torch)", "gradcam_p50_ms"),
        ("peak RSS (MB)", "peak_rss_mb"),
    ]
    lines = ["| | " + " | ".join(backends) + " |", "|---|" + "---:|" * len(backends)]
    for label, key in rows:
        cells = []
        for backend in backends:
            value = result[backend]
            for part in key if isinstance(key, tuple) else (key,):
                value = value.get(part) if isinstance(value, dict) else None
            cells.append("-" if value is None else f"{value:g}")
        if any(cell != "-" for cell in cells):
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    machine, floor = result["machine"], result["floor"]
    startup = result.get("startup")
    if startup:
        lines.append("")
        lines.append(
            f"Cold start (default backend): `pneumo predict one.jpeg` {startup.get('predict_cli_wall_s')} s wall, "
            f"peak RSS {startup.get('predict_cli_peak_rss_mb')} MB, torch imported: "
            f"{startup.get('predict_cli_torch_imported')}; `pneumo serve` ready in {startup.get('serve_ready_s')} s, "
            f"RSS {startup.get('serve_rss_mb_after')} MB after {startup.get('serve_predictions')} predictions."
        )
    for backend, why in result.get("skipped", {}).items():
        lines.append(f"Skipped {backend}: {why}.")
    lines.append("")
    flags = ", ".join(machine.get("cpu_flags") or []) or "flags unknown"
    load = machine["loadavg_1m"]
    lines.append(f"Machine: {machine['cores']} cores, {machine['cpu_model']} ({flags}), load average {load}.")
    if floor.get("peak_gflops"):
        lines.append(
            f"Floor: {floor['gflops_per_image']} GFLOP/image at {floor['peak_gflops']} GFLOP/s peak "
            f"({floor['assumption']}) = {floor['floor_ms_per_image']} ms/image, {floor['ceiling_ips']} img/s."
        )
    return "\n".join(lines)
