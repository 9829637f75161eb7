"""Training (``pneumo.modeling.training``): config, one tiny fit end to end, staged unfreezing, both data paths.

The fits use timm's ``test_efficientnet`` / ``test_resnet`` (100k parameters, 160 px) so they run
in seconds on a shared CPU; "pretrained" weights are a saved random initialisation passed as
``weights``, which lets a test rebuild the exact starting point and compare against it.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
from conftest import write_tiny_dataset

from pneumo.core.bundle import WEIGHTS_FILE, read_meta
from pneumo.core.errors import BundleError, PneumoError
from pneumo.evaluation.metrics import select_threshold
from pneumo.modeling import training
from pneumo.modeling.config import AugmentConfig, TrainConfig
from pneumo.modeling.models import create_model, stage_modules
from pneumo.modeling.torch_backend import torch_predictor
from pneumo.modeling.training import fit


def _save_start_weights(arch: str, path: Path) -> Path:
    torch.manual_seed(123)
    torch.save(create_model(arch, pretrained=False).state_dict(), path)
    return path


def _tiny_config(folder: Path, arch: str, **settings: Any) -> TrainConfig:
    """A CPU run on the tiny dataset in ``folder``, from seeded start weights (saved there), batch 8."""
    weights = _save_start_weights(arch, folder / "start.pth")
    base: dict[str, Any] = {"data": str(write_tiny_dataset(folder / "data")), "out": str(folder / "run"),
                            "arch": arch, "weights": str(weights), "batch_size": 8, "accelerator": "cpu",
                            "devices": "1"}  # fmt: skip
    return TrainConfig(**{**base, **settings})


def _module_of(key: str) -> str:
    return key.rsplit(".", 1)[0]


def _batchnorm_keys(model: torch.nn.Module, buffers_only: bool = False) -> set[str]:
    """State-dict keys of every BatchNorm layer (scale, shift and running statistics, or the statistics only)."""
    return {
        f"{name}.{key}"
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm)
        for key in (dict(module.named_buffers()) if buffers_only else module.state_dict())
    }


def _keys_in(groups: list[list[str]], state: dict[str, torch.Tensor]) -> list[str]:
    names = {name for group in groups for name in group}
    return [k for k in state if _module_of(k) in names and not k.endswith("num_batches_tracked")]


@dataclass
class Run:
    config: TrainConfig
    bundle: Path
    snapshots: list[dict[str, torch.Tensor]]  # the model's state at the end of each training epoch
    start: dict[str, torch.Tensor]  # the "pretrained" starting point, rebuilt fresh


@pytest.fixture(scope="module")
def cached_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    """Two epochs on the tiny dataset with the feature cache: head only, then the last 2 stages."""
    tmp = tmp_path_factory.mktemp("train")
    config = _tiny_config(
        tmp,
        "test_efficientnet",
        frozen_epochs=1,
        finetune_epochs=1,
        unfreeze_stages=2,
        cache_views=1,
        lr=1e-2,  # a tiny dataset and two epochs: learn fast enough for the probabilities to spread
        finetune_lr=1e-3,
        name="tiny",
    )
    snapshots: list[dict[str, torch.Tensor]] = []

    class Recording(training.StagedFinetuning):
        def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            model = pl_module.net.model  # the cached-feature suffix holds the whole model
            snapshots.append({k: v.detach().clone() for k, v in model.state_dict().items()})

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(training, "StagedFinetuning", Recording)
        bundle = fit(config)
    assert bundle is not None
    start = create_model("test_efficientnet", weights=config.weights).state_dict()
    yield Run(config, bundle, snapshots, start)


def test_fit_writes_a_complete_run(cached_run: Run) -> None:
    out = Path(cached_run.config.out)
    assert cached_run.bundle == out / "bundle"
    assert (cached_run.bundle / WEIGHTS_FILE).is_file()
    meta = json.loads((cached_run.bundle / "bundle.json").read_text())
    assert meta["arch"] == "test_efficientnet" and meta["labels"] == ["NORMAL", "PNEUMONIA"]
    assert 0.0 <= meta["threshold"] <= 1.0 and meta["temperature"] > 0
    assert "youden" in meta["threshold_rule"] and "validation" in meta["threshold_rule"]
    validation = meta["metrics"]["validation"]
    assert {"roc_auc", "accuracy", "sensitivity", "specificity", "ci"} <= set(validation)
    assert validation["threshold"] == meta["threshold"]
    record = meta["training"]
    assert record["config"]["arch"] == "test_efficientnet" and record["config"]["unfreeze_stages"] == 2
    assert record["epochs_run"] == 2 and record["best_epoch"] in (0, 1)
    assert validation["n_images"] == record["val_data"]["n_images"] > 0
    assert record["train_data"]["n_images"] + record["val_data"]["n_images"] == 24
    assert meta["ood"] is not None and (cached_run.bundle / "ood.safetensors").is_file()
    # The gate's threshold accepts the validation X-rays under every robustness shift, not the clean ones only.
    n_val = record["val_data"]["n_images"]
    assert meta["ood"]["threshold_sample"] == "validation X-rays and their robustness shifts"
    assert meta["ood"]["n_val"] == n_val * len(meta["metrics"]["robustness"]["shifts"]) > n_val
    assert meta["preprocess"]["input_size"] == 160

    run = json.loads((out / "run.json").read_text())
    assert run["arch"] == "test_efficientnet" and run["bundle"] == str(cached_run.bundle)
    assert run["validation"]["roc_auc"] == validation["roc_auc"]
    # Where the time went: one wall time per epoch, and the whole recipe (training folder to bundle) above the fit.
    times = run["training"]
    epochs = times["epoch_seconds"]  # a tiny epoch can round to 0.0
    assert len(epochs) == 2 and all(t >= 0 for t in epochs) and sum(epochs) > 0
    assert times["recipe_seconds"] > times["fit_seconds"]
    assert times["fit_seconds"] + 0.1 >= sum(epochs)  # fit_seconds is rounded to 0.1 s

    rows = list(csv.DictReader((out / "logs" / "metrics.csv").open()))
    val_epochs = sorted(int(r["epoch"]) for r in rows if r.get("val_auc"))
    assert val_epochs == [0, 1]
    assert any(r.get("train_loss") for r in rows)
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "validation" / "report.md").is_file()

    # The robustness validation: every shift scored on the validation images, in run.json and the bundle.
    from pneumo.evaluation.robustness import SHIFTS

    robust = run["robustness"]
    assert set(robust["shifts"]) == set(SHIFTS)
    assert all(m["n_images"] == validation["n_images"] for m in robust["shifts"].values())
    assert robust["shifts"]["clean"]["roc_auc"] == pytest.approx(validation["roc_auc"], abs=1e-6)
    assert set(robust["summary"]) >= {"roc_auc", "specificity", "balanced_accuracy"}
    assert meta["metrics"]["robustness"]["summary"] == robust["summary"]
    full = json.loads((out / "validation" / "robustness.json").read_text())
    assert len(full["probabilities"]["crop_top_bottom_12"]) == validation["n_images"]


def test_robust_threshold_rule_runs_inside_training(tmp_path: Path) -> None:
    """``threshold_rule: robust``: the bundle's threshold is the model card's rule on the run's own shifted scores."""
    from pneumo.evaluation.robustness import robust_threshold

    config = _tiny_config(
        tmp_path, "test_efficientnet", frozen_epochs=1, finetune_epochs=0, lr=1e-2, threshold_rule="robust", int8=False
    )
    bundle = fit(config)
    assert bundle is not None
    meta = read_meta(bundle)
    full = json.loads((tmp_path / "run" / "validation" / "robustness.json").read_text())
    probs = {k: np.asarray(v, dtype=np.float64) for k, v in full["probabilities"].items()}
    chosen = robust_threshold(np.asarray(full["labels"]), probs)
    assert meta.threshold == pytest.approx(chosen["threshold"], abs=2e-6)  # the JSON rounds to 1e-6
    assert meta.threshold_rule.startswith(f"robust: {chosen['description']}")
    assert meta.metrics["validation"]["threshold"] == meta.threshold == full["threshold"]
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["robustness"]["threshold_rule"]["threshold"] == pytest.approx(meta.threshold)


def test_train_seed_changes_the_model_not_the_validation_children(tmp_path: Path) -> None:
    """``train_seed`` alone moves initialization and shuffling; the patient split stays ``seed``'s."""
    runs = {}
    for train_seed in (1, 2):
        (tmp_path / str(train_seed)).mkdir()
        config = _tiny_config(
            tmp_path / str(train_seed), "test_efficientnet", frozen_epochs=1, finetune_epochs=0, lr=1e-2,
            train_seed=train_seed, robustness=False, int8=False,
        )  # fmt: skip
        bundle = fit(config)
        assert bundle is not None
        files, _, prob = _validation_predictions(Path(config.out))
        runs[train_seed] = ([Path(f).name for f in files], prob)
    assert runs[1][0] == runs[2][0]  # the same children in validation
    assert not np.allclose(runs[1][1], runs[2][1])  # trained differently


def _validation_predictions(out: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    rows = list(csv.DictReader((out / "validation" / "predictions.csv").open()))
    files = [r["file"] for r in rows]
    return files, np.array([int(r["label"]) for r in rows]), np.array([float(r["probability"]) for r in rows])


def test_bundle_threshold_is_the_rule_applied_to_validation_predictions(cached_run: Run) -> None:
    files, y_true, prob = _validation_predictions(Path(cached_run.config.out))
    assert len(files) == read_meta(cached_run.bundle).training.val_data["n_images"]
    assert set(y_true) == {0, 1}
    assert all("/PNEUMONIA/" in f for f, y in zip(files, y_true) if y == 1)
    expected = select_threshold(y_true, prob, "youden")
    assert read_meta(cached_run.bundle).threshold == pytest.approx(expected, abs=2e-6)  # the CSV rounds to 1e-6


def test_validation_probabilities_are_what_the_predictor_gives(cached_run: Run) -> None:
    """The threshold was chosen on these numbers; it is only right if the Predictor reproduces them."""
    files, _, prob = _validation_predictions(Path(cached_run.config.out))
    predictor = torch_predictor(cached_run.bundle, check_ood=False)
    served = np.array([predictor.predict(Path(f)).probability for f in files])
    # The cache stores the frozen prefix's output as float16, hence a tolerance (measured: 2e-5); it
    # must stay well below the spread of the probabilities, or a threshold between them would be moot.
    assert np.abs(served - prob).max() < 2e-4
    assert np.ptp(prob) > 10 * 2e-4


def test_staged_unfreezing_trains_exactly_the_unfrozen_stages(cached_run: Run) -> None:
    after_head_phase, after_finetune = cached_run.snapshots
    stages = stage_modules(create_model("test_efficientnet", pretrained=False))
    frozen_prefix = _keys_in(stages[:-3], cached_run.start)
    unfrozen = _keys_in(stages[-3:-1], cached_run.start)
    head = _keys_in(stages[-1:], after_finetune)
    assert frozen_prefix and unfrozen and head

    # Phase 1: only the head moved; the whole backbone (BatchNorm statistics included) is untouched.
    for key in frozen_prefix + unfrozen:
        assert torch.equal(after_head_phase[key], cached_run.start[key]), f"phase 1 changed {key}"
    assert any(not torch.equal(after_head_phase[k], after_finetune[k]) for k in head)

    # Phase 2: every unfrozen parameter moved, BatchNorm's scale and shift included, but no BatchNorm
    # statistic (they stay ImageNet's); the frozen prefix is still bit-identical.
    model = create_model("test_efficientnet", pretrained=False)
    params = {name for name, _ in model.named_parameters()}
    stats = _batchnorm_keys(model, buffers_only=True)
    moved = [k for k in unfrozen if k in params and not torch.equal(after_finetune[k], cached_run.start[k])]
    assert moved == [k for k in unfrozen if k in params]
    assert any(k in _batchnorm_keys(model) for k in moved), "the unfrozen BatchNorm scale and shift train"
    assert [k for k in unfrozen if k in stats] and all(
        torch.equal(after_finetune[k], cached_run.start[k]) for k in unfrozen if k in stats
    )
    for key in frozen_prefix:
        assert torch.equal(after_finetune[key], cached_run.start[key]), f"phase 2 changed frozen {key}"

    # And the bundle holds a model whose frozen prefix is the starting point.
    from safetensors.torch import load_file

    saved = load_file(str(cached_run.bundle / WEIGHTS_FILE))
    assert all(torch.equal(saved[k], cached_run.start[k]) for k in frozen_prefix)


def test_phase_two_group_joins_the_cosine_schedule_where_it_stands(cached_run: Run) -> None:
    """At the unfreezing epoch the new group runs at finetune_lr times the factor the head's schedule reached."""
    rows = list(csv.DictReader((Path(cached_run.config.out) / "logs" / "metrics.csv").open()))
    logged = [r for r in rows if r.get("lr-Adam/pg2")]
    assert logged, "the second parameter group's learning rate was logged"
    head, body = float(logged[0]["lr-Adam/pg1"]), float(logged[0]["lr-Adam/pg2"])
    factor = head / cached_run.config.lr
    assert 0.0 < factor < 1.0  # the cosine schedule had already stepped
    assert body == pytest.approx(cached_run.config.finetune_lr * factor, rel=1e-6)


def test_training_without_the_cache_unfreezes_any_timm_model(tmp_path: Path) -> None:
    """The image path (no cache), on a non-EfficientNet: one fine-tuning epoch of the last stage."""
    config = _tiny_config(
        tmp_path, "test_resnet", frozen_epochs=0, finetune_epochs=1, unfreeze_stages=1, feature_cache=False,
        robustness=False, int8=False,  # only the weights are checked: the end of the run stays short
    )  # fmt: skip
    bundle = fit(config)
    assert bundle is not None and read_meta(bundle).arch == "test_resnet"
    from safetensors.torch import load_file

    saved = load_file(str(bundle / WEIGHTS_FILE))
    start = create_model("test_resnet", weights=config.weights).state_dict()
    stages = stage_modules(create_model("test_resnet", pretrained=False))
    frozen, last = _keys_in(stages[:-2], start), _keys_in(stages[-2:-1], start)
    assert all(torch.equal(saved[k], start[k]) for k in frozen), "frozen stages (or their BatchNorm stats) moved"
    stats = _batchnorm_keys(create_model("test_resnet", pretrained=False), buffers_only=True)
    assert all(not torch.equal(saved[k], start[k]) for k in last if k.endswith("weight"))
    assert all(torch.equal(saved[k], start[k]) for k in last if k in stats), "BatchNorm statistics stay ImageNet's"
    torch_predictor(bundle, check_ood=False)  # loads


def test_feature_cache_refuses_to_fine_tune_a_model_it_cannot_split(tmp_path: Path) -> None:
    config = TrainConfig(
        data=str(write_tiny_dataset(tmp_path / "data", n_per_class=4)),
        out=str(tmp_path / "run"),
        arch="test_resnet",
        pretrained=False,
        frozen_epochs=0,
        finetune_epochs=1,
        unfreeze_stages=1,
        accelerator="cpu",
    )
    with pytest.raises(PneumoError) as info:
        fit(config)
    assert info.value.code == "feature_cache_unsupported"


# ----------------------------------------------------------------------------------------- config


def test_config_from_yaml_with_nested_augment_and_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("arch: vgg19\nlr: 0.0005\naugment:\n  rotation_deg: 5\n  hflip: 0.0\n  enabled: true\n")
    config = TrainConfig.from_yaml(path)
    assert config.arch == "vgg19" and config.lr == 0.0005
    assert isinstance(config.augment, AugmentConfig) and config.augment.rotation_deg == 5
    assert TrainConfig.from_dict(config.to_dict()) == config
    (tmp_path / "empty.yaml").write_text("")
    assert TrainConfig.from_yaml(tmp_path / "empty.yaml") == TrainConfig()


def test_config_unknown_key_is_a_pneumo_error(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("arch: vgg19\nlearning_rate: 0.1\n")
    with pytest.raises(PneumoError) as info:
        TrainConfig.from_yaml(path)
    assert info.value.code == "bad_config" and "learning_rate" in info.value.message


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"optimizer": "sgd"}, "optimizer"),
        ({"scheduler": "step"}, "scheduler"),
        ({"frozen_epochs": 0, "finetune_epochs": 0}, "at least one epoch"),
        ({"data": ""}, "--data"),
        ({"mixup": -0.2}, "mixup"),
        ({"threshold_rule": "median"}, "threshold rule"),
        ({"threshold_rule": "robust", "robustness": False}, "robustness"),
    ],
)
def test_bad_settings_are_refused_before_any_work(change: dict[str, Any], words: str) -> None:
    config = TrainConfig(**{"data": "/nonexistent", **change})
    with pytest.raises(PneumoError, match=words) as info:
        fit(config)
    assert info.value.code == "bad_config"


def test_mixup_mixes_inputs_and_both_labels() -> None:
    """With mixup the loss is the lam-weighted loss of both label sets on the mixed input."""
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 2)
    config = TrainConfig(data="x", mixup=0.4, label_smoothing=0.0)
    system = training.XrayClassifier(net, [net], config, 2, [1])
    x, y = torch.randn(6, 4), torch.tensor([0, 1, 0, 1, 1, 0])
    plain = TrainConfig(data="x", mixup=0.0, label_smoothing=0.0)
    unmixed = training.XrayClassifier(net, [net], plain, 2, [1])
    system.log = unmixed.log = lambda *a, **k: None  # type: ignore[method-assign]
    mixed_losses = {round(float(system.training_step((x, y), 0)), 6) for _ in range(5)}
    assert len(mixed_losses) > 1  # a new mixing coefficient and pairing every step
    assert float(unmixed.training_step((x, y), 0)) == pytest.approx(float(torch.nn.functional.cross_entropy(net(x), y)))


_ROUND_TRIP = """
import ctypes, resource, sys
from pneumo.modeling.training import keep_freed_memory
if sys.argv[1] == "keep" and not keep_freed_memory():
    print("unsupported"); sys.exit()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
size = 64 << 20  # over glibc's largest mmap threshold (32 MB), like a batch's activations
def round_trip():
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)
    libc.free(ctypes.c_void_p(block))
round_trip()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
round_trip()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_keep_freed_memory_stops_refaulting_large_blocks() -> None:
    """A 64 MB block freed and allocated again: glibc's default faults every page in again, pneumo train's does not."""
    faults = {}
    for mode in ("default", "keep"):
        result = subprocess.run([sys.executable, "-c", _ROUND_TRIP, mode], capture_output=True, text=True, check=True)
        faults[mode] = result.stdout.strip()
    if "unsupported" in faults.values():
        pytest.skip("not glibc: keep_freed_memory is a no-op here")
    pages = (64 << 20) // 4096
    assert int(faults["default"]) > pages // 2, faults
    assert int(faults["keep"]) < pages // 20, faults


def test_a_framed_run_ships_its_localizer_and_serves_the_crops_it_trained_on(tmp_path: Path) -> None:
    """``framing: lungbox-v1``: the bundle carries its localizer, and every surface's Predictor crops with it."""
    from pneumo.core.bundle import LOCALIZER_FILE
    from pneumo.core.framing import DEFAULT_LOCALIZER
    from pneumo.inference import Predictor
    from pneumo.inference.runners import file_sha256

    config = _tiny_config(tmp_path, "test_efficientnet", frozen_epochs=1, finetune_epochs=0, lr=1e-2,
                          framing="lungbox-v1", threshold_rule="robust", int8=True)  # fmt: skip
    bundle = fit(config)
    assert bundle is not None
    meta = read_meta(bundle)
    assert meta.preprocess.framed and meta.preprocess.framing.method == "lungbox-v1"
    entry = meta.files[LOCALIZER_FILE]
    assert entry.sha256 == file_sha256(bundle / LOCALIZER_FILE) == file_sha256(DEFAULT_LOCALIZER)
    framing = meta.metrics["robustness"]["framing"]
    assert set(framing["shifts"]) >= {"pad_12", "crop_top_bottom_12", "hflip"}
    assert "worst_normal_rate_change" in framing["summary"]
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["robustness"]["framing"] == framing and run["calibration"]["method"] in ("platt", "temperature")
    files = sorted((tmp_path / "data" / "train" / "NORMAL").iterdir())[:3]
    for result in Predictor(bundle, check_ood=False).predict_many(files):
        assert not isinstance(result, Exception) and result.crop is not None
        assert 0.0 <= result.crop["x0"] < result.crop["x1"] <= 1.0
    (bundle / LOCALIZER_FILE).unlink()  # a framed bundle without its localizer cannot be served as trained
    with pytest.raises(BundleError, match=r"lacks localizer\.onnx"):
        Predictor(bundle)
