"""Checking another runtime's execution of the bundle's graphs against fp32, the way the INT8 graph is checked.

OpenVINO reads the same ONNX files as ONNX Runtime but runs its own kernels (oneDNN, with its own
fusions and int8 arithmetic), so "the INT8 graph passed its check" says nothing yet about OpenVINO
running it. This module runs each graph of the bundle under OpenVINO on the images the INT8 check
used (the bundle's validation split, from the patient-level split recorded in its training config,
and :data:`~pneumo.modeling.quantize.HELDOUT_IMAGES` training images outside the INT8 calibration
sample) and compares its probabilities with ONNX Runtime's fp32 graph by the INT8 check's rule
(:func:`~pneumo.modeling.quantize.compare_probabilities`: decision agreement >= 99.5% and ROC AUC
within 0.002 on both sets). Each result is a :class:`~pneumo.inference.openvino.RuntimeCheck` in
``bundle.json``, keyed by graph file, OpenVINO release and CPU int8 instruction set; see
:mod:`pneumo.inference.openvino` for how ``auto`` reads them.

In the entries, ``auc_int8`` is the checked execution's AUC (the name is the INT8 check's).
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np

from pneumo.core.bundle import (
    INT8_FILE,
    ONNX_FILE,
    Backend,
    BundleMeta,
    read_meta,
    resolve_bundle,
)
from pneumo.core.dataset import train_val_samples
from pneumo.core.environment import hardware_info
from pneumo.core.errors import PneumoError
from pneumo.inference.openvino import (
    RUNTIME,
    OpenVinoRunner,
    RuntimeCheck,
    bundle_graphs,
    cpu_isa,
    openvino_version,
    read_checks,
    release,
    write_checks,
)
from pneumo.inference.predictor import bundle_preprocessor
from pneumo.inference.runners import OnnxRunner, file_sha256, find_onnx
from pneumo.modeling.quantize import (
    DEFAULT_CALIBRATION_IMAGES,
    MAX_AUC_DELTA,
    MIN_AGREEMENT,
    calibration_and_heldout,
    compare_probabilities,
    graph_probability,
    load_arrays,
)

log = logging.getLogger(__name__)


def _passes(report: dict) -> bool:
    return report["decision_agreement"] >= MIN_AGREEMENT and abs(report["auc_delta"]) <= MAX_AUC_DELTA


def check_openvino(
    bundle: str | Path | None, data: str | Path, *, meta: BundleMeta | None = None
) -> list[RuntimeCheck]:
    """Run every graph of ``bundle`` under OpenVINO, compare with ONNX Runtime's fp32 graph, return the records.

    The caller writes them into ``bundle.json`` (:func:`record_checks`); nothing is written here.
    The fp32 reference is the bundle's fp32 export, or one made for the check and thrown away (torch needed).

    Raises:
        PneumoError: OpenVINO is not installed, or the bundle has no ONNX graph.
    """
    version = openvino_version()
    if version is None:
        raise PneumoError("The OpenVINO check needs openvino: pip install 'pneumo[openvino]'.", code="no_openvino")
    folder = Path(bundle) if meta is not None and bundle is not None else resolve_bundle(bundle)
    meta = meta if meta is not None else read_meta(folder)
    graphs = bundle_graphs(folder, meta)
    if not graphs:
        raise PneumoError(f"{folder} has no ONNX graph; run `pneumo export onnx --model {folder}` first.")
    config = meta.training.config
    train, val, how = train_val_samples(
        data, config.get("label_mode", "binary"), config.get("val_fraction", 0.15), config.get("seed", 0)
    )
    # Without an INT8 graph nothing was calibrated: every training image is held out.
    n_calibration = (meta.int8.validation.get("n_calibration") or DEFAULT_CALIBRATION_IMAGES) if meta.int8 else 0
    _, heldout = calibration_and_heldout(train, int(n_calibration))
    preprocessor = bundle_preprocessor(folder, meta)
    sets = {
        name: (load_arrays([s.path for s in samples], preprocessor), np.array([s.label for s in samples]))
        for name, samples in (("validation", val), ("heldout", heldout))
        if samples
    }
    log.info("Checking OpenVINO %s on %s: %s.", version, ", ".join(graphs), {k: len(v[1]) for k, v in sets.items()})
    isa, cpu = cpu_isa(), str(hardware_info().get("cpu_model", ""))
    with tempfile.TemporaryDirectory(prefix="pneumo-ov-check-") as tmp:
        fp32_path = find_onnx(folder, meta)
        if fp32_path is None:
            from pneumo.modeling.export import export_onnx

            fp32_path = export_onnx(folder, out=Path(tmp) / "fp32.onnx", meta=meta)
        reference = OnnxRunner(fp32_path)
        expected = {name: graph_probability(reference, arrays, meta) for name, (arrays, _) in sets.items()}
    records = []
    for kind, path in graphs.items():
        runner = OpenVinoRunner(path, graph=kind)
        reports = {
            name: compare_probabilities(expected[name], graph_probability(runner, arrays, meta), labels, meta)
            for name, (arrays, labels) in sets.items()
        }
        passed = all(_passes(r) for r in reports.values())
        log.info("OpenVINO %s on the %s graph: %s", version, kind, "passed" if passed else "FAILED", extra=reports)
        records.append(
            RuntimeCheck(
                runtime=RUNTIME,
                version=version,
                graph=INT8_FILE if kind == Backend.INT8 else ONNX_FILE,  # the fp32 graph may be a cached export
                graph_sha256=file_sha256(path),
                cpu_isa=isa,
                cpu=cpu,
                passed_check=passed,
                validation=reports.get("validation", {}) | {"split": how, "graph_kind": kind},
                heldout=reports.get("heldout", {}),
            )
        )
    return records


def record_checks(meta: BundleMeta, records: list[RuntimeCheck]) -> BundleMeta:
    """``meta`` with ``records`` added, replacing older records of the same graph, runtime release and CPU kind."""

    def key(c: RuntimeCheck) -> tuple[str, str, str, str]:
        return c.runtime, c.graph_sha256, release(c.version), c.cpu_isa

    new = {key(r) for r in records}
    write_checks(meta, [c for c in read_checks(meta) if key(c) not in new] + list(records))
    return meta
