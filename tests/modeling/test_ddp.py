"""Two-process DDP on CPU (gloo): ``pneumo train --devices 2 --strategy ddp`` trains and writes one bundle.

Lightning's ``ddp`` strategy relaunches the running command once per extra rank, so this runs
the console script in a subprocess (as a user would), with a tiny timm model and one thread per
process so it stays gentle on a shared 2-core machine.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_tiny_dataset

from pneumo.core.bundle import read_meta


def _pneumo() -> list[str]:
    script = shutil.which("pneumo")
    return [script] if script else [sys.executable, "-m", "pneumo.cli"]


@pytest.mark.slow
def test_two_process_ddp_on_cpu_trains_and_rank_zero_alone_writes_the_bundle(tmp_path: Path) -> None:
    root = write_tiny_dataset(tmp_path / "data")
    run = tmp_path / "run"
    command = [
        *_pneumo(), "-v", "train", "--data", str(root), "--out", str(run), "--arch", "test_efficientnet",
        "--pretrained", "false", "--epochs", "1", "--frozen-epochs", "1", "--batch-size", "4",
        "--accelerator", "cpu", "--devices", "2", "--strategy", "ddp", "--feature-cache", "false",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("LOCAL_RANK", None)
    env.pop("MASTER_PORT", None)
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=420, env=env, cwd=tmp_path)
    except subprocess.TimeoutExpired as err:  # pragma: no cover - reported, not hidden
        pytest.fail(f"DDP training did not finish in {err.timeout} s:\n{err.stderr}")
    assert done.returncode == 0, done.stderr[-4000:]

    # Two ranks really ran, over gloo (Lightning's banners show with --verbose).
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in done.stderr
    assert "distributed_backend=gloo" in done.stderr
    # Only rank 0 finished the run: one "bundle written" line, not one per rank.
    assert done.stdout.count("bundle written to") == 1

    bundle = run / "bundle"
    meta = read_meta(bundle)
    assert (bundle / "weights.safetensors").is_file() and meta.arch == "test_efficientnet"
    assert meta.training.config["devices"] == "2" and meta.training.config["strategy"] == "ddp"
    assert meta.training.epochs_run == 1
    # Validation metrics of the bundle cover the whole validation split, not one rank's shard.
    assert meta.metrics["validation"]["n_images"] == meta.training.val_data["n_images"]
    val_rows = list(csv.DictReader((run / "validation" / "predictions.csv").open()))
    assert len(val_rows) == meta.training.val_data["n_images"]
    assert json.loads((run / "run.json").read_text())["bundle"] == str(bundle)
    metrics_lines = (run / "logs" / "metrics.csv").read_text().splitlines()
    assert sum(line.startswith("epoch,") for line in metrics_lines) == 1  # a single logger wrote it
    assert any("val_auc" in line for line in metrics_lines[:1])
