"""The ``pneumo`` command line (typer): train, evaluate, predict, compare, export, app, serve, bench, dicom, dicomweb.

Each command is a thin wrapper: it parses options, calls one library function and reports.
Heavy imports happen inside the commands so ``pneumo --help`` stays fast.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from pneumo.cli import output
from pneumo.cli import train as train_command

app = typer.Typer(
    name="pneumo",
    help="Pneumonia detection on pediatric chest X-rays (decision support, not a diagnosis).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

ModelOption = Annotated[
    Path | None, typer.Option("--model", "-m", help="Model bundle folder; default: the bundle shipped with pneumo.")
]


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (test runners swap it per invocation)."""

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def _setup_logging(verbose: bool) -> None:
    # Configure pneumo's own logger only: Lightning and others keep their handlers (no duplicate lines).
    logger = logging.getLogger("pneumo")
    if not logger.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO if verbose else logging.WARNING)


def _require_train_extra(command: str) -> None:
    """Stop with one line when a training-stack command runs from the base (serving-only) install."""
    import importlib.util

    missing = [name for name in ("torch", "timm", "lightning") if importlib.util.find_spec(name) is None]
    if missing:
        need = ", ".join(missing)
        _fail(f"`pneumo {command}` needs the training extra ({need} missing): pip install 'pneumo[train]'")


def _fail(message: str, code: int = 2) -> None:
    """Print a one-line error (never a traceback) and exit."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log progress details.")] = False) -> None:
    """Pneumonia detection on pediatric chest X-rays."""
    _setup_logging(verbose)


# ----------------------------------------------------------------------------------------- predict


@app.command()
def predict(
    inputs: Annotated[
        list[Path],
        # readable=False: click would refuse an unreadable path as a usage error and drop every row;
        # pneumo gives it an ``unreadable_file`` row instead, like any other bad input.
        typer.Argument(help="Image files (JPEG, PNG, DICOM) or folders of them.", readable=False),
    ],
    model: ModelOption = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the results as a JSON list here.")] = None,
    csv_out: Annotated[Path | None, typer.Option("--csv", help="Write the results as CSV here.")] = None,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 16,
    no_ood: Annotated[
        bool, typer.Option("--no-ood", help="Do not refuse images the not-a-chest-X-ray gate rejects (score kept).")
    ] = False,
) -> None:
    """Classify files; one row per input file (result or error), in input order.

    Exits with status 1 when any file failed, so scripts notice.
    """
    from pneumo.core.errors import PneumoError
    from pneumo.serving.inference import Predictor, iter_image_files

    for out in (json_out, csv_out):  # before predicting: a bad output path must not cost the results
        if out is not None:
            output.check_output(out, _fail)
    try:
        predictor = Predictor(model, check_ood=not no_ood)
    except PneumoError as err:
        _fail(err.message)
    files = iter_image_files(inputs)
    if not files:
        _fail("no input files found.")
    rows = output.prediction_rows(files, predictor.predict_many(files, batch_size=batch_size))
    failed = sum("error" in row for row in rows)
    for row in rows:
        if "error" in row:
            typer.echo(f"{row['file']}\tERROR {row['error']['code']}: {row['error']['message']}")
        else:
            typer.echo(f"{row['file']}\t{row['label']}\tp={row['probability']:.3f}\t(threshold {row['threshold']:.3f})")
    output.write_rows(rows, json_out, csv_out, lambda message, code: _fail(message, code))
    typer.echo(f"{len(rows) - failed} predicted, {failed} failed", err=True)
    if failed:
        raise typer.Exit(1)


# ------------------------------------------------------------------------------------------- train


train_command.register(app, lambda message: _fail(message), _require_train_extra)


# ---------------------------------------------------------------------------------------- evaluate


@app.command()
def evaluate(
    data: Annotated[Path, typer.Argument(help="Folder with NORMAL/ and PNEUMONIA/, or a Kaggle root (uses test/).")],
    model: ModelOption = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the metrics JSON here.")] = None,
    out: Annotated[Path | None, typer.Option(help="Folder for report.md and plots (default: next to --json).")] = None,
    n_boot: Annotated[int, typer.Option(help="Bootstrap resamples for the 95% CIs.")] = 1000,
) -> None:
    """Metrics with bootstrap 95% CIs, a Markdown report and ROC/PR/confusion/reliability plots."""
    from pneumo.core.errors import PneumoError

    _require_train_extra("evaluate")
    from pneumo.evaluation.evaluate import evaluate_folder

    try:
        report = evaluate_folder(data, model, json_out=json_out, out_dir=out, n_boot=n_boot)
    except PneumoError as err:
        _fail(err.message)
    ci = report.get("ci", {})
    for key in ("n_images", "accuracy", "sensitivity", "specificity", "roc_auc", "threshold"):
        value = report.get(key)
        bounds = ci.get(key)
        extra = f"  (95% CI {bounds[0]:.3f}-{bounds[1]:.3f})" if bounds else ""
        typer.echo(f"{key:12s} {value if isinstance(value, int) else format(value or 0.0, '.4f')}{extra}")
    if report.get("n_failed"):
        typer.echo(f"{report['n_failed']} files could not be read; see failures in the JSON", err=True)


# -------------------------------------------------------------------------------------- robustness


@app.command()
def robustness(
    data: Annotated[Path, typer.Argument(help="The training data root the bundle was trained on (Kaggle layout).")],
    model: ModelOption = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the full report JSON here.")] = None,
    val_fraction: Annotated[float, typer.Option(help="As in training: share carved out by patient.")] = 0.15,
    seed: Annotated[int, typer.Option(help="As in training: seed of the patient split.")] = 0,
    tta: Annotated[list[str] | None, typer.Option(help="Test-time views averaged with the image.")] = None,
) -> None:
    """Score a bundle on the robustness validation: its validation split under framing and acquisition shifts."""
    from pneumo.core.errors import PneumoError
    from pneumo.evaluation.robustness import evaluate_bundle, markdown_table

    try:
        report = evaluate_bundle(model, data, val_fraction=val_fraction, seed=seed, tta=tta or ())
    except PneumoError as err:
        _fail(err.message)
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(report, indent=2) + "\n")
    typer.echo(markdown_table(report))
    for metric, s in report["summary"].items():
        typer.echo(
            f"{metric:18s} clean {s['clean']:.3f}  worst {s['worst']:.3f} ({s['worst_shift']})  "
            f"mean drop {s['mean_drop']:.3f}"
        )


# ----------------------------------------------------------------------------------------- compare


@app.command()
def compare(
    runs: Annotated[list[Path], typer.Argument(help="Run folders written by `pneumo train --out`.")],
    out: Annotated[Path, typer.Option(help="Markdown table to write.")] = Path("experiments.md"),
    curves: Annotated[Path | None, typer.Option(help="Overlaid learning curves PNG.")] = None,
) -> None:
    """Put runs side by side: validation metrics with CIs, settings, training and inference time."""
    _require_train_extra("compare")
    from pneumo.evaluation.compare import compare_runs

    try:
        table = compare_runs(runs, out, curves)
    except FileNotFoundError as err:
        _fail(str(err))
    typer.echo(table)


# ------------------------------------------------------------------------------------ export, bench

export_app = typer.Typer(help="Export a model bundle to other runtimes.", no_args_is_help=True)
app.add_typer(export_app, name="export")


@export_app.command("onnx")
def export_onnx_command(
    model: ModelOption = None,
    opset: Annotated[int | None, typer.Option(help="ONNX opset version (default: 18).")] = None,
    out: Annotated[
        Path | None, typer.Option(help="File to write; default: model.onnx in the bundle (user cache for the default).")
    ] = None,
    int8: Annotated[
        bool, typer.Option("--int8", help="Write the checked INT8 graph (model_int8.onnx) into the bundle instead.")
    ] = False,
    calibration_data: Annotated[
        Path | None, typer.Option(help="With --int8: dataset root (train/NORMAL, train/PNEUMONIA) to calibrate on.")
    ] = None,
    n_calibration: Annotated[int, typer.Option(help="With --int8: training images to calibrate on.")] = 300,
    force: Annotated[bool, typer.Option(help="With --int8: write it even if it fails the agreement check.")] = False,
) -> None:
    """Write the bundle's model as ONNX (dynamic batch; outputs logits and features), checked against PyTorch.

    With --int8: a statically quantized graph, written into the bundle and listed in bundle.json
    with its checksum, only if it agrees with fp32 on >= 99.5% of validation decisions.
    """
    from pneumo.core.errors import PneumoError

    _require_train_extra("export onnx")
    from pneumo.modeling.export import DEFAULT_OPSET, export_onnx

    try:
        if int8:
            from pneumo.modeling.quantize import quantize_bundle

            if calibration_data is None:
                raise typer.BadParameter("--int8 needs --calibration-data DIR (the training images to calibrate on).")
            path = quantize_bundle(model, calibration_data, n_calibration=n_calibration, force=force)
        else:
            path = export_onnx(model, out=out, opset=opset or DEFAULT_OPSET)
    except PneumoError as err:
        _fail(err.message)
    typer.echo(str(path))


ood_app = typer.Typer(help="The not-a-chest-X-ray gate of a model bundle.", no_args_is_help=True)
app.add_typer(ood_app, name="ood")


@ood_app.command("calibrate")
def ood_calibrate(
    bundle: Annotated[Path, typer.Argument(help="Model bundle folder to write the gate into.")],
    data: Annotated[Path, typer.Option(help="Dataset root (with train/ or NORMAL/ PNEUMONIA/).")],
    val_fraction: Annotated[float, typer.Option(help="Patients carved out for validation.")] = 0.15,
    seed: Annotated[int, typer.Option(help="Seed of the patient split (use the training run's).")] = 0,
    quantile: Annotated[float, typer.Option(help="Share of validation X-rays accepted (0.995: 0.5% refused).")] = 0.995,
    components: Annotated[int, typer.Option(help="Principal directions of the feature model.")] = 64,
) -> None:
    """(Re)fit the gate on a dataset's patient-level train/validation split, with the bundle's own model."""
    from pneumo.core.errors import PneumoError

    _require_train_extra("ood calibrate")
    from pneumo.core.dataset import train_val_samples
    from pneumo.modeling.calibration import calibrate_bundle

    try:
        train, val, description = train_val_samples(data, val_fraction=val_fraction, seed=seed)
        logging.getLogger(__name__).info("Split: %d train, %d val images (%s).", len(train), len(val), description)
        ood = calibrate_bundle(
            bundle, [s.path for s in train], [s.path for s in val], quantile=quantile, n_components=components
        )
    except PneumoError as err:
        _fail(err.message)
    typer.echo(json.dumps(ood, indent=2))


@app.command()
def bench(
    model: ModelOption = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the full result as JSON here.")] = None,
    images: Annotated[
        Path | None, typer.Option(help="Folder of full-resolution images; default: synthesized 1500-2500 px JPEGs.")
    ] = None,
    gradcam: Annotated[bool, typer.Option("--gradcam", help="Also time one Grad-CAM map per image.")] = False,
    backends: Annotated[
        str, typer.Option(help="Comma-separated backends to compare (those unavailable here are skipped).")
    ] = "int8,onnx,torch",
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
    """Latency, throughput and peak memory of inference on this machine, per backend, side by side."""
    from pneumo.core.errors import PneumoError
    from pneumo.serving.bench import BenchSettings, format_table, run_bench

    chosen = tuple(b.strip() for b in backends.split(",") if b.strip())
    if not chosen or any(b not in ("int8", "onnx", "torch") for b in chosen):
        _fail(f"--backends takes int8, onnx and/or torch, comma-separated; got {backends!r}.")
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
        isolate=isolate,
        torch_threads=torch_threads,
        startup=startup,
        serve_predictions=serve_predictions,
    )
    try:
        result = run_bench(settings)
    except PneumoError as err:
        _fail(err.message)
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(result, indent=2) + "\n")
    typer.echo(format_table(result))


# -------------------------------------------------------------------------------------- app, serve


@app.command("app")
def app_command(
    port: Annotated[int, typer.Option(help="Port of the web page.")] = 8501,
    host: Annotated[str, typer.Option(help="Address to listen on; 0.0.0.0 for every interface.")] = "127.0.0.1",
    model: ModelOption = None,
) -> None:
    """Start the clinician's web page (Streamlit) at http://HOST:PORT."""
    from streamlit.web import cli as streamlit_cli

    from pneumo.core.bundle import resolve_bundle
    from pneumo.core.errors import PneumoError
    from pneumo.core.io import DEFAULT_LIMITS

    try:
        bundle = resolve_bundle(model).resolve() if model is not None else None
    except PneumoError as err:
        _fail(err.message)
    page = Path(__file__).parents[1] / "serving" / "app.py"
    args = ["run", str(page), "--server.port", str(port), "--server.address", host, "--server.headless", "true"]
    args += ["--browser.gatherUsageStats", "false", "--client.toolbarMode", "viewer"]
    args += ["--client.showErrorDetails", "none"]  # a traceback never reaches the page, even on a bug
    args += ["--server.maxUploadSize", str(max(1, round(DEFAULT_LIMITS.max_bytes / 2**20)))]
    if bundle is not None:
        args += ["--", "--model", str(bundle)]
    typer.echo(f"pneumo app: http://{host}:{port}", err=True)
    streamlit_cli.main(args=args, prog_name="streamlit")


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Address to listen on; 0.0.0.0 for every interface.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port of the HTTP API.")] = 8000,
    model: ModelOption = None,
    max_upload_mb: Annotated[float, typer.Option(help="Largest file accepted, in MB (413 above it).")] = 20.0,
    max_batch_files: Annotated[int, typer.Option(help="Most files in one /v1/predict/batch request.")] = 16,
    max_concurrent: Annotated[
        int | None, typer.Option(help="Requests analysed at once; default: one per core, fewer if memory is short.")
    ] = None,
    max_queue: Annotated[
        int | None, typer.Option(help="Requests waiting beyond those (503 server_busy above); default 8x.")
    ] = None,
) -> None:
    """Start the HTTP API (FastAPI + uvicorn); OpenAPI docs at http://HOST:PORT/docs."""
    import dataclasses

    import uvicorn

    from pneumo.core.errors import PneumoError
    from pneumo.core.io import DEFAULT_LIMITS
    from pneumo.serving.api import create_app

    if max_upload_mb <= 0 or max_batch_files < 1 or (max_concurrent or 1) < 1 or (max_queue or 0) < 0:
        _fail("--max-upload-mb must be positive, --max-batch-files and --max-concurrent at least 1, --max-queue >= 0.")
    limits = dataclasses.replace(DEFAULT_LIMITS, max_bytes=int(max_upload_mb * 2**20))
    try:
        api = create_app(
            model, limits, max_batch_files=max_batch_files, max_concurrent=max_concurrent, max_queue=max_queue
        )
    except PneumoError as err:
        _fail(err.message)
    uvicorn.run(api, host=host, port=port)


# ------------------------------------------------------------------------------- dicom, dicomweb

from pneumo.cli.dicom import dicom_app, dicomweb  # noqa: E402  (the commands live in their own module)

app.add_typer(dicom_app, name="dicom")
app.command("dicomweb")(dicomweb)
