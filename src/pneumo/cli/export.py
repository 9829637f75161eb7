"""``pneumo export onnx`` (the fp32 and INT8 graphs) and ``pneumo ood fit`` (the not-a-chest-X-ray gate)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated

import typer

from pneumo.cli.common import ModelOption, fail, require_train_extra

export_app = typer.Typer(help="Export a model bundle to other runtimes.", no_args_is_help=True)


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

    require_train_extra("export onnx")
    from pneumo.modeling.export import DEFAULT_OPSET, export_onnx

    try:
        if int8:
            from pneumo.core.bundle import INT8_FILE, read_meta, resolve_bundle, write_meta
            from pneumo.modeling.quantize import quantize_bundle

            if calibration_data is None:
                raise typer.BadParameter("--int8 needs --calibration-data DIR (the training images to calibrate on).")
            folder = resolve_bundle(model)
            meta = read_meta(folder)
            meta.files[INT8_FILE] = quantize_bundle(folder, calibration_data, n_calibration=n_calibration, force=force)
            write_meta(folder, meta)
            path = folder / INT8_FILE
        else:
            path = export_onnx(model, out=out, opset=opset or DEFAULT_OPSET)
    except PneumoError as err:
        fail(err.message)
    typer.echo(str(path))


@export_app.command("openvino")
def export_openvino_command(
    data: Annotated[
        Path, typer.Option(help="Dataset root (train/NORMAL, train/PNEUMONIA): its validation split is checked.")
    ],
    model: ModelOption = None,
) -> None:
    """Check OpenVINO's execution of the bundle's ONNX graphs against fp32 and record it in bundle.json.

    No new model file: OpenVINO reads the same ONNX graphs. `auto` serves with OpenVINO only where a
    passing check matches the graph, the OpenVINO release and the CPU kind (run it on each kind of CPU).
    """
    from pneumo.core.errors import PneumoError

    require_train_extra("export openvino")
    from pneumo.core.bundle import read_meta, resolve_bundle, write_meta
    from pneumo.modeling.runtime_check import check_openvino, record_checks

    try:
        folder = resolve_bundle(model)
        records = check_openvino(folder, data)
        write_meta(folder, record_checks(read_meta(folder), records))
    except PneumoError as err:
        fail(err.message)
    for record in records:
        verdict = "passed" if record.passed_check else "FAILED"
        typer.echo(
            f"{record.graph}: OpenVINO {record.version} on {record.cpu_isa} {verdict} "
            f"(decision agreement with fp32: {record.validation.get('decision_agreement')} validation, "
            f"{record.heldout.get('decision_agreement')} held-out)"
        )


ood_app = typer.Typer(help="The not-a-chest-X-ray gate of a model bundle.", no_args_is_help=True)


@ood_app.command("fit")
def ood_fit(
    bundle: Annotated[Path, typer.Argument(help="Model bundle folder to write the gate into.")],
    data: Annotated[Path, typer.Option(help="Dataset root (with train/ or NORMAL/ PNEUMONIA/).")],
    val_fraction: Annotated[float, typer.Option(help="Patients carved out for validation.")] = 0.15,
    seed: Annotated[int, typer.Option(help="Seed of the patient split (use the training run's).")] = 0,
    quantile: Annotated[float, typer.Option(help="Share of validation X-rays accepted (0.995: 0.5% refused).")] = 0.995,
    components: Annotated[int, typer.Option(help="Principal directions of the feature model.")] = 64,
) -> None:
    """(Re)fit the gate on a dataset's patient-level train/validation split, with the bundle's own model."""
    from pneumo.core.errors import PneumoError

    require_train_extra("ood fit")
    from pneumo.core.dataset import train_val_samples
    from pneumo.modeling.ood_fit import refit_gate

    try:
        train, val, description = train_val_samples(data, val_fraction=val_fraction, seed=seed)
        logging.getLogger(__name__).info("Split: %d train, %d val images (%s).", len(train), len(val), description)
        ood = refit_gate(
            bundle, [s.path for s in train], [s.path for s in val], quantile=quantile, n_components=components
        )
    except PneumoError as err:
        fail(err.message)
    typer.echo(json.dumps(ood.model_dump(mode="json"), indent=2))
