"""The end of a training run, in one place: from a trained network to a finished bundle and its reports.

:func:`finalize` runs the steps in the order they depend on each other, each a function named for
what it does, and builds the bundle's metadata (:class:`~pneumo.core.bundle.BundleMeta`) in memory:
``bundle.json`` is written once, at the end, with everything in it.

1. the temperature on the validation logits (how labels share their group's probability);
2. the weights, the lung localizer when the bundle frames its films (:func:`add_localizer`), the
   gate's statistics (:func:`pneumo.modeling.ood_fit.fit_ood`), and the fp32 ONNX graph, exported
   explicitly into the user cache: the robustness validation and the INT8 check run on it;
3. :func:`score_shifts`: the validation films under every robustness shift, through the Predictor
   (framing included); the gate's threshold is set on them too;
4. :func:`fit_calibration` (Platt scaling on the pooled robustness validation, or temperature only)
   and :func:`choose_threshold` on the calibrated probabilities (the ``robust`` rule needs the
   shifted ones); without the robustness validation both use the clean validation films;
5. the robustness report (per shift, framing consistency, pooled calibration error) and the
   validation report and plots, at the final calibration and threshold;
6. the INT8 graph (:func:`pneumo.modeling.quantize.quantize_bundle`), checked at that threshold;
7. ``bundle.json``, the curves and ``run.json`` (what ``pneumo compare`` reads).

``pneumo train --out RUN`` gets ``bundle/``, ``validation/`` (report, plots, predictions,
robustness tables), ``curves.png`` and ``run.json``.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from pneumo.core import progress
from pneumo.core.bundle import (
    INT8_FILE,
    LOCALIZER_FILE,
    BundleMeta,
    Calibration,
    FileEntry,
    ThresholdRule,
    TrainingRecord,
    write_meta,
)
from pneumo.core.dataset import Sample
from pneumo.core.environment import hardware_info
from pneumo.core.errors import PneumoError
from pneumo.core.framing import DEFAULT_LOCALIZER
from pneumo.core.probability import logit_gap
from pneumo.evaluation import robustness
from pneumo.evaluation.calibration import fit_platt
from pneumo.evaluation.calibration import fit_temperature as _fit_temperature
from pneumo.evaluation.compare import save_curves
from pneumo.evaluation.metrics import MetricsInputError, evaluation_report, select_threshold
from pneumo.evaluation.overlap import seen_images
from pneumo.evaluation.plots import save_plots
from pneumo.evaluation.report import format_ci, markdown_report
from pneumo.inference.ood import OodGate
from pneumo.inference.predictor import Predictor
from pneumo.inference.runners import OnnxRunner, cached_onnx_path, file_sha256
from pneumo.modeling.config import TrainConfig
from pneumo.modeling.export import export_onnx
from pneumo.modeling.ood_fit import fit_ood, threshold_on_shifts
from pneumo.modeling.quantize import quantize_bundle
from pneumo.modeling.weights import save_weights

log = logging.getLogger(__name__)

#: ``split -> (logits, pooled features)`` of the run's own network on ``"train"`` or ``"val"``.
FeatureFn = Callable[[str], tuple[np.ndarray, np.ndarray]]


def finalize(
    model: nn.Module,
    meta: BundleMeta,
    config: TrainConfig,
    val_samples: Sequence[Sample],
    split_description: str,
    feature_fn: FeatureFn,
    record: dict[str, Any],
    *,
    started: float | None = None,
    train_samples: Sequence[Sample] = (),
) -> Path:
    """Calibrate, choose the threshold, fit the gate, score the shifts, quantize, and write the bundle once.

    ``meta`` arrives with what training knew (architecture, labels, preprocessing, name) and leaves
    with the calibration, the threshold, the gate, the metrics, the files and the training record.
    ``started`` (a ``time.perf_counter()`` reading taken when the run began) adds the recipe's whole
    wall time to ``run.json`` as ``recipe_seconds``; the compact hashes of ``train_samples`` and
    ``val_samples`` go into the training record, so ``pneumo evaluate`` warns when it is given films
    the bundle saw (:mod:`pneumo.evaluation.overlap`). Returns the bundle's folder.
    """
    out = Path(config.out)
    bundle_dir, val_dir = out / "bundle", out / "validation"
    val_dir.mkdir(parents=True, exist_ok=True)
    y_class = np.array([s.label for s in val_samples])
    y_true = np.isin(y_class, meta.positive_indices).astype(int)
    val_logits, val_feats = feature_fn("val")

    meta.temperature = fit_temperature(val_logits, y_class)
    meta.version = datetime.now(UTC).strftime("%Y.%m.%d.%H%M")
    seen = seen_images({"train": train_samples, "val": val_samples}) if train_samples else None
    meta.training = TrainingRecord(**record, hardware=hardware_info(), seen_images=seen)
    save_weights(bundle_dir, model, meta)
    add_localizer(bundle_dir, meta)
    with progress.status("Fitting the not-a-chest-X-ray gate"):
        gate = fit_ood(feature_fn("train")[1], val_feats)
    with progress.status("Exporting the fp32 ONNX graph (the robustness validation and the INT8 check run on it)"):
        target = cached_onnx_path(bundle_dir, meta.preprocess.input_size)
        fp32 = export_onnx(bundle_dir, out=target, model=model, meta=meta)

    logits = {"clean": val_logits}
    if config.robustness:
        predictor = Predictor(bundle_dir, meta=meta, runner=OnnxRunner(fp32), check_ood=False)
        logits = score_shifts(predictor, gate, val_samples)
    meta.calibration = fit_calibration(config, meta, logits, y_true)
    probs = {shift: np.asarray(meta.probability(values)) for shift, values in logits.items()}
    prob = np.asarray(meta.probability(val_logits))  # the run's own network on the clean films
    meta.threshold, rule, chosen = choose_threshold(config, y_true, prob, probs)
    meta.ood = gate.save(bundle_dir)

    summary: dict[str, Any] = {"name": meta.name, "arch": config.arch, "bundle": str(bundle_dir)}
    if config.robustness:
        summary["robustness"] = write_robustness(meta, y_true, probs, val_dir)
        if chosen is not None:
            summary["robustness"]["threshold_rule"] = chosen
    report = evaluation_report(y_true, prob, meta.threshold)
    report["plots"] = {k: p.name for k, p in save_plots(y_true, prob, meta.threshold, val_dir).items()}
    (val_dir / "report.md").write_text(markdown_report(report, f"Validation of {config.name or config.arch}"))
    (val_dir / "predictions.csv").write_text(
        "file,label,probability\n" + "".join(f"{s.path},{y},{p:.6f}\n" for s, y, p in zip(val_samples, y_true, prob))
    )
    meta.threshold_rule = (
        f"{rule} on the validation split ({split_description}), after {meta.calibration.method} scaling"
    )
    meta.metrics["validation"] = {k: v for k, v in report.items() if k != "plots"}
    if config.int8:  # after the threshold is final: the INT8 check counts decisions at it
        add_int8(bundle_dir, meta, config.data, fp32)
    write_meta(bundle_dir, meta)

    save_curves(out / "logs" / "metrics.csv", out / "curves.png")
    if started is not None:
        record["recipe_seconds"] = round(time.perf_counter() - started, 1)
    summary.update(validation=meta.metrics["validation"], calibration=meta.calibration.model_dump(), training=record)
    (out / "run.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    log.info("Validation: %s", format_ci(report["roc_auc"], report["ci"].get("roc_auc")))
    return bundle_dir


def fit_temperature(val_logits: np.ndarray, y_class: np.ndarray) -> float:
    """The temperature minimizing the validation log-loss (:func:`pneumo.evaluation.calibration.fit_temperature`)."""
    return float(_fit_temperature(val_logits, y_class))


def add_localizer(bundle_dir: Path, meta: BundleMeta) -> None:
    """Copy the lung localizer into a bundle that frames its films, and list it in ``meta.files``.

    The bundle carries the very graph its training crops came from, so it frames the same way
    whatever pneumo version later serves it.
    """
    if not meta.preprocess.framed:
        return
    target = bundle_dir / LOCALIZER_FILE
    shutil.copyfile(DEFAULT_LOCALIZER, target)
    meta.files[LOCALIZER_FILE] = FileEntry(
        kind=f"onnx-localizer-{meta.preprocess.framing.method}", sha256=file_sha256(target),
        bytes=target.stat().st_size,
    )  # fmt: skip


def score_shifts(predictor: Predictor, gate: OodGate, samples: Sequence[Sample]) -> dict[str, np.ndarray]:
    """The raw logits of every validation film under every robustness shift (``clean`` included), by shift.

    The gate's threshold is set on the same films (:func:`pneumo.modeling.ood_fit.threshold_on_shifts`).
    """
    images = robustness.load_images(samples, predictor.meta.preprocess.input_size)
    scores: list[np.ndarray] = []
    batches: list[np.ndarray] = []
    robustness.shifted_probabilities(robustness.predictor_prob_fn(predictor, gate, scores, batches), images)
    threshold_on_shifts(gate, scores)
    per_shift = np.split(np.concatenate(batches), len(robustness.SHIFTS))
    return dict(zip(robustness.SHIFTS, per_shift, strict=True))


def fit_calibration(
    config: TrainConfig, meta: BundleMeta, logits: dict[str, np.ndarray], y_true: np.ndarray
) -> Calibration:
    """Platt scaling on the pooled logits of every condition in ``logits`` (``config.calibration == "platt"``).

    Pooled over the robustness validation (the clean films and every shift) rather than the clean
    films alone: the probability shown must mean what it says on films from other machines and
    framings too, and the pooled sample is 18 times larger. Platt (a slope and an intercept on the
    log-odds) rather than temperature alone: class weights and label smoothing leave the
    probabilities shifted low (round 5: a threshold of 0.125, and films scored about 0.1 were ~80%
    pneumonia), which a temperature cannot move; rather than isotonic regression: two parameters,
    a smooth monotone map, no steps (isotonic would give ties at the operating point).
    """
    if config.calibration != "platt":
        return Calibration()
    gap = logit_gap(np.concatenate(list(logits.values())), meta.positive_indices, meta.temperature)
    try:
        slope, intercept = fit_platt(gap, np.tile(y_true, len(logits)))
    except MetricsInputError as err:  # a model that does not rank the classes (a smoke run): keep the temperature
        log.warning("Platt scaling not applied (%s); the bundle keeps temperature scaling.", err)
        return Calibration()
    what = "the pooled robustness validation" if len(logits) > 1 else "the validation films"
    return Calibration(method="platt", slope=slope, intercept=intercept,
                       fitted_on=f"{what}: {len(y_true)} films x {len(logits)} conditions")  # fmt: skip


def choose_threshold(
    config: TrainConfig, y_true: np.ndarray, prob: np.ndarray, probs: dict[str, np.ndarray]
) -> tuple[float, str, dict[str, Any] | None]:
    """The threshold by ``config.threshold_rule`` on calibrated probabilities, its description, the robust rule's row.

    ``prob``: the clean validation films; ``probs``: every robustness condition (``clean`` included),
    which the ``robust`` rule (:func:`pneumo.evaluation.robustness.robust_threshold`) chooses on.
    """
    rule = ThresholdRule(config.threshold_rule)
    if rule == ThresholdRule.ROBUST:
        chosen = robustness.robust_threshold(y_true, probs)
        return float(chosen["threshold"]), f"robust: {chosen['description']}", chosen
    threshold = float(select_threshold(y_true, prob, rule, config.target_sensitivity))
    target = f" (target {config.target_sensitivity})" if rule == ThresholdRule.SENSITIVITY else ""
    return threshold, str(rule) + target, None


def write_robustness(meta: BundleMeta, y_true: np.ndarray, probs: dict[str, np.ndarray], val_dir: Path) -> dict:
    """The robustness report at the bundle's threshold: ``validation/robustness.json``, ``.md`` and ``meta.metrics``.

    The per-shift metrics, the summary and the framing consistency go into the bundle's metrics, so
    the model card and ``pneumo compare`` read them from one place. Returns what ``run.json`` keeps.
    """
    report = robustness.robustness_report(y_true, probs, meta.threshold)
    full = {**report, "labels": y_true.tolist(), "probabilities": {k: v.round(6).tolist() for k, v in probs.items()}}
    (val_dir / "robustness.json").write_text(json.dumps(full) + "\n")
    (val_dir / "robustness.md").write_text(robustness.markdown_table(report))
    kept = {key: report[key] for key in ("summary", "shifts", "framing", "ece_pooled")}
    meta.metrics["robustness"] = kept
    return kept


def add_int8(bundle_dir: Path, meta: BundleMeta, data: str, fp32: Path) -> None:
    """List the checked INT8 graph in ``meta`` (:mod:`pneumo.modeling.quantize`); a bundle without it still serves."""
    try:
        meta.files[INT8_FILE] = quantize_bundle(bundle_dir, data, meta=meta, fp32_graph=fp32)
    except PneumoError as err:
        log.warning("No INT8 graph in the bundle (it serves in fp32): %s", err.message)
