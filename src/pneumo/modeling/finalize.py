"""The end of a training run, in one place: from a trained network to a finished bundle and its reports.

:func:`finalize` runs the steps in the order they depend on each other, each a function named for
what it does, and builds the bundle's metadata (:class:`~pneumo.core.bundle.BundleMeta`) in memory:
``bundle.json`` is written once, at the end, with everything in it.

1. :func:`fit_temperature` on the validation logits (it changes probabilities, so it comes first);
2. :func:`choose_threshold` on the calibrated validation probabilities (Youden's J stands in for the
   ``robust`` rule until step 5 has the shifted probabilities);
3. the weights, then the gate's statistics (:func:`pneumo.modeling.ood_fit.fit_ood`);
4. the fp32 ONNX graph, exported explicitly into the user cache: the robustness validation runs on it;
5. :func:`score_robustness`: the validation films under every shift, through the Predictor; it sets
   the gate's threshold on the shifted films too and, for the ``robust`` rule, the decision threshold;
6. the validation report and plots at the final threshold;
7. the INT8 graph (:func:`pneumo.modeling.quantize.quantize_bundle`), checked at that threshold;
8. ``bundle.json``, the curves and ``run.json`` (what ``pneumo compare`` reads).

``pneumo train --out RUN`` gets ``bundle/``, ``validation/`` (report, plots, predictions,
robustness tables), ``curves.png`` and ``run.json``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from pneumo.core.bundle import INT8_FILE, BundleMeta, ThresholdRule, TrainingRecord, write_meta
from pneumo.core.dataset import Sample
from pneumo.core.environment import hardware_info
from pneumo.core.errors import PneumoError
from pneumo.core.probability import positive_probability, temperature_softmax
from pneumo.evaluation import robustness
from pneumo.evaluation.compare import save_curves
from pneumo.evaluation.metrics import evaluation_report, select_threshold
from pneumo.evaluation.metrics import fit_temperature as _fit_temperature
from pneumo.evaluation.plots import save_plots
from pneumo.evaluation.report import format_ci, markdown_report
from pneumo.inference.ood import OodGate
from pneumo.inference.predictor import Predictor
from pneumo.inference.runners import OnnxRunner, cached_onnx_path
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
) -> Path:
    """Calibrate, choose the threshold, fit the gate, score the shifts, quantize, and write the bundle once.

    ``meta`` arrives with what training knew (architecture, labels, preprocessing, name) and leaves
    with the calibration, the threshold, the gate, the metrics, the INT8 entry and the training
    record. ``started`` (a ``time.perf_counter()`` reading taken when the run began) adds the
    recipe's whole wall time to ``run.json`` as ``recipe_seconds``. Returns the bundle's folder.
    """
    out = Path(config.out)
    bundle_dir, val_dir = out / "bundle", out / "validation"
    val_dir.mkdir(parents=True, exist_ok=True)
    y_class = np.array([s.label for s in val_samples])
    y_true = np.isin(y_class, meta.positive_indices).astype(int)
    val_logits, val_feats = feature_fn("val")

    meta.temperature = fit_temperature(val_logits, y_class)
    prob = positive_probability(temperature_softmax(val_logits, meta.temperature), meta.positive_indices)
    meta.threshold, rule = choose_threshold(config, y_true, prob)
    meta.version = datetime.now(UTC).strftime("%Y.%m.%d.%H%M")
    meta.training = TrainingRecord(**record, hardware=hardware_info())
    save_weights(bundle_dir, model, meta)
    gate = fit_ood(feature_fn("train")[1], val_feats)
    log.info("Exporting the fp32 ONNX graph (the robustness validation and the INT8 check run on it).")
    fp32 = export_onnx(bundle_dir, out=cached_onnx_path(bundle_dir, meta.preprocess.input_size), model=model, meta=meta)

    summary: dict[str, Any] = {"name": meta.name, "arch": config.arch, "bundle": str(bundle_dir)}
    if config.robustness:
        predictor = Predictor(bundle_dir, meta=meta, runner=OnnxRunner(fp32), check_ood=False)
        summary["robustness"] = score_robustness(predictor, gate, val_samples, y_true, val_dir,
                                                 choose=config.threshold_rule == ThresholdRule.ROBUST)  # fmt: skip
        if "threshold_rule" in summary["robustness"]:
            rule = f"robust: {summary['robustness']['threshold_rule']['description']}"
    meta.ood = gate.save(bundle_dir)

    report = evaluation_report(y_true, prob, meta.threshold)
    report["plots"] = {k: p.name for k, p in save_plots(y_true, prob, meta.threshold, val_dir).items()}
    (val_dir / "report.md").write_text(markdown_report(report, f"Validation of {config.name or config.arch}"))
    (val_dir / "predictions.csv").write_text(
        "file,label,probability\n" + "".join(f"{s.path},{y},{p:.6f}\n" for s, y, p in zip(val_samples, y_true, prob))
    )
    meta.threshold_rule = f"{rule} on the validation split ({split_description}), after temperature scaling"
    meta.metrics["validation"] = {k: v for k, v in report.items() if k != "plots"}
    if config.int8:  # after the threshold is final: the INT8 check counts decisions at it
        add_int8(bundle_dir, meta, config.data, fp32)
    write_meta(bundle_dir, meta)

    save_curves(out / "logs" / "metrics.csv", out / "curves.png")
    if started is not None:
        record["recipe_seconds"] = round(time.perf_counter() - started, 1)
    summary.update(validation=meta.metrics["validation"], training=record)
    (out / "run.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    log.info("Validation: %s", format_ci(report["roc_auc"], report["ci"].get("roc_auc")))
    return bundle_dir


def fit_temperature(val_logits: np.ndarray, y_class: np.ndarray) -> float:
    """The temperature that minimizes the validation log-loss (:func:`pneumo.evaluation.metrics.fit_temperature`)."""
    return float(_fit_temperature(val_logits, y_class))


def choose_threshold(config: TrainConfig, y_true: np.ndarray, prob: np.ndarray) -> tuple[float, str]:
    """The decision threshold by ``config.threshold_rule`` on validation probabilities, and how to describe it.

    The ``robust`` rule needs the probabilities under the shifts: Youden's J stands in until
    :func:`score_robustness` has them.
    """
    rule = ThresholdRule(config.threshold_rule)
    stand_in = ThresholdRule.YOUDEN if rule == ThresholdRule.ROBUST else rule
    threshold = float(select_threshold(y_true, prob, stand_in, config.target_sensitivity))
    described = str(rule) + (f" (target {config.target_sensitivity})" if rule == ThresholdRule.SENSITIVITY else "")
    return threshold, described


def score_robustness(
    predictor: Predictor,
    gate: OodGate,
    samples: Sequence[Sample],
    y_true: np.ndarray,
    val_dir: Path,
    *,
    choose: bool,
) -> dict[str, Any]:
    """Score the bundle on the robustness validation through ``predictor``; set the gate's threshold on the shifts.

    With ``choose`` the predictor's threshold is replaced by the ``robust`` rule's
    (:func:`pneumo.evaluation.robustness.robust_threshold`). The full report (per shift, with CIs and
    every probability) goes to ``validation/robustness.json``; the per-shift metrics and the summary
    go into ``predictor.meta.metrics``, so the model card and ``pneumo compare`` read them from one place.
    """
    meta = predictor.meta
    images = robustness.load_images(samples, meta.preprocess.input_size)
    scores: list[np.ndarray] = []
    probs = robustness.shifted_probabilities(robustness.predictor_prob_fn(predictor, gate, scores), images)
    threshold_on_shifts(gate, scores)
    chosen = robustness.robust_threshold(y_true, probs) if choose else None
    if chosen is not None:
        meta.threshold = float(chosen["threshold"])
    report = robustness.robustness_report(y_true, probs, meta.threshold)
    full = {**report, "labels": y_true.tolist(), "probabilities": {k: v.round(6).tolist() for k, v in probs.items()}}
    (val_dir / "robustness.json").write_text(json.dumps(full) + "\n")
    (val_dir / "robustness.md").write_text(robustness.markdown_table(report))
    meta.metrics["robustness"] = {"summary": report["summary"], "shifts": report["shifts"]}
    return {"summary": report["summary"], "shifts": report["shifts"], **({"threshold_rule": chosen} if chosen else {})}


def add_int8(bundle_dir: Path, meta: BundleMeta, data: str, fp32: Path) -> None:
    """List the checked INT8 graph in ``meta`` (:mod:`pneumo.modeling.quantize`); a bundle without it still serves."""
    try:
        meta.files[INT8_FILE] = quantize_bundle(bundle_dir, data, meta=meta, fp32_graph=fp32)
    except PneumoError as err:
        log.warning("No INT8 graph in the bundle (it serves in fp32): %s", err.message)
