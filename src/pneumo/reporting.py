"""Run records: finishing a training run into a bundle, learning curves, and comparing runs.

A run folder (``pneumo train --out RUN``) holds ``bundle/`` (the model bundle), ``logs/metrics.csv``
(Lightning's CSV logger), ``curves.png``, ``validation/`` (report and plots) and ``run.json``
(what :func:`compare_runs` reads).
"""

from __future__ import annotations

import csv
import json
import logging
import platform
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from pneumo.bundle import BundleMeta, save_bundle
from pneumo.metrics import (
    evaluation_report,
    fit_temperature,
    format_ci,
    markdown_report,
    save_plots,
    select_threshold,
    softmax_with_temperature,
)

log = logging.getLogger(__name__)

FeatureFn = Callable[[str], tuple[np.ndarray, np.ndarray]]


def finish_run(
    model: nn.Module, spec: Any, config: Any, dm: Any, feature_fn: FeatureFn, record: dict[str, Any]
) -> Path:
    """Calibrate on validation data, choose the threshold, fit the OOD gate and write the bundle.

    The order matters: temperature first (it changes probabilities), then the threshold on the
    calibrated probabilities, so the bundle's threshold applies to what the Predictor outputs.
    """
    out = Path(config.out)
    labels = list(dm.label_names)
    positive = [i for i, name in enumerate(labels) if name != "NORMAL"]
    val_logits, val_feats = feature_fn("val")
    y_class = np.array([s.label for s in dm.val_samples])
    y_true = np.isin(y_class, positive).astype(int)
    temperature = fit_temperature(val_logits, y_class)
    prob = softmax_with_temperature(val_logits, temperature)[:, positive].sum(1)
    threshold = select_threshold(y_true, prob, config.threshold_rule, config.target_sensitivity)
    rule = config.threshold_rule + (
        f" (target {config.target_sensitivity})" if config.threshold_rule == "sensitivity" else ""
    )
    report = evaluation_report(y_true, prob, threshold)
    val_dir = out / "validation"
    report["plots"] = {k: p.name for k, p in save_plots(y_true, prob, threshold, val_dir).items()}
    (val_dir / "report.md").write_text(markdown_report(report, f"Validation of {config.name or config.arch}"))
    (val_dir / "predictions.csv").write_text(
        "file,label,probability\n" + "".join(f"{s.path},{y},{p:.6f}\n" for s, y, p in zip(dm.val_samples, y_true, prob))
    )

    meta = BundleMeta(
        arch=config.arch,
        timm_name=spec.timm_name,
        labels=labels,
        positive_labels=[labels[i] for i in positive],
        preprocess=spec.preprocess,
        threshold=float(threshold),
        threshold_rule=f"{rule} on the validation split ({dm.split_description}), after temperature scaling",
        temperature=float(temperature),
        name=config.name or f"pneumo-{config.arch}",
        version=_version_from_time(),
        training={**record, "hardware": _hardware()},
        metrics={"validation": {k: v for k, v in report.items() if k != "plots"}},
    )
    bundle_dir = save_bundle(out / "bundle", model, meta)
    _fit_ood(bundle_dir, feature_fn, val_feats)
    save_curves(out / "logs" / "metrics.csv", out / "curves.png")
    summary = {
        "name": meta.name,
        "arch": config.arch,
        "bundle": str(bundle_dir),
        "validation": meta.metrics["validation"],
        "training": record,
    }
    if getattr(config, "robustness", False):
        summary["robustness"] = _robustness(bundle_dir, dm.val_samples, val_dir)
    (out / "run.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    log.info("Validation: %s", format_ci(report["roc_auc"], report["ci"].get("roc_auc")))
    return bundle_dir


def _robustness(bundle_dir: Path, samples: Sequence[Any], val_dir: Path) -> dict[str, Any]:
    """Score the finished bundle on the robustness validation through the Predictor; keep the summary.

    The full report (per shift, with CIs and every probability) goes to ``validation/robustness.json``;
    the per-shift metrics and the summary also go into the bundle's metrics, so the model card and
    ``pneumo compare`` read them from one place.
    """
    from pneumo import robustness
    from pneumo.bundle import read_meta, write_meta
    from pneumo.inference import Predictor

    predictor = Predictor(bundle_dir, check_ood=False)
    images = robustness.load_images(samples, predictor.preprocess_config.input_size)
    y_true = np.array([int(s.label != 0) for s in samples])
    probs = robustness.shifted_probabilities(robustness.predictor_prob_fn(predictor), images)
    report = robustness.robustness_report(y_true, probs, predictor.threshold)
    (val_dir / "robustness.json").write_text(
        json.dumps(
            {**report, "labels": y_true.tolist(), "probabilities": {k: v.round(6).tolist() for k, v in probs.items()}}
        )
        + "\n"
    )
    (val_dir / "robustness.md").write_text(robustness.markdown_table(report))
    meta = read_meta(bundle_dir)
    meta.metrics["robustness"] = {"summary": report["summary"], "shifts": report["shifts"]}
    write_meta(bundle_dir, meta)
    return {"summary": report["summary"], "shifts": report["shifts"]}


def _fit_ood(bundle_dir: Path, feature_fn: FeatureFn, val_feats: np.ndarray) -> None:
    """Fit the out-of-distribution gate on the run's own features (train fit, val threshold)."""
    try:
        from pneumo import ood
    except ImportError:  # pragma: no cover - ood.py ships with the package
        log.warning("pneumo.ood is unavailable; the bundle has no OOD gate.")
        return
    from pneumo.bundle import read_meta, write_meta

    _, train_feats = feature_fn("train")
    gate = ood.fit_ood(train_feats, val_feats)
    meta = read_meta(bundle_dir)
    meta.ood = gate.save(bundle_dir)
    write_meta(bundle_dir, meta)


def _version_from_time() -> str:
    from datetime import UTC, datetime

    return datetime.now(UTC).strftime("%Y.%m.%d.%H%M")


def _hardware() -> dict[str, Any]:
    import os

    import torch

    info: dict[str, Any] = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def read_metrics_csv(path: Path) -> dict[str, list[tuple[int, float]]]:
    """Per-epoch series from Lightning's CSV log: name -> [(epoch, value)]."""
    series: dict[str, dict[int, float]] = {}
    if not path.is_file():
        return {}
    for row in csv.DictReader(path.open()):
        epoch = row.get("epoch")
        if epoch in (None, ""):
            continue
        for key, value in row.items():
            if key not in ("epoch", "step") and value not in (None, ""):
                series.setdefault(key, {})[int(float(epoch))] = float(value)
    return {k: sorted(v.items()) for k, v in series.items()}


def save_curves(metrics_csv: Path, out: Path, runs: Sequence[tuple[str, Path]] | None = None) -> Path:
    """Loss and validation-AUC curves of one run, or of several runs overlaid (``runs``: label, csv)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 4), dpi=110)
    FigureCanvasAgg(figure)
    loss_ax, auc_ax = figure.subplots(1, 2)
    for label, path in runs or [("", metrics_csv)]:
        series = read_metrics_csv(path)
        for key, style in (("train_loss", "-"), ("val_loss", "--")):
            if key in series:
                x, y = zip(*series[key], strict=True)
                loss_ax.plot(x, y, style, label=f"{label} {key}".strip())
        if "val_auc" in series:
            x, y = zip(*series["val_auc"], strict=True)
            auc_ax.plot(x, y, "-o", markersize=3, label=label or "val_auc")
    loss_ax.set(title="Loss", xlabel="epoch")
    auc_ax.set(title="Validation ROC AUC", xlabel="epoch")
    for ax in (loss_ax, auc_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out)
    return out


_COLUMNS = ("accuracy", "sensitivity", "specificity", "roc_auc")
#: Robustness columns of ``pneumo compare``: (header, summary metric, statistic).
_ROBUST_COLUMNS = (
    ("robust BA (mean)", "balanced_accuracy", "mean"),
    ("worst spec.", "specificity", "worst"),
    ("worst AUC", "roc_auc", "worst"),
)


def compare_runs(run_dirs: Sequence[Path], out_md: Path, curves_png: Path | None = None) -> str:
    """A Markdown table of runs side by side (validation metrics with CIs, settings, times) + overlaid curves."""
    rows = []
    for run in map(Path, run_dirs):
        record_path = run / "run.json"
        if not record_path.is_file():
            raise FileNotFoundError(f"{run} has no run.json; pass folders written by `pneumo train --out`.")
        rows.append((run, json.loads(record_path.read_text())))
    header = ["run", "arch", "phases", "optimizer", "augment", *_COLUMNS, *(c[0] for c in _ROBUST_COLUMNS),
              "threshold", "params", "train time"]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for run, rec in rows:
        cfg, val, tr = rec["training"]["config"], rec["validation"], rec["training"]
        phases = f"{cfg['frozen_epochs']} frozen + {cfg['finetune_epochs']} x last {cfg['unfreeze_stages']} stages"
        if cfg["finetune_epochs"] == 0:
            phases = f"{cfg['frozen_epochs']} frozen (head only)"
        cells = [run.name, cfg["arch"], phases, cfg["optimizer"], "yes" if cfg["augment"]["enabled"] else "no"]
        cells += [format_ci(val.get(m), val.get("ci", {}).get(m)) for m in _COLUMNS]
        robust = rec.get("robustness", {}).get("summary", {})
        for _, metric, stat in _ROBUST_COLUMNS:
            entry = robust.get(metric, {})
            value = entry.get(stat)
            worst = f" ({entry['worst_shift']})" if stat == "worst" and "worst_shift" in entry else ""
            cells.append(f"{value:.3f}{worst}" if isinstance(value, int | float) else "n/a")
        minutes = (tr["cache_seconds"] + tr["fit_seconds"]) / 60
        cells += [f"{val['threshold']:.3f}", f"{tr['parameters'] / 1e6:.1f} M", f"{minutes:.1f} min"]
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines) + "\n"
    out_md.parent.mkdir(parents=True, exist_ok=True)
    out_md.write_text(table)
    if curves_png is not None:
        save_curves(Path(), curves_png, [(run.name, run / "logs" / "metrics.csv") for run, _ in rows])
    return table
