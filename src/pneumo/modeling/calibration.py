"""Finishing a model: temperature, decision threshold and OOD gate fitted on validation data, then the bundle.

:func:`finish_run` ends every training run (``pneumo train --out RUN`` gets ``bundle/``,
``validation/`` with the report and plots, ``curves.png`` and ``run.json``, which
:func:`pneumo.evaluation.compare.compare_runs` reads). :func:`calibrate_bundle` (re)fits the
out-of-distribution gate of an existing bundle through the bundle's own inference path
(``pneumo ood calibrate``).
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

from pneumo.core.bundle import BundleMeta, read_meta, write_meta
from pneumo.core.environment import hardware_info
from pneumo.core.errors import PneumoError
from pneumo.core.io import read_image
from pneumo.core.probability import positive_probability, temperature_softmax
from pneumo.evaluation.compare import save_curves
from pneumo.evaluation.metrics import evaluation_report, fit_temperature, select_threshold
from pneumo.evaluation.plots import save_plots
from pneumo.evaluation.report import format_ci, markdown_report
from pneumo.modeling.weights import save_bundle
from pneumo.serving.inference import Predictor, Source
from pneumo.serving.ood import DEFAULT_COMPONENTS, DEFAULT_QUANTILE, OodGate, fit_ood

log = logging.getLogger(__name__)

FeatureFn = Callable[[str], tuple[np.ndarray, np.ndarray]]


def finish_run(
    model: nn.Module,
    meta: BundleMeta,
    config: Any,
    dm: Any,
    feature_fn: FeatureFn,
    record: dict[str, Any],
    *,
    started: float | None = None,
) -> Path:
    """Calibrate on validation data, choose the threshold, fit the OOD gate and write the bundle.

    ``meta`` arrives with what training knew (architecture, labels, preprocessing, name) and
    leaves with the calibration, the threshold, the metrics and the training record. ``started``
    (a ``time.perf_counter()`` reading taken when the run began) adds the recipe's whole wall time,
    from training folder to finished bundle, to ``run.json`` as ``recipe_seconds``.
    The order matters: temperature first (it changes probabilities), then the threshold on the
    calibrated probabilities, so the bundle's threshold applies to what the Predictor outputs.
    """
    out = Path(config.out)
    positive = meta.positive_indices
    val_logits, val_feats = feature_fn("val")
    y_class = np.array([s.label for s in dm.val_samples])
    y_true = np.isin(y_class, positive).astype(int)
    temperature = fit_temperature(val_logits, y_class)
    prob = positive_probability(temperature_softmax(val_logits, temperature), positive)
    robust_rule = config.threshold_rule == "robust"
    # The robust rule needs the bundle's probabilities under the shifts: Youden's J stands in until then.
    threshold = select_threshold(y_true, prob, "youden" if robust_rule else config.threshold_rule,
                                 config.target_sensitivity)  # fmt: skip
    rule = config.threshold_rule + (
        f" (target {config.target_sensitivity})" if config.threshold_rule == "sensitivity" else ""
    )
    meta.threshold = float(threshold)
    meta.temperature = float(temperature)
    meta.version = _version_from_time()
    meta.training = {**record, "hardware": hardware_info()}
    bundle_dir = save_bundle(out / "bundle", model, meta)
    _fit_ood(bundle_dir, feature_fn, val_feats)
    val_dir = out / "validation"
    val_dir.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"name": meta.name, "arch": config.arch, "bundle": str(bundle_dir)}
    if config.robustness:
        # Scored before the INT8 graph exists, so through the fp32 network: the reference the INT8 check compares to.
        summary["robustness"] = _robustness(bundle_dir, dm.val_samples, positive, val_dir, robust_rule)
        if robust_rule:
            rule = f"robust: {summary['robustness']['threshold_rule']['description']}"
    meta = read_meta(bundle_dir)  # with what the OOD gate and the robustness validation added
    threshold = meta.threshold
    report = evaluation_report(y_true, prob, threshold)
    report["plots"] = {k: p.name for k, p in save_plots(y_true, prob, threshold, val_dir).items()}
    (val_dir / "report.md").write_text(markdown_report(report, f"Validation of {config.name or config.arch}"))
    (val_dir / "predictions.csv").write_text(
        "file,label,probability\n" + "".join(f"{s.path},{y},{p:.6f}\n" for s, y, p in zip(dm.val_samples, y_true, prob))
    )
    meta.threshold_rule = f"{rule} on the validation split ({dm.split_description}), after temperature scaling"
    meta.metrics["validation"] = {k: v for k, v in report.items() if k != "plots"}
    write_meta(bundle_dir, meta)
    if config.int8:  # after the threshold is final: the INT8 check counts decisions at it
        _write_int8(bundle_dir, config.data)
    save_curves(out / "logs" / "metrics.csv", out / "curves.png")
    if started is not None:
        record["recipe_seconds"] = round(time.perf_counter() - started, 1)
    summary.update(validation=meta.metrics["validation"], training=record)
    (out / "run.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    log.info("Validation: %s", format_ci(report["roc_auc"], report["ci"].get("roc_auc")))
    return bundle_dir


def _robustness(
    bundle_dir: Path, samples: Sequence[Any], positive: list[int], val_dir: Path, choose_threshold: bool
) -> dict[str, Any]:
    """Score the finished bundle on the robustness validation through the Predictor; keep the summary.

    With ``choose_threshold`` the bundle's threshold is replaced by the ``robust`` rule's
    (:func:`pneumo.evaluation.robustness.robust_threshold`). The full report (per shift, with CIs and
    every probability) goes to ``validation/robustness.json``; the per-shift metrics and the summary
    also go into the bundle's metrics, so the model card and ``pneumo compare`` read them from one place.
    """
    from pneumo.evaluation import robustness

    predictor = Predictor(bundle_dir, check_ood=False)
    images = robustness.load_images(samples, predictor.preprocess_config.input_size)
    y_true = np.isin([s.label for s in samples], positive).astype(int)
    gate, scores = predictor.ood_gate, list[np.ndarray]()
    probs = robustness.shifted_probabilities(robustness.predictor_prob_fn(predictor, gate, scores), images)
    meta = read_meta(bundle_dir)
    if gate is not None:
        meta.ood = _threshold_on_shifts(bundle_dir, gate, scores)
    chosen = robustness.robust_threshold(y_true, probs) if choose_threshold else None
    if chosen is not None:
        meta.threshold = float(chosen["threshold"])
    report = robustness.robustness_report(y_true, probs, meta.threshold)
    full = {**report, "labels": y_true.tolist(), "probabilities": {k: v.round(6).tolist() for k, v in probs.items()}}
    (val_dir / "robustness.json").write_text(json.dumps(full) + "\n")
    (val_dir / "robustness.md").write_text(robustness.markdown_table(report))
    meta.metrics["robustness"] = {"summary": report["summary"], "shifts": report["shifts"]}
    write_meta(bundle_dir, meta)
    return {"summary": report["summary"], "shifts": report["shifts"], **({"threshold_rule": chosen} if chosen else {})}


def _threshold_on_shifts(bundle_dir: Path, gate: OodGate, scores: list[np.ndarray]) -> dict[str, Any]:
    """Set the gate's threshold on the validation X-rays *and* their robustness shifts; returns ``meta.ood``.

    A threshold on the clean validation films alone refused real films of the same hospital
    uploaded at full resolution (2 of the 14 samples for the round-4 model: draft decoding and
    resizing move the features off the dataset's 224 px copies). Reframed, blurred, noisy or
    re-compressed X-rays are still X-rays, so they belong in the sample the gate must accept.
    """
    gate.set_threshold(np.concatenate(scores), float(gate.info.get("quantile", DEFAULT_QUANTILE)),
                       "validation X-rays and their robustness shifts")  # fmt: skip
    return gate.save(bundle_dir)


def _fit_ood(bundle_dir: Path, feature_fn: FeatureFn, val_feats: np.ndarray) -> None:
    """Fit the out-of-distribution gate on the run's own features (train fit, val threshold)."""
    _, train_feats = feature_fn("train")
    gate = fit_ood(train_feats, val_feats)
    meta = read_meta(bundle_dir)
    meta.ood = gate.save(bundle_dir)
    write_meta(bundle_dir, meta)


def _write_int8(bundle_dir: Path, data: str) -> None:
    """Add the checked INT8 ONNX graph (:mod:`pneumo.modeling.quantize`); a bundle without it still works."""
    from pneumo.modeling.quantize import quantize_bundle

    try:
        quantize_bundle(bundle_dir, data)
    except PneumoError as err:
        log.warning("No INT8 graph in the bundle (it serves in fp32): %s", err.message)


def _version_from_time() -> str:
    return datetime.now(UTC).strftime("%Y.%m.%d.%H%M")


def extract_features(
    predictor: Predictor, sources: Sequence[Source], batch_size: int = 32
) -> tuple[np.ndarray, list[int]]:
    """Pooled features of ``sources`` through ``predictor``'s own decode/preprocess/forward path.

    Returns:
        ``(features, kept)``: one row per input that decoded, and the indices of those inputs
        (inputs that fail to decode are logged and skipped: the gate is fitted on what decodes).
    """
    rows: list[np.ndarray] = []
    kept: list[int] = []
    batch: list[np.ndarray] = []
    for index, source in enumerate(sources):
        try:
            batch.append(predictor.prepare(predictor.decode(source)))
            kept.append(index)
        except PneumoError as err:
            log.warning("Skipping %s: %s", source, err.message)
        if len(batch) == batch_size or (index == len(sources) - 1 and batch):
            rows.append(predictor.forward(np.stack(batch))[1])
            batch = []
            log.info("Features: %d / %d images", index + 1, len(sources))
    if not rows:
        raise ValueError("None of the inputs could be decoded; there is nothing to fit the OOD gate on.")
    return np.concatenate(rows), kept


def calibrate_bundle(
    bundle_dir: str | Path,
    train_files: Sequence[Source],
    val_files: Sequence[Source],
    *,
    quantile: float = DEFAULT_QUANTILE,
    n_components: int = DEFAULT_COMPONENTS,
    batch_size: int = 32,
    shifts: bool = True,
) -> dict[str, Any]:
    """Fit the gate with ``bundle_dir``'s own model and write it into the bundle (ood.safetensors + bundle.json).

    Use the bundle's training images for ``train_files`` and its validation images (other
    patients) for ``val_files``. With ``shifts`` the threshold accepts ``quantile`` of the
    validation images under the robustness validation's shifts too, as training does.
    Returns the new ``meta.ood`` entry.
    """
    from pneumo.evaluation import robustness

    predictor = Predictor(bundle_dir, check_ood=False)
    features_train, _ = extract_features(predictor, train_files, batch_size)
    features_val, _ = extract_features(predictor, val_files, batch_size)
    gate = fit_ood(features_train, features_val, quantile=quantile, n_components=n_components)
    meta = read_meta(predictor.bundle_dir)
    if shifts:  # the threshold as training sets it (see _threshold_on_shifts)
        size = predictor.preprocess_config.input_size  # keyed by file name, as training keys the shifts' seeds
        images = [(Path(f).name if isinstance(f, str | Path) else str(i), read_image(f, draft_size=size).image)
                  for i, f in enumerate(val_files)]  # fmt: skip
        scores: list[np.ndarray] = []
        robustness.shifted_probabilities(robustness.predictor_prob_fn(predictor, gate, scores), images)
        meta.ood = _threshold_on_shifts(predictor.bundle_dir, gate, scores)
    else:
        meta.ood = gate.save(predictor.bundle_dir)
    write_meta(predictor.bundle_dir, meta)
    log.info(
        "OOD gate written to %s: threshold %.3f refuses %.2f%% of %d validation X-rays.",
        predictor.bundle_dir,
        gate.threshold,
        100 * gate.info["val_refusal_rate"],
        len(features_val),
    )
    return meta.ood
