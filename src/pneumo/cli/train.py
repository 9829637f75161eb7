"""``pneumo train``: one option per :class:`~pneumo.modeling.config.TrainConfig` field, generated.

The options are made from the dataclass itself (nested dataclasses flatten with their field name
as a prefix: ``augment.rotation_deg`` is ``--augment-rotation-deg``), so a field added to the
config has its flag at once. typer reads a function's signature; the function here takes
``**options`` and carries a generated ``__signature__`` (typer has no dataclass support of its
own, and jsonargparse would be a second CLI framework for one command).

Every option defaults to "not given", so the precedence is: option > ``--config`` YAML > default.
Booleans take a value (``--feature-cache false``) because YAML-minded users write it that way;
fields of other types (tuples, lists) take a YAML value (``--x "[0.1, 0.2]"``).
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml

#: Help text of the fields whose name does not say it all (others get their name and default).
HELP = {
    "data": "Dataset root (Kaggle layout, or NORMAL/ + PNEUMONIA/).",
    "out": "Run folder; the bundle goes to OUT/bundle.",
    "arch": "efficientnet_lite0|1|2, vgg19, xception or any timm name.",
    "pretrained": "Start from ImageNet weights.",
    "weights": "Local file of ImageNet weights for the backbone.",
    "label_mode": "binary or 3class.",
    "frozen_epochs": "Phase 1: epochs on a frozen backbone.",
    "finetune_epochs": "Phase 2: epochs with the last stages unfrozen.",
    "unfreeze_stages": "Phase 2: backbone stages unfrozen.",
    "optimizer": "adam, adamax or adamw.",
    "lr": "Learning rate of the head.",
    "finetune_lr": "Learning rate of unfrozen stages.",
    "weight_decay": "Weight decay of the optimizer.",
    "scheduler": "cosine, plateau or none.",
    "patience": "Early-stopping patience (epochs of phase 2).",
    "batch_size": "Images per training step.",
    "label_smoothing": "Label smoothing of the cross-entropy loss (0 = off).",
    "balance": "weighted_loss, sampler or none.",
    "augment.rotation_deg": "Augmentation: largest rotation, in degrees.",
    "augment.zoom": "Augmentation: zoom range (scale in [1 - zoom, 1 + zoom]).",
    "augment.shift": "Augmentation: largest translation, as a fraction of the side.",
    "augment.hflip": "Augmentation: probability of a horizontal flip (a mirrored chest never occurs in practice).",
    "augment.brightness": "Augmentation: brightness jitter factor.",
    "augment.contrast": "Augmentation: contrast jitter factor.",
    "augment.crop_scale": "Augmentation: random crops of at least this share of the area, squashed back (0 = off).",
    "augment.aspect": "Augmentation: largest aspect ratio of those crops (or its inverse).",
    "augment.pad": "Augmentation: black margins up to this fraction of each side, half of the time (0 = off).",
    "augment.gamma": "Augmentation: gamma exponent in [1 - gamma, 1 + gamma] (0 = off).",
    "augment.blur": "Augmentation: largest Gaussian blur sigma, in pixels (0 = off).",
    "augment.noise": "Augmentation: largest Gaussian noise standard deviation, unit intensities (0 = off).",
    "augment.text": "Augmentation: probability of burned-in text (0 = off).",
    "augment.enabled": "Training augmentation.",
    "val_fraction": "Share of patients carved out for validation.",
    "seed": "Seed of the patient split (and of initialization etc. unless --train-seed is given).",
    "train_seed": "Seed of initialization, shuffling and augmentation alone; the split stays --seed's.",
    "threshold_rule": "youden, sensitivity or f1 (on validation), or robust (MODEL_CARD.md: on the shifts too).",
    "target_sensitivity": "Sensitivity the 'sensitivity' threshold rule must reach on validation.",
    "calibration": "platt (on the pooled robustness validation) or temperature (the temperature alone).",
    "framing": "lungbox-v1: crop films to their lung fields plus a margin (training and inference); none: full frame.",
    "mixup": "Mixup: Beta parameter of the mixing weight, on the network's input (0 = off).",
    "robustness": "Score the finished bundle on the robustness validation (its validation films, shifted).",
    "int8": "Add a checked INT8 ONNX graph to the bundle (served by default where it passes).",
    "feature_cache": "Cache the frozen stages' outputs (fast on a CPU).",
    "cache_views": "Augmented views cached per image.",
    "cache_dir": "Reuse cached features across runs here.",
    "num_workers": "DataLoader worker processes (0: read images in the main process).",
    "accelerator": "Lightning accelerator: auto, cpu, gpu.",
    "devices": "Lightning devices, e.g. auto, 1, 2, 0,1.",
    "strategy": "Lightning strategy, e.g. ddp.",
    "num_nodes": "Lightning: machines taking part (multi-node DDP).",
    "precision": "Lightning precision, e.g. 32-true, bf16-mixed.",
    "name": "Name recorded in the bundle.",
}
#: Extra spellings kept for existing scripts.
ALIASES = {"augment.enabled": ("--augment",)}


@dataclasses.dataclass(frozen=True)
class ConfigOption:
    """One flag: the dotted field path, the Python parameter name, the flag and how to read its value."""

    path: str
    param: str
    flag: str
    kind: type  # str, int, float: typer converts; bool and others: parsed here from a string
    default: Any


def config_options(cls: type, prefix: str = "", defaults: Any = None) -> Iterator[ConfigOption]:
    """Every leaf field of the dataclass ``cls`` (nested dataclasses flattened) as a :class:`ConfigOption`."""
    defaults = cls() if defaults is None else defaults
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        path = f"{prefix}{field.name}"
        hint = hints[field.name]
        value = getattr(defaults, field.name)
        if dataclasses.is_dataclass(hint):
            yield from config_options(hint, f"{path}.", value)  # type: ignore[arg-type]
            continue
        param = path.replace(".", "_")
        kind = _scalar(hint)
        yield ConfigOption(path, param, "--" + param.replace("_", "-"), kind, value)


def _scalar(hint: Any) -> type:
    """``int``/``float``/``str`` (also when Optional or a Path) for typer to convert, else ``object`` (YAML)."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1:
        hint = args[0]
    if hint is bool:
        return bool
    return hint if hint in (int, float, str) else object


def parse_bool(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("true", "yes", "1", "on"):
        return True
    if lowered in ("false", "no", "0", "off"):
        return False
    raise typer.BadParameter(f"expected true or false, got {value!r}")


def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return "none" if value in (None, "") else str(value)


def _parameter(option: ConfigOption) -> inspect.Parameter:
    cli_type: Any = option.kind if option.kind in (int, float, str) else str
    # Every field has its sentence (tests/cli/test_cli.py checks); the fallback keeps --help working meanwhile.
    text = HELP.get(option.path, option.path.replace("_", " ").replace(".", ": ").capitalize() + ".")
    flags = (option.flag, *ALIASES.get(option.path, ()))
    metavar = "true|false" if option.kind is bool else "YAML" if option.kind is object else None
    info = typer.Option(*flags, help=f"{text} (default: {_shown(option.default)})", metavar=metavar)
    annotation = Annotated[cli_type | None, info]
    return inspect.Parameter(option.param, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=annotation)


def _value(option: ConfigOption, raw: Any) -> Any:
    if option.kind is bool:
        return parse_bool(raw)
    if option.kind is object:
        return yaml.safe_load(raw)
    return raw


def load_config(path: Path | None) -> Any:
    """``TrainConfig`` from a YAML file (defaults without one), or a one-line :class:`PneumoError` on what is wrong."""
    from pneumo.core.errors import PneumoError
    from pneumo.modeling.config import TrainConfig

    if path is None:
        return TrainConfig()
    if not path.is_file():
        raise PneumoError(f"config file {path} does not exist (see configs/ for examples).", code="bad_config")
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError) as err:
        raise PneumoError(f"config file {path} cannot be read: {err}", code="bad_config") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or "invalid syntax"
        raise PneumoError(f"config file {path} is not valid YAML{where}: {problem}.", code="bad_config") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise PneumoError(
            f"config file {path} holds a {type(data).__name__}; expected a mapping of TrainConfig settings "
            "(e.g. `arch: efficientnet_lite0`).",
            code="bad_config",
        )
    if not isinstance(data.get("augment", {}), dict):
        raise PneumoError(f"config file {path}: augment must be a mapping of augmentation settings.", code="bad_config")
    try:
        return TrainConfig.from_dict(data)
    except TypeError as err:
        raise PneumoError(f"config file {path} does not fit TrainConfig: {err}.", code="bad_config") from None


def register(app: typer.Typer, fail: Any, require_train_extra: Any = None) -> None:
    """Add ``train`` to ``app``; ``fail(message)`` ends the command with a one-line error.

    ``require_train_extra(command)`` (when given) stops the command with one line when the
    training stack is not installed (a base, serving-only install).
    """
    from pneumo.cli.common import check_data_root, quiet_training_stack
    from pneumo.modeling.config import TrainConfig

    options = list(config_options(TrainConfig))

    def train(**given: Any) -> None:
        """Train with transfer learning (frozen head phase, then fine-tuning) and write a model bundle."""
        from pneumo.core.errors import PneumoError

        if require_train_extra is not None:
            require_train_extra("train")
        config_file, epochs = given.pop("config", None), given.pop("epochs", None)
        try:
            cfg = load_config(config_file)
            for option in options:
                raw = given.get(option.param)
                if raw is None:
                    continue
                *parents, leaf = option.path.split(".")
                target = cfg
                for parent in parents:
                    target = getattr(target, parent)
                setattr(target, leaf, _value(option, raw))
            if epochs is not None:
                cfg.frozen_epochs = min(cfg.frozen_epochs, epochs)
                cfg.finetune_epochs = epochs - cfg.frozen_epochs
        except PneumoError as err:
            fail(err.message)
        check_data_root(cfg.data)  # before torch and Lightning load (seconds) and print their banners
        from pneumo.modeling import training

        quiet_training_stack()  # importing Lightning set its logger back to INFO
        try:
            training.keep_freed_memory()  # 1.1-2.2x faster CPU steps (its docstring; benchmarks/train_allocator.py)
            bundle_dir = training.fit(cfg)
        except PneumoError as err:
            fail(err.message)
        if bundle_dir is not None:
            typer.echo(f"bundle written to {bundle_dir}")

    extra = [
        inspect.Parameter(
            "config",
            inspect.Parameter.KEYWORD_ONLY,
            default=None,
            annotation=Annotated[
                Path | None, typer.Option(help="YAML file of TrainConfig settings; options override.")
            ],
        ),
        inspect.Parameter(
            "epochs",
            inspect.Parameter.KEYWORD_ONLY,
            default=None,
            annotation=Annotated[int | None, typer.Option(help="Total epochs (frozen + fine-tuning).")],
        ),
    ]
    train.__signature__ = inspect.Signature([*extra, *map(_parameter, options)])  # type: ignore[attr-defined]
    app.command("train")(train)
