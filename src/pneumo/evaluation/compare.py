"""Training curves and run comparison: what `pneumo compare` and the end of each run draw."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pneumo.evaluation.report import format_ci


def read_metrics_csv(path: Path) -> dict[str, list[tuple[int, float]]]:
    """Per-epoch series from Lightning's CSV log: name -> [(epoch, value)]."""
    series: dict[str, dict[int, float]] = {}
    if not path.is_file():
        return {}
    with path.open() as file:
        rows = list(csv.DictReader(file))
    for row in rows:
        epoch = row.get("epoch")
        if epoch in (None, ""):
            continue
        for key, value in row.items():
            if key not in ("epoch", "step") and value not in (None, ""):
                series.setdefault(key, {})[int(float(epoch))] = float(value)
    return {k: sorted(v.items()) for k, v in series.items()}


def save_curves(metrics_csv: Path, out: Path, runs: Sequence[tuple[str, Path]] | None = None) -> Path:
    """Loss and validation-AUC curves of one run, or of several runs overlaid (``runs``: label, csv)."""
    figure = curves_figure(metrics_csv, runs)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out)
    return out


def curves_figure(metrics_csv: Path, runs: Sequence[tuple[str, Path]] | None = None) -> Any:
    """The matplotlib Figure :func:`save_curves` writes: loss (left) and validation ROC AUC (right) per epoch."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 4), dpi=110)
    FigureCanvasAgg(figure)
    loss_ax, auc_ax = figure.subplots(1, 2)
    for label, path in runs or [("", metrics_csv)]:
        series = read_metrics_csv(path)
        for key, style in (("train_loss", "-o"), ("val_loss", "--o")):  # markers: one epoch is one point, no line
            if key in series:
                x, y = zip(*series[key], strict=True)
                loss_ax.plot(x, y, style, markersize=3, label=f"{label} {key}".strip())
        if "val_auc" in series:
            x, y = zip(*series["val_auc"], strict=True)
            auc_ax.plot(x, y, "-o", markersize=3, label=label or "val_auc")
    loss_ax.set(title="Loss", xlabel="epoch")
    auc_ax.set(title="Validation ROC AUC", xlabel="epoch")
    for ax in (loss_ax, auc_ax):
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    figure.tight_layout()
    return figure


_COLUMNS = ("accuracy", "sensitivity", "specificity", "roc_auc")
#: Robustness columns of ``pneumo compare``: (header, summary metric, statistic).
_ROBUST_COLUMNS = (
    ("robust BA (mean)", "balanced_accuracy", "mean"),
    ("worst spec.", "specificity", "worst"),
    ("worst AUC", "roc_auc", "worst"),
)


def wall_time(training: dict) -> str:
    """The run's wall time: ``recipe_seconds`` (data to finished bundle, as run.json records it), else the
    training loop alone (runs from before it was recorded; marked, since the end of a run can take minutes)."""
    if training.get("recipe_seconds") is not None:
        return f"{training['recipe_seconds'] / 60:.1f} min"
    return f"{(training.get('cache_seconds', 0.0) + training.get('fit_seconds', 0.0)) / 60:.1f} min (fit only)"


def framing_cells(robustness: dict) -> list[str]:
    """The framing columns of a run: its framing, F (the largest change of the healthy films' PNEUMONIA
    share under a pad or crop, with the shift) and the mean absolute change in probability under them."""
    summary = robustness.get("framing", {}).get("summary", {})
    change, dp = summary.get("worst_normal_rate_change"), summary.get("mean_abs_dp")
    if not isinstance(change, int | float) or not isinstance(dp, int | float):
        return ["n/a", "n/a"]
    return [f"{100 * change:+.1f} pts ({summary.get('worst_normal_shift', '?')})", f"{dp:.3f}"]


def compare_runs(run_dirs: Sequence[Path], out_md: Path, curves_png: Path | None = None) -> str:
    """A Markdown table of runs side by side (validation metrics with CIs, settings, times) + overlaid curves."""
    rows = []
    for run in map(Path, run_dirs):
        record_path = run / "run.json"
        if not record_path.is_file():
            raise FileNotFoundError(f"{run} has no run.json; pass folders written by `pneumo train --out`.")
        rows.append((run, json.loads(record_path.read_text())))
    header = ["run", "arch", "framing", "phases", "optimizer", "augment", *_COLUMNS, *(c[0] for c in _ROBUST_COLUMNS),
              "framing F (healthy)", "framing mean abs dp", "threshold", "params", "wall time"]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for run, rec in rows:
        cfg, val, tr = rec["training"]["config"], rec["validation"], rec["training"]
        phases = f"{cfg['frozen_epochs']} frozen + {cfg['finetune_epochs']} x last {cfg['unfreeze_stages']} stages"
        if cfg["finetune_epochs"] == 0:
            phases = f"{cfg['frozen_epochs']} frozen (head only)"
        framing = cfg.get("framing") or "none"
        cells = [run.name, cfg["arch"], framing, phases, cfg["optimizer"], "yes" if cfg["augment"]["enabled"] else "no"]
        cells += [format_ci(val.get(m), val.get("ci", {}).get(m)) for m in _COLUMNS]
        robust = rec.get("robustness", {}).get("summary", {})
        for _, metric, stat in _ROBUST_COLUMNS:
            entry = robust.get(metric, {})
            value = entry.get(stat)
            worst = f" ({entry['worst_shift']})" if stat == "worst" and "worst_shift" in entry else ""
            cells.append(f"{value:.3f}{worst}" if isinstance(value, int | float) else "n/a")
        cells += framing_cells(rec.get("robustness", {}))
        cells += [f"{val['threshold']:.3f}", f"{tr['parameters'] / 1e6:.1f} M", wall_time(tr)]
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines) + "\n"
    out_md.parent.mkdir(parents=True, exist_ok=True)
    out_md.write_text(table)
    if curves_png is not None:
        save_curves(Path(), curves_png, [(run.name, run / "logs" / "metrics.csv") for run, _ in rows])
    return table
