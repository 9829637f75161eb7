"""Run comparison and learning curves: the figures `pneumo compare` prints match what the run recorded."""

from __future__ import annotations

import json
from pathlib import Path

from pneumo.evaluation.compare import compare_runs, curves_figure, save_curves

#: Lightning's CSVLogger rows of a one-epoch run, as `pneumo train --epochs 1` writes them.
ONE_EPOCH = """epoch,epoch_seconds,lr-Adam,step,train_loss,val_acc,val_auc,val_loss
,,0.0003,0,,,,
0,,,2,,0.8,0.83,0.64
0,0.09,,2,0.71,,,
"""


def test_one_epoch_loss_curve_is_not_empty(tmp_path: Path) -> None:
    """One epoch is one point per series: a line style alone draws nothing, so every series needs a marker."""
    (tmp_path / "metrics.csv").write_text(ONE_EPOCH)
    figure = curves_figure(tmp_path / "metrics.csv")
    loss_ax, auc_ax = figure.axes
    assert sorted(line.get_label() for line in loss_ax.lines) == ["train_loss", "val_loss"]
    for line in [*loss_ax.lines, *auc_ax.lines]:
        assert len(line.get_xdata()) == 1 and line.get_marker() not in (None, "", "None", " "), line.get_label()
    assert save_curves(tmp_path / "metrics.csv", tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"


def _run(folder: Path, training: dict) -> Path:
    folder.mkdir(parents=True)
    config = {"arch": "efficientnet_lite0", "frozen_epochs": 1, "finetune_epochs": 6, "unfreeze_stages": 5,
              "optimizer": "adam", "augment": {"enabled": True}}  # fmt: skip
    record = {"training": {"config": config, "parameters": 4.1e6, **training},
              "validation": {"threshold": 0.2, "accuracy": 0.9, "ci": {}}}  # fmt: skip
    (folder / "run.json").write_text(json.dumps(record))
    return folder


def test_compare_reports_the_recorded_wall_time(tmp_path: Path) -> None:
    """A 7.2-minute recipe was reported as "3.1 min": the training loop alone, not the run."""
    timed = _run(tmp_path / "timed", {"cache_seconds": 0.0, "fit_seconds": 186.0, "recipe_seconds": 432.0})
    older = _run(tmp_path / "older", {"cache_seconds": 60.0, "fit_seconds": 126.0})
    table = compare_runs([timed, older], tmp_path / "t.md")
    header, _, first, second = table.strip().splitlines()
    assert header.split("|")[-2].strip() == "wall time"
    assert first.split("|")[-2].strip() == "7.2 min"
    assert second.split("|")[-2].strip() == "3.1 min (fit only)"


def test_compare_shows_the_framing_and_its_consistency(tmp_path: Path) -> None:
    """Issue 19: F and the mean change in probability under framing shifts, beside the run's framing."""
    framed = _run(tmp_path / "framed", {"recipe_seconds": 1500.0})
    record = json.loads((framed / "run.json").read_text())
    record["training"]["config"]["framing"] = "lungbox-v1"
    summary = {"worst_normal_rate_change": -0.0149, "worst_normal_shift": "crop_top_bottom_12", "mean_abs_dp": 0.0181}
    record["robustness"] = {"framing": {"summary": summary}}
    (framed / "run.json").write_text(json.dumps(record))
    plain = _run(tmp_path / "plain", {"recipe_seconds": 1600.0})
    header, _, first, second = (
        line.split("|")[1:-1] for line in compare_runs([framed, plain], tmp_path / "t.md").strip().splitlines()
    )
    column = {name.strip(): i for i, name in enumerate(header)}
    assert first[column["framing"]].strip() == "lungbox-v1" and second[column["framing"]].strip() == "none"
    assert first[column["framing F (healthy)"]].strip() == "-1.5 pts (crop_top_bottom_12)"
    assert first[column["framing mean abs dp"]].strip() == "0.018"
    assert second[column["framing F (healthy)"]].strip() == "n/a"
