"""``pneumo bench``: how fast is inference on *this* machine, per backend, measured side by side.

What is measured, for each backend (``int8`` = the bundle's quantized ONNX graph, ``fp32`` = the
fp32 ONNX graph, both under ONNX Runtime; ``openvino-int8`` and ``openvino-fp32`` = the same two
files under OpenVINO (asked for as ``openvino``; the result's ``openvino`` section says which graph
``backend="openvino"`` runs and the recorded checks); ``torch`` = eager PyTorch, registered by the
training stack; those not available here are skipped and listed; ``auto_backend`` says which one
``auto`` serves here):

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
- **decode options** (``decode_options``, :mod:`pneumo.inference.bench.decode`): JPEG decode and
  preprocess time at each draft fraction of the needed size, interleaved on the same files;
- **cold start and memory** (:mod:`pneumo.inference.bench.startup`, default backend): wall time and
  peak RSS of ``pneumo predict one.jpeg``, seconds until ``pneumo serve`` answers ``/health``, and
  the server's RSS after ``serve_predictions`` uploads.

Each backend runs in a fresh process (``isolate=True``), so its peak RSS is its own and the two
runtimes' thread pools never compete. Neither backend's thread settings are tuned by the bench:
PyTorch uses its default (one thread per core; ``torch_threads`` changes it, to show how much
eager PyTorch depends on it), ONNX Runtime the Predictor's session (one intra-op thread per core,
spin-waiting within a run only), which is what a user gets.

The result also states the **physical floor** when the caller gives the model's FLOPs per image
(``pneumo bench`` counts them with :func:`pneumo.modeling.torch_backend.model_flops` where torch is
installed: 2 FLOPs per multiply-add) over the CPU's peak
fp32 rate, assumed to be ``cores x GHz x 32`` (two 256-bit FMA units per core = 2 x 8 lanes x 2
FLOPs per cycle: AVX2 on AMD Zen and Intel Haswell and later; the GHz is the clock the kernel
reports, not a boost clock). No real network reaches that rate (depthwise convolutions are
memory-bound), so the ratio says how far from the limit the model runs, not what is attainable.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pneumo.core.decode import IMAGE_EXTENSIONS
from pneumo.inference.bench.decode import decode_options
from pneumo.inference.bench.floor import bench_versions, machine_info, physical_floor
from pneumo.inference.bench.measure import OPENVINO_PREFIX, bench_backend, bench_isolated
from pneumo.inference.bench.settings import BenchSettings, settings_json

__all__ = ["BenchSettings", "format_table", "run_bench", "synthesize_xrays"]


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
    from pneumo.inference.files import iter_image_files

    files = [p for p in iter_image_files([folder]) if p.suffix.lower() in IMAGE_EXTENSIONS]
    if not files:
        from pneumo.core.errors import PneumoError

        raise PneumoError(f"No images ({', '.join(sorted(IMAGE_EXTENSIONS))}) under {folder}.", code="no_images")
    return files[:limit]


# -------------------------------------------------------------------------------- machine, floor


def available_backends(folder: Path, wanted: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """The bench columns of ``wanted`` that can run here, and why each other one cannot.

    ``openvino`` becomes one column per graph OpenVINO can read (``openvino-int8``, ``openvino-fp32``).
    """
    from pneumo.core.bundle import read_meta
    from pneumo.inference.openvino import bundle_graphs, openvino_version
    from pneumo.inference.runners import backend_names, find_int8, find_onnx

    meta = read_meta(folder)
    reasons, columns = {}, []
    for name in wanted:
        if name == "int8" and find_int8(folder, meta) is None:
            reasons["int8"] = "the bundle has no valid INT8 graph"
        elif name == "fp32" and find_onnx(folder, meta) is None:
            reasons["fp32"] = "no fp32 ONNX export (`pneumo export onnx`, with pip install 'pneumo[train]')"
        elif name == "openvino" and openvino_version() is None:
            reasons["openvino"] = "OpenVINO is not installed (pip install 'pneumo[openvino]')"
        elif name == "openvino":
            graphs = bundle_graphs(folder, meta)
            columns += [f"{OPENVINO_PREFIX}{graph}" for graph in ("int8", "fp32") if graph in graphs]
            reasons.update({f"{OPENVINO_PREFIX}{g}": f"no {g} graph" for g in ("int8", "fp32") if g not in graphs})
        elif name not in backend_names():
            reasons[name] = "not available here (torch: pip install 'pneumo[train]')"
        else:
            columns.append(name)
    return columns, reasons


def openvino_summary(folder: Path) -> dict[str, Any]:
    """OpenVINO here: version, CPU int8 ISA, which graph ``backend="openvino"`` runs and the recorded checks."""
    from pneumo.core.bundle import read_meta
    from pneumo.core.errors import PneumoError
    from pneumo.inference.openvino import choose_graph, cpu_isa, describe_checks, openvino_version

    meta = read_meta(folder)
    summary: dict[str, Any] = {"version": openvino_version(), "cpu_isa": cpu_isa(), "checks": describe_checks(meta)}
    try:
        graph, _, unchecked = choose_graph(folder, meta)
        summary |= {"graph": graph, "checked": unchecked is None, "unchecked_reason": unchecked}
    except PneumoError as err:
        summary["unavailable"] = err.message
    return summary


def run_bench(settings: BenchSettings, *, flops: int | None = None) -> dict[str, Any]:
    """Run every available backend of ``settings`` on the same inputs and return the JSON-able result.

    ``flops``: the model's FLOPs per image, for the physical floor (not stated when None).
    """
    from pneumo.core.bundle import read_meta, resolve_bundle

    folder = resolve_bundle(settings.bundle)
    backends, skipped = available_backends(folder, settings.backends)
    result: dict[str, Any] = {"bundle": str(folder), "settings": settings_json(settings), "skipped": skipped}
    result["machine_before"] = machine_info()
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
            from pneumo.inference.bench.startup import predict_cold_start, serve_start_and_memory

            bundle = settings.bundle  # None: the default bundle, as a user runs it
            result["startup"] = {
                **predict_cold_start(files[0], bundle),
                **serve_start_and_memory(files[0], bundle, settings.serve_predictions),
            }
        if settings.draft_fractions:
            config = read_meta(folder).preprocess
            result["decode_options"] = decode_options(files, config, settings.draft_fractions, settings.runs)
        for backend in backends:
            run = bench_isolated if settings.isolate else bench_backend
            result[backend] = run(backend, folder, files, settings)
    if any(b.startswith(OPENVINO_PREFIX) for b in backends) or "openvino" in settings.backends:
        result["openvino"] = openvino_summary(folder)
    result["auto_backend"] = auto_backend(folder)
    result["machine"] = machine_info()
    result["versions"] = bench_versions()
    result["floor"] = physical_floor(flops, result["machine"]["cores"], result["machine"]["cpu_mhz"])
    for fast, slow in SPEEDUPS:
        if fast in result and slow in result:
            result[f"speedup_{fast}_vs_{slow}"] = {
                key: round(result[fast][key] / result[slow][key], 2) for key in ("throughput_ips", "e2e_throughput_ips")
            }
    return result


#: Speed-up ratios the result states, (faster, slower) where both columns ran.
SPEEDUPS = (
    ("int8", "fp32"),
    ("fp32", "torch"),
    ("int8", "torch"),
    ("openvino-int8", "int8"),
    ("openvino-fp32", "fp32"),
    ("openvino-int8", "openvino-fp32"),
)


def auto_backend(folder: Path) -> dict[str, Any]:
    """What ``backend="auto"`` serves here (loaded once in this process; its speed is in its column)."""
    from pneumo.core.errors import PneumoError
    from pneumo.inference.predictor import Predictor

    try:
        predictor = Predictor(folder, check_ood=False)
    except PneumoError as err:
        return {"backend": None, "error": err.message}
    return {"backend": predictor.backend, "graph": getattr(predictor.runner, "graph", predictor.backend)}


def _decode_lines(options: dict[str, Any] | None) -> list[str]:
    if not options:
        return []
    lines = ["", "| JPEG draft fraction | draft size | decoded short side (px) | decode p50 (ms) | decode CPU (ms) "
             "| preprocess p50 (ms) |", "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for fraction, row in options.items():
        name = f"{fraction} (default)" if row.get("default") else fraction
        lines.append(
            f"| {name} | {row['draft_size']} | {row['decoded_short_side_mean']:g} | {row['decode_p50_ms']:g} "
            f"| {row['decode_cpu_ms_mean']:g} | {row['preprocess_p50_ms']:g} |"
        )
    return lines


def format_table(result: dict[str, Any]) -> str:
    """The result as a Markdown table (one column per backend) plus the floor and the machine."""
    order = ("int8", "fp32", "openvino-int8", "openvino-fp32", "torch")
    named = [*order, *(b for b in result.get("settings", {}).get("backends", ()) if b not in order)]
    backends = [b for b in named if isinstance(result.get(b), dict) and "throughput_ips" in result[b]]
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
        ("heatmap p50 (ms; CAM from the ONNX graph)", "gradcam_p50_ms"),
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
    lines += _decode_lines(result.get("decode_options"))
    auto, openvino = result.get("auto_backend") or {}, result.get("openvino") or {}
    if auto.get("backend"):
        lines.append(f"`auto` serves here: {auto['backend']} ({auto.get('graph')} graph).")
    if openvino.get("version"):
        checked = "checked" if openvino.get("checked") else f"unchecked: {openvino.get('unchecked_reason')}"
        lines.append(
            f"OpenVINO {openvino['version']} on {openvino['cpu_isa']}: `backend=openvino` runs the "
            f"{openvino.get('graph')} graph ({checked})."
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
