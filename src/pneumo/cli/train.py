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
    "pretrained": "true/false: start from ImageNet weights.",
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
    "balance": "weighted_loss, sampler or none.",
    "augment.enabled": "true/false: training augmentation.",
    "val_fraction": "Share of patients carved out for validation.",
    "seed": "Seed of the patient split (and of initialization etc. unless --train-seed is given).",
    "train_seed": "Seed of initialization, shuffling and augmentation alone; the split stays --seed's.",
    "threshold_rule": "youden, sensitivity or f1 (on validation), or robust (MODEL_CARD.md: on the shifts too).",
    "feature_cache": "true/false: cache the frozen stages' outputs (fast on a CPU).",
    "cache_views": "Augmented views cached per image.",
    "cache_dir": "Reuse cached features across runs here.",
    "accelerator": "Lightning accelerator: auto, cpu, gpu.",
    "devices": "Lightning devices, e.g. auto, 1, 2, 0,1.",
    "strategy": "Lightning strategy, e.g. ddp.",
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


def _parameter(option: ConfigOption) -> inspect.Parameter:
    cli_type: Any = option.kind if option.kind in (int, float, str) else str
    text = HELP.get(option.path, option.path.replace("_", " ").replace(".", ": ").capitalize() + ".")
    flags = (option.flag, *ALIASES.get(option.path, ()))
    annotation = Annotated[cli_type | None, typer.Option(*flags, help=f"{text} (default: {option.default})")]
    return inspect.Parameter(option.param, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=annotation)


def _value(option: ConfigOption, raw: Any) -> Any:
    if option.kind is bool:
        return parse_bool(raw)
    if option.kind is object:
        return yaml.safe_load(raw)
    return raw


def register(app: typer.Typer, fail: Any, require_train_extra: Any = None) -> None:
    """Add ``train`` to ``app``; ``fail(message)`` ends the command with a one-line error.

    ``require_train_extra(command)`` (when given) stops the command with one line when the
    training stack is not installed (a base, serving-only install).
    """
    from pneumo.modeling.config import TrainConfig

    options = list(config_options(TrainConfig))

    def train(**given: Any) -> None:
        """Train with transfer learning (frozen head phase, then fine-tuning) and write a model bundle."""
        from pneumo.core.errors import PneumoError

        if require_train_extra is not None:
            require_train_extra("train")
        from pneumo.modeling import training

        config_file, epochs = given.pop("config", None), given.pop("epochs", None)
        try:
            cfg = TrainConfig.from_yaml(config_file) if config_file else TrainConfig()
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
