"""The ``pneumo`` command line end to end on tiny synthetic data: train -> evaluate -> predict -> compare.

The commands run in-process through typer's CliRunner (the console script itself is exercised
by the DDP test, which needs real processes).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cli_helpers import restore_process_state  # noqa: F401  (autouse, module scope)
from conftest import write_tiny_dataset
from typer.testing import CliRunner

from pneumo.cli import app
from pneumo.core.bundle import read_meta

runner = CliRunner()


def invoke(*args: str | Path) -> Any:
    return runner.invoke(app, [str(a) for a in args])


@dataclass
class Trained:
    root: Path
    run: Path
    bundle: Path


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    """`pneumo train` with the default architecture (EfficientNet-Lite0, offline ImageNet weights), 1 epoch."""
    tmp = tmp_path_factory.mktemp("cli")
    root = write_tiny_dataset(tmp / "data")
    run = tmp / "run"
    result = invoke(
        "train", "--data", root, "--out", run, "--epochs", "1", "--frozen-epochs", "1",
        "--cache-views", "1", "--batch-size", "8", "--accelerator", "cpu", "--name", "cli-test",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert f"bundle written to {run / 'bundle'}" in result.stdout
    return Trained(root, run, run / "bundle")


def test_train_writes_a_bundle_of_the_default_arch(trained: Trained) -> None:
    meta = read_meta(trained.bundle)
    assert meta.arch == "efficientnet_lite0" and meta.name == "cli-test"
    config = meta.training.config
    assert config["frozen_epochs"] == 1 and config["finetune_epochs"] == 0 and config["pretrained"] is True
    assert config["cache_views"] == 1 and config["batch_size"] == 8
    assert meta.training.epochs_run == 1
    assert (trained.run / "run.json").is_file() and (trained.run / "curves.png").is_file()


_HEADLINE = ("accuracy", "sensitivity", "specificity", "precision", "f1", "roc_auc", "pr_auc", "ece")


@pytest.fixture(scope="module")
def evaluated(trained: Trained) -> tuple[dict[str, Any], str, Path]:
    """`pneumo evaluate ROOT/train --json m.json` once: the JSON, the console output and the JSON's path."""
    out = trained.run.parent / "m.json"
    result = invoke("evaluate", trained.root / "train", "--model", trained.bundle, "--json", out, "--n-boot", "100")
    assert result.exit_code == 0, result.output
    return json.loads(out.read_text()), result.stdout, out


def test_evaluate_writes_the_metrics_json(trained: Trained, evaluated: tuple[dict[str, Any], str, Path]) -> None:
    metrics, stdout, out = evaluated
    assert metrics["n_images"] == 24 and metrics["n_failed"] == 0
    for key in _HEADLINE:
        assert 0.0 <= metrics[key] <= 1.0, key
    (tn, fp), (fn, tp) = metrics["confusion_matrix"]
    assert tn + fp + fn + tp == 24 and tp + fn == 12
    assert metrics["accuracy"] == pytest.approx((tp + tn) / 24)
    assert metrics["threshold"] == read_meta(trained.bundle).threshold
    for key in ("accuracy", "sensitivity", "specificity", "roc_auc"):
        low, high = metrics["ci"][key]
        assert low <= metrics[key] <= high
    report = out.parent / "m_report"
    assert (report / "report.md").is_file() and (report / "roc.png").is_file()
    assert "roc_auc" in stdout


def test_predict_json_rows_and_exit_code(trained: Trained, tmp_path: Path) -> None:
    normal = sorted((trained.root / "train" / "NORMAL").iterdir())[:2]
    bad = tmp_path / "report.txt"
    bad.write_text("this is not an X-ray")
    out = tmp_path / "p.json"
    result = invoke("predict", normal[0], bad, normal[1], "--model", trained.bundle, "--json", out)
    assert result.exit_code == 1, result.output
    rows = json.loads(out.read_text())
    assert [row["file"] for row in rows] == [str(normal[0]), str(bad), str(normal[1])]
    threshold = read_meta(trained.bundle).threshold
    for row in (rows[0], rows[2]):
        assert row["label"] in ("NORMAL", "PNEUMONIA") and row["threshold"] == threshold
        assert (row["label"] == "PNEUMONIA") == (row["probability"] >= threshold)
        assert "error" not in row
    assert set(rows[1]) == {"file", "error"}
    assert set(rows[1]["error"]) == {"code", "message"} and rows[1]["error"]["code"] == "unsupported_format"

    # All good: exit 0; CSV too.
    csv_out = tmp_path / "p.csv"
    ok = invoke("predict", normal[0], "--model", trained.bundle, "--json", out, "--csv", csv_out)
    assert ok.exit_code == 0, ok.output
    header = csv_out.read_text().splitlines()[0].split(",")
    assert header[:4] == ["file", "label", "probability", "threshold"]
    assert {"error_code", "error_message"} <= set(header)


def test_predict_and_evaluate_agree(
    trained: Trained, evaluated: tuple[dict[str, Any], str, Path], tmp_path: Path
) -> None:
    """Both go through the one Predictor: accuracy from `predict` rows on a folder equals `evaluate`'s."""
    preds = tmp_path / "p.json"
    result = invoke("predict", trained.root / "train", "--model", trained.bundle, "--json", preds)
    assert result.exit_code == 0, result.output
    rows = json.loads(preds.read_text())
    assert len(rows) == 24  # the folder expanded into its files
    correct = sum((row["label"] == "PNEUMONIA") == ("/PNEUMONIA/" in row["file"]) for row in rows)
    assert evaluated[0]["accuracy"] == pytest.approx(correct / len(rows))


def test_compare_writes_one_row_per_run(trained: Trained, tmp_path: Path) -> None:
    second = tmp_path / "run2"
    shutil.copytree(trained.run, second, ignore=shutil.ignore_patterns("checkpoints", "bundle"))
    table, curves = tmp_path / "table.md", tmp_path / "curves.png"
    result = invoke("compare", trained.run, second, "--out", table, "--curves", curves)
    assert result.exit_code == 0, result.output
    lines = table.read_text().strip().splitlines()
    assert lines[0].startswith("| run | arch |") and set(lines[1]) <= {"|", "-"}
    assert len(lines) == 4
    assert lines[2].startswith(f"| {trained.run.name} | efficientnet_lite0 |")
    assert lines[3].startswith("| run2 | efficientnet_lite0 |")
    assert curves.read_bytes()[:4] == b"\x89PNG"

    missing = invoke("compare", trained.run, tmp_path, "--out", table)
    assert missing.exit_code == 2 and "run.json" in missing.output


def test_train_errors_are_one_line_not_tracebacks(tiny_dataset: Path, tmp_path: Path) -> None:
    result = invoke("train", "--data", tiny_dataset, "--optimizer", "sgd")
    assert result.exit_code == 2
    assert "error:" in result.output and "optimizer" in result.output and "Traceback" not in result.output
    assert invoke("train", "--data", tiny_dataset, "--pretrained", "maybe").exit_code == 2
    unknown = invoke("train", "--data", tiny_dataset, "--out", tmp_path / "run", "--arch", "no_such_net")
    assert unknown.exit_code == 2 and "no_such_net" in unknown.output


def test_train_options_map_onto_the_config(tiny_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pneumo.modeling import training

    seen: list[Any] = []
    monkeypatch.setattr(training, "fit", lambda config: seen.append(config))
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("optimizer: adamax\nfinetune_epochs: 9\nlr: 0.01\n")
    result = invoke(
        "train", "--config", yaml_file, "--data", tiny_dataset, "--epochs", "3", "--frozen-epochs", "1",
        "--optimizer", "adamw", "--augment", "false", "--feature-cache", "no", "--devices", "2",
        "--strategy", "ddp", "--weights", tmp_path / "w.pth",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    (config,) = seen
    assert config.optimizer == "adamw" and config.lr == 0.01  # CLI over YAML, YAML over defaults
    assert (config.frozen_epochs, config.finetune_epochs) == (1, 2)
    assert config.augment.enabled is False and config.feature_cache is False
    assert config.devices == "2" and config.strategy == "ddp"
    assert config.data == str(tiny_dataset) and config.weights == str(tmp_path / "w.pth")


def test_every_config_field_has_a_train_flag() -> None:
    """The flags are generated from TrainConfig: a new field (nested ones included) cannot miss its flag."""
    import dataclasses

    import typer.main

    from pneumo.modeling.config import AugmentConfig, TrainConfig

    command = typer.main.get_command(app).commands["train"]  # type: ignore[attr-defined]
    flags = {opt for param in command.params for opt in param.opts}
    for field in dataclasses.fields(TrainConfig):
        if field.name == "augment":
            for sub in dataclasses.fields(AugmentConfig):
                assert f"--augment-{sub.name.replace('_', '-')}" in flags, sub.name
        else:
            assert f"--{field.name.replace('_', '-')}" in flags, field.name
    assert {"--config", "--epochs", "--augment", "--weight-decay", "--finetune-epochs"} <= flags


def test_nested_and_formerly_missing_flags_reach_the_config(
    tiny_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pneumo.modeling import training

    seen: list[Any] = []
    monkeypatch.setattr(training, "fit", lambda config: seen.append(config))
    result = invoke(
        "train", "--data", tiny_dataset, "--weight-decay", "0.001", "--finetune-epochs", "0",
        "--augment-rotation-deg", "5", "--augment-hflip", "0.25", "--cache-dir", tmp_path / "cache",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    (config,) = seen
    assert config.weight_decay == 0.001 and config.finetune_epochs == 0
    assert config.augment.rotation_deg == 5.0 and config.augment.hflip == 0.25
    assert config.augment.zoom == 0.15  # untouched nested fields keep TrainConfig's defaults
    assert config.cache_dir == str(tmp_path / "cache")


# ------------------------------------------------------------------------------- real data (slow)


def _slice(source: Path, target: Path, per_class: int, skip_patients: set[str]) -> set[str]:
    """Symlink ``per_class`` files of each class (spread over the folder, whole new patients) into ``target``."""
    from pneumo.core.dataset import patient_id

    patients: set[str] = set()
    for class_dir in ("NORMAL", "PNEUMONIA"):
        files = sorted((source / class_dir).glob("*.jpeg"))
        chosen = [f for f in files[:: max(1, len(files) // (4 * per_class))] if patient_id(f.name) not in skip_patients]
        (target / class_dir).mkdir(parents=True)
        for path in chosen[:per_class]:
            (target / class_dir / path.name).symlink_to(path)
            patients.add(patient_id(path.name))
    return patients


@pytest.mark.slow
def test_smoke_run_on_a_slice_of_the_real_data(shared_data: Path, tmp_path: Path) -> None:
    source = shared_data / "chest_xray_224" / "train"
    if not source.is_dir():
        pytest.skip(f"{source} is absent")
    train_patients = _slice(source, tmp_path / "data" / "train", 40, set())
    _slice(source, tmp_path / "heldout", 20, train_patients)
    run = tmp_path / "run"
    result = invoke(
        "train", "--data", tmp_path / "data", "--out", run, "--epochs", "1", "--frozen-epochs", "1",
        "--cache-views", "0", "--batch-size", "8", "--accelerator", "cpu",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    metrics_path = tmp_path / "m.json"
    result = invoke("evaluate", tmp_path / "heldout", "-m", run / "bundle", "--json", metrics_path, "--n-boot", "200")
    assert result.exit_code == 0, result.output
    metrics = json.loads(metrics_path.read_text())
    assert metrics["n_images"] == 40 and metrics["n_failed"] == 0
    # ImageNet features separate these films well even after one head-only epoch on 68 of them.
    assert metrics["roc_auc"] > 0.7  # measured 0.84
