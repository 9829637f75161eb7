"""Typed training configuration, loadable from YAML; the ``pneumo train`` options are generated from it.

No torch here, so the command line can build its options (and ``pneumo --help`` can run) without
loading the training stack.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from pneumo.core.errors import PneumoError


@dataclass
class AugmentConfig:
    """Training-time augmentation, after the seed's Keras ImageDataGenerator settings, plus framing.

    ``zoom`` and ``shift`` are fractions (scale in ``[1 - zoom, 1 + zoom]``, translation up to
    ``shift`` of the side); ``hflip`` is a probability; ``brightness``/``contrast`` are the
    ColorJitter factors. ``enabled=False`` turns all of it off.

    The framing fields break the shortcut "a tightly framed film is pneumonia" (see
    :mod:`pneumo.evaluation.robustness`): ``crop_scale`` > 0 takes a random crop of at least that share of
    the area, with an aspect ratio up to ``aspect`` (or its inverse), and squashes it back to the
    input size, as the dataset squashed its films; ``pad`` > 0 adds black margins of up to that
    fraction of each side, half of the time. The photometric fields imitate other machines:
    ``gamma`` (exponent in ``[1 - gamma, 1 + gamma]``), ``blur`` (max Gaussian sigma, pixels),
    ``noise`` (max Gaussian std, unit intensities) and ``text`` (probability of burned-in text).
    All default to off, so older configurations mean what they meant.
    """

    rotation_deg: float = 10.0
    zoom: float = 0.1
    shift: float = 0.08
    hflip: float = 0.5
    brightness: float = 0.15
    contrast: float = 0.15
    crop_scale: float = 0.0
    aspect: float = 1.0
    pad: float = 0.0
    gamma: float = 0.0
    blur: float = 0.0
    noise: float = 0.0
    text: float = 0.0
    enabled: bool = True

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AugmentConfig:
        return cls(**data)


@dataclass
class TrainConfig:
    """Everything a training run depends on; saved in the bundle and loadable from YAML."""

    data: str = ""
    out: str = "runs/run"
    arch: str = "efficientnet_lite0"
    pretrained: bool = True
    weights: str | None = None
    label_mode: str = "binary"
    frozen_epochs: int = 2
    finetune_epochs: int = 4
    unfreeze_stages: int = 2
    batch_size: int = 32
    optimizer: str = "adam"
    # Pooled EfficientNet-Lite0 features have sum |x| ~ 270, so one Adam step of lr moves a logit by
    # up to ~270 * lr: 3e-4 converges within the frozen phase without oscillating.
    lr: float = 3e-4
    finetune_lr: float = 1e-4
    weight_decay: float = 1e-5
    scheduler: str = "cosine"
    patience: int = 2
    label_smoothing: float = 0.1
    balance: str = "weighted_loss"
    # Plausible for AP chest films: small rotations, zoom and shifts, exposure changes; no flips
    # (a mirrored chest puts the heart on the wrong side, which the test population never shows).
    augment: AugmentConfig = field(
        default_factory=lambda: AugmentConfig(rotation_deg=10, zoom=0.15, shift=0.1, hflip=0.0, brightness=0.2,
                                              contrast=0.2)
    )  # fmt: skip
    # Canonical framing (pneumo.core.framing): "lungbox-v1" crops every film to its lung fields plus a
    # margin before resizing, in training and at inference; "none" keeps the full frame. With framing,
    # the augmentation's crop_scale/aspect/pad reframe the raw film *before* the lungs are located.
    framing: str = "none"
    val_fraction: float = 0.15
    # Seed of the patient split (and of the balanced sampler); bundles record it so that calibration,
    # INT8 checks and evaluation find the same validation children again.
    seed: int = 0
    # Seed of initialization, shuffling and augmentation (None: ``seed``). Set it alone to measure
    # how much a recipe's results move from run to run on the *same* validation split.
    train_seed: int | None = None
    threshold_rule: str = "youden"
    # How probabilities are calibrated at the end of a run (pneumo.modeling.finalize.fit_calibration):
    # "platt" (a slope and an intercept on the log-odds, fitted on the pooled robustness validation)
    # or "temperature" (the temperature alone, as bundles before round 6).
    calibration: str = "platt"
    target_sensitivity: float = 0.95
    # Mixup (Zhang et al., 2018) on the network's input, which is the cached activations on a CPU:
    # the mixing coefficient is drawn from Beta(mixup, mixup); 0 turns it off.
    mixup: float = 0.0
    # Score the finished bundle on the robustness validation (pneumo.evaluation.robustness), into run.json.
    robustness: bool = True
    # Add a checked INT8 ONNX graph to the bundle (pneumo.modeling.quantize), calibrated on training images.
    int8: bool = True
    feature_cache: bool = True
    cache_views: int = 1
    cache_dir: str | None = None
    num_workers: int = 0
    accelerator: str = "auto"
    devices: str = "auto"
    strategy: str = "auto"
    num_nodes: int = 1
    precision: str = "32-true"
    name: str = ""

    @property
    def epochs(self) -> int:
        return self.frozen_epochs + self.finetune_epochs

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise PneumoError(
                f"Unknown training settings {sorted(unknown)}; known: {sorted(known)}.", code="bad_config"
            )
        data = dict(data)
        if isinstance(data.get("augment"), dict):
            data["augment"] = AugmentConfig.from_dict(data["augment"])
        return cls(**data)

    @classmethod
    def from_yaml(cls, path: str | Path) -> TrainConfig:
        return cls.from_dict(yaml.safe_load(Path(path).read_text()) or {})
