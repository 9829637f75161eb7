"""What a newcomer meets first (issue 23): help, version, one-line errors, data checks, quiet runs, honest output.

In-process through typer's CliRunner where that shows what a user sees; in a subprocess where the
question is what a fresh process imports or prints (Lightning's banners go to the stream it found
at import, which CliRunner cannot capture).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from cli_helpers import restore_process_state  # noqa: F401  (autouse, module scope)
from conftest import write_tiny_dataset
from typer.testing import CliRunner

import pneumo
from pneumo.cli import app

runner = CliRunner()
REPO = Path(__file__).resolve().parents[2]
#: Subprocesses import the pneumo under test (a relative PYTHONPATH=src would not survive their cwd).
ENV = {**os.environ, "PYTHONPATH": str(Path(pneumo.__file__).resolve().parents[1])}


def invoke(*args: str | Path) -> Any:
    return runner.invoke(app, [str(a) for a in args])


# ------------------------------------------------------------------------------------------- help


@pytest.mark.parametrize("command", [(), ("predict",), ("train",), ("evaluate",), ("data", "check")])
def test_help_shows_no_bool_placeholder_on_flags(command: tuple[str, ...]) -> None:
    result = invoke(*command, "--help")
    assert result.exit_code == 0, result.output
    assert "<bool>" not in result.output and "--help" in result.output


def test_every_train_option_has_its_own_help() -> None:
    from pneumo.cli.train import HELP, config_options
    from pneumo.modeling.config import TrainConfig

    paths = [option.path for option in config_options(TrainConfig)]
    assert [p for p in paths if p not in HELP] == []
    text = " ".join(invoke("train", "--help").output.split())
    for vague in ("Int8.", "Robustness.", "Num nodes.", "Num workers.", "Mixup.", "Augment: zoom."):
        assert vague not in text
    assert "--int8 true|false" in text and "--robustness true|false" in text


def test_version() -> None:
    result = invoke("--version")
    assert result.exit_code == 0 and result.output.strip() == f"pneumo {pneumo.__version__}"


# --------------------------------------------------------------------------------- train: errors


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, "does not exist"),
        ("arch: [unclosed\n", "is not valid YAML at line 2"),
        ("- a\n- b\n", "holds a list; expected a mapping"),
        ("augment:\n  spin: 3\n", "does not fit TrainConfig"),
        ("optimiser: adam\n", "Unknown training settings ['optimiser']"),
    ],
)
def test_bad_config_is_one_line(tiny_dataset: Path, tmp_path: Path, content: str | None, expected: str) -> None:
    config = tmp_path / "c.yaml"
    if content is not None:
        config.write_text(content)
    result = invoke("train", "--config", config, "--data", tiny_dataset)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.output


#: Runs ``pneumo train --data MISSING`` in a fresh process; prints what it imported and printed.
_PROBE = r"""
import contextlib, io, json, runpy, sys
err = io.StringIO()
sys.argv = ["pneumo", "train", "--data", sys.argv[1]]
with contextlib.redirect_stderr(err):
    try:
        runpy.run_module("pneumo.cli", run_name="__main__")
    except SystemExit as exit:
        code = exit.code
heavy = [m for m in ("torch", "lightning") if m in sys.modules]
print(json.dumps({"code": code, "stderr": err.getvalue(), "heavy": heavy}))
"""


def test_missing_data_root_fails_before_torch_loads(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", _PROBE, str(tmp_path / "nowhere")], capture_output=True, text=True,
                          cwd=tmp_path, env=ENV, timeout=120)  # fmt: skip
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["code"] == 2 and result["heavy"] == []
    assert result["stderr"].strip().splitlines() == [
        f"error: data root {tmp_path / 'nowhere'} does not exist; pass a folder with train/NORMAL and "
        "train/PNEUMONIA (README.md, 'Get the data')."
    ]


def test_data_root_without_class_folders_points_to_data_check(tmp_path: Path) -> None:
    result = invoke("train", "--data", tmp_path)
    assert result.exit_code == 2 and f"pneumo data check {tmp_path}" in result.output


# ------------------------------------------------------------------------------------ data check


def test_data_check_counts_splits_classes_and_patients(tmp_path: Path) -> None:
    root = write_tiny_dataset(tmp_path / "chest_xray", n_per_class=6, splits=("train", "test"))
    (root / "train" / "NORMAL" / "copy.jpeg").write_bytes(
        (root / "train" / "NORMAL" / "IM-0001-0001.jpeg").read_bytes()
    )
    report = tmp_path / "check.json"
    result = invoke("data", "check", root, "--json", report)
    assert result.exit_code == 0, result.output
    found = json.loads(report.read_text())
    train, test = found["splits"]["train"], found["splits"]["test"]
    assert train["counts"] == {"NORMAL": 7, "PNEUMONIA": 6} and test["counts"] == {"NORMAL": 6, "PNEUMONIA": 6}
    assert train["duplicate_files"] == 1 and test["duplicate_files"] == 0
    assert train["n_patients"] < train["n_images"] and train["patients_with_several_films"] >= 1
    assert found["shared_patients"]["test+train"] == test["n_patients"]  # the same names in both: a leak
    assert "Kaggle layout" in result.stdout and "train" in result.stdout and "test" in result.stdout
    assert "patients have films in both test and train" in result.output


def test_data_check_refuses_a_wrong_layout_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    result = invoke("data", "check", tmp_path)
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1
    assert "images/" in lines[0] and "expected train/NORMAL and train/PNEUMONIA" in lines[0]
    assert invoke("data", "check", tmp_path / "missing").exit_code == 2


def test_data_check_reads_the_examples() -> None:
    result = invoke("data", "check", REPO / "examples" / "films")
    assert result.exit_code == 0, result.output
    assert "class folders" in result.stdout and "      3          3" in result.stdout


# -------------------------------------------------------------------------------------- evaluate


def test_evaluate_split_option_on_a_kaggle_root_without_test(tmp_path: Path) -> None:
    root = write_tiny_dataset(tmp_path / "data", n_per_class=4)
    refused = invoke("evaluate", root, "--n-boot", "20")
    assert refused.exit_code == 2 and "--split train" in refused.output
    out = tmp_path / "m.json"
    result = invoke("evaluate", root, "--split", "train", "--json", out, "--n-boot", "20")
    assert result.exit_code == 0, result.output
    metrics = json.loads(out.read_text())
    assert metrics["data"] == str(root / "train") and metrics["n_images"] == 8
    assert "8 images" in result.stdout and "patients" in result.stdout


def test_evaluate_of_few_images_prints_no_collapsed_interval(tmp_path: Path) -> None:
    """The examples are six films the default model calls right: "95% CI 1.000-1.000" would claim certainty."""
    result = invoke("evaluate", REPO / "examples" / "films", "--json", tmp_path / "m.json", "--n-boot", "200")
    assert result.exit_code == 0, result.output
    assert "1.000-1.000" not in result.stdout
    assert "95% CI 0.541-1.000" in result.stdout  # 6 of 6 right: Clopper-Pearson, 0.025 ** (1 / 6)
    assert "no CI: too few images" in result.stdout  # ROC AUC is 1.0 in every resample


def test_evaluate_warns_once_about_films_the_model_saw(tmp_path: Path) -> None:
    from model_helpers import tiny_bundle

    from pneumo.core.dataset import discover
    from pneumo.evaluation.overlap import seen_images

    root = write_tiny_dataset(tmp_path / "data", n_per_class=4)
    samples = discover(root, "train")
    bundle, _ = tiny_bundle(tmp_path / "bundle", training={"seen_images": seen_images({"train": samples[:5]})})
    result = invoke("evaluate", root / "train", "--model", bundle, "--json", tmp_path / "m.json", "--n-boot", "20")
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.output.splitlines() if "were seen by" in line]
    assert warnings == ["warning: 5 of 8 images were seen by this model (5 in training, 0 in validation): "
                        "these figures overstate it on new children"]  # fmt: skip


# ----------------------------------------------------------------------------- quiet by default


@pytest.mark.slow
def test_train_prints_no_banners_tips_or_known_warnings(tmp_path: Path) -> None:
    root = write_tiny_dataset(tmp_path / "data")
    command = [sys.executable, "-m", "pneumo.cli", "train", "--data", str(root), "--out", str(tmp_path / "run"),
               "--epochs", "1", "--frozen-epochs", "1", "--cache-views", "1", "--batch-size", "8",
               "--accelerator", "cpu", "--int8", "false", "--robustness", "false"]  # fmt: skip
    proc = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == f"bundle written to {tmp_path / 'run' / 'bundle'}"
    for noise in ("Tip:", "GPU available", "Seed set", "eval mode", "LeafSpec", "log_every_n_steps", "Epoch 0"):
        assert noise not in proc.stderr, (noise, proc.stderr[-2000:])
    verbose = subprocess.run([*command[:3], "--verbose", *command[3:]], capture_output=True, text=True, cwd=tmp_path,
                             env=ENV, timeout=600)  # fmt: skip
    assert verbose.returncode == 0 and "GPU available" in verbose.stderr
