"""``pneumo bench``: inference speed and memory on this machine, per backend, side by side."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from pneumo.cli.common import ModelOption, fail


def bench(
    model: ModelOption = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the full result as JSON here.")] = None,
    images: Annotated[
        Path | None, typer.Option(help="Folder of full-resolution images; default: synthesized 1500-2500 px JPEGs.")
    ] = None,
    gradcam: Annotated[bool, typer.Option("--gradcam", help="Also time one heatmap per image.")] = False,
    backends: Annotated[
        str, typer.Option(help="Comma-separated backends to compare (those unavailable here are skipped).")
    ] = "int8,fp32,openvino,torch",
    draft_fractions: Annotated[
        str, typer.Option(help="JPEG draft fractions of the input size to time decoding at (empty: none).")
    ] = "1,0.75,0.5",
    runs: Annotated[int, typer.Option(help="Passes over the images for the latency percentiles.")] = 3,
    n_images: Annotated[int, typer.Option(help="Images: synthesized, or at most this many from --images.")] = 16,
    batch_size: Annotated[int, typer.Option(help="Batch size of the throughput figures.")] = 32,
    batches: Annotated[int, typer.Option(help="Timed batches per throughput figure.")] = 3,
    isolate: Annotated[bool, typer.Option(help="Run each backend in a fresh process (clean peak RSS).")] = True,
    torch_threads: Annotated[int | None, typer.Option(help="Threads of the torch backend (default: torch's).")] = None,
    startup: Annotated[bool, typer.Option(help="Also measure cold start and serving RSS.")] = True,
    serve_predictions: Annotated[
        int, typer.Option(help="Uploads sent to `pneumo serve` before reading its RSS.")
    ] = 1000,
) -> None:
    """Latency, throughput and peak memory of inference on this machine, per backend, side by side.

    The torch backend and the fp32 export come from the training stack: where it is installed, the
    fp32 graph is exported first when missing (an explicit step, timed apart) and the model's FLOPs
    give the physical floor.
    """
    import importlib.util
    import time

    from pneumo.core.bundle import read_meta, resolve_bundle
    from pneumo.core.errors import PneumoError
    from pneumo.inference.bench import BenchSettings, format_table, run_bench
    from pneumo.inference.runners import find_onnx

    chosen = tuple(b.strip() for b in backends.split(",") if b.strip())
    if not chosen or any(b not in ("int8", "fp32", "openvino", "torch") for b in chosen):
        fail(f"--backends takes int8, fp32, openvino and/or torch, comma-separated; got {backends!r}.")
    try:
        fractions = tuple(float(f) for f in draft_fractions.split(",") if f.strip())
    except ValueError:
        fractions = (-1.0,)
    if any(not 0.0 < f <= 1.0 for f in fractions):
        fail(f"--draft-fractions takes numbers in (0, 1], comma-separated; got {draft_fractions!r}.")
    has_torch = importlib.util.find_spec("torch") is not None
    flops, export_s, preload = None, None, tuple[str, ...]()
    try:
        folder = resolve_bundle(model)
        if has_torch:
            from pneumo.modeling.export import export_onnx
            from pneumo.modeling.torch_backend import model_flops

            flops = model_flops(folder)
            preload = ("pneumo.modeling.torch_backend",)
            if {"fp32", "openvino"} & set(chosen) and find_onnx(folder, read_meta(folder)) is None:
                start = time.perf_counter()
                export_onnx(folder)
                export_s = round(time.perf_counter() - start, 2)
    except PneumoError as err:
        fail(err.message)
    settings = BenchSettings(
        bundle=model,
        images=images,
        max_images=n_images,
        n_synthetic=n_images,
        runs=runs,
        batch_size=batch_size,
        batches=batches,
        gradcam=gradcam,
        backends=chosen,
        preload=preload,
        isolate=isolate,
        torch_threads=torch_threads,
        startup=startup,
        serve_predictions=serve_predictions,
        draft_fractions=fractions,
    )
    try:
        result = run_bench(settings, flops=flops)
    except PneumoError as err:
        fail(err.message)
    if export_s is not None:
        result["fp32_export_s"] = export_s
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(result, indent=2) + "\n")
    typer.echo(format_table(result))
