"""The model bundle: ``weights.safetensors`` + ``bundle.json``, the unit everything exchanges.

A bundle carries everything needed to use the weights without the training code: the
architecture, the preprocessing (input size, mean/std), the labels, the decision threshold and
how it was chosen, the calibration temperature, the out-of-distribution statistics, what it was
trained on and how well it did on validation data. Like torchxrayvision's weights, it describes
itself, so the CLI, the app and the API cannot disagree with training about how to use it.

This module reads and writes the metadata only (no torch): writing and loading the weights into a
network lives in :mod:`pneumo.modeling.weights`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from pneumo.core.errors import BundleError
from pneumo.core.preprocess import PreprocessConfig

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
WEIGHTS_FILE = "weights.safetensors"
META_FILE = "bundle.json"


@dataclass
class BundleMeta:
    """What ``bundle.json`` holds. Unknown keys in the file are kept in ``extra``."""

    arch: str
    timm_name: str
    labels: list[str]
    preprocess: PreprocessConfig
    positive_labels: list[str] = field(default_factory=lambda: ["PNEUMONIA"])
    threshold: float = 0.5
    threshold_rule: str = "default 0.5 (not chosen on data)"
    temperature: float = 1.0
    name: str = "pneumo"
    version: str = "0.0.0"
    ood: dict[str, Any] | None = None
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    created: str = ""
    #: Extra files of the bundle by name, each with its ``sha256`` and what it is, e.g.
    #: ``{"model_int8.onnx": {"kind": "onnx-int8", "sha256": ..., "weights_sha256": ..., "validation": {...}}}``.
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def positive_indices(self) -> list[int]:
        """Indices of the labels that mean pneumonia (one in binary mode, bacteria+virus in 3-class)."""
        return [self.labels.index(label) for label in self.positive_labels]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["preprocess"] = self.preprocess.to_dict()
        data["format_version"] = FORMAT_VERSION
        extra = data.pop("extra")
        return {**extra, **data}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BundleMeta:
        if not isinstance(data, dict):
            raise BundleError(f"bundle.json must hold a JSON object, not {type(data).__name__}.")
        data = dict(data)
        data.pop("format_version", None)
        known = set(cls.__dataclass_fields__)
        extra = {k: data.pop(k) for k in list(data) if k not in known}
        try:
            data["preprocess"] = PreprocessConfig.from_dict(data["preprocess"])
            return cls(**data, extra=extra)
        except (KeyError, TypeError, ValueError) as err:
            raise BundleError(f"bundle.json is incomplete or malformed: {err}") from err


def write_meta(bundle_dir: str | Path, meta: BundleMeta) -> None:
    """Rewrite ``bundle.json`` (e.g. after attaching OOD statistics), leaving the weights alone."""
    (Path(bundle_dir) / META_FILE).write_text(json.dumps(meta.to_dict(), indent=2) + "\n")


def read_meta(bundle_dir: str | Path) -> BundleMeta:
    """Read ``bundle.json`` only (cheap: no weights)."""
    path = Path(bundle_dir) / META_FILE
    if not path.is_file():
        raise BundleError(
            f"{Path(bundle_dir)} is not a model bundle: {META_FILE} is missing. "
            "Pass the folder written by `pneumo train` (it holds bundle.json and weights.safetensors)."
        )
    try:
        return BundleMeta.from_dict(json.loads(path.read_text()))
    except json.JSONDecodeError as err:
        raise BundleError(f"{path} is not valid JSON: {err}") from err


def default_bundle_path() -> Path:
    """The bundle that ships inside the package (``pneumo/assets/default_bundle``)."""
    return Path(str(resources.files("pneumo") / "assets" / "default_bundle"))


def resolve_bundle(bundle_dir: str | Path | None) -> Path:
    """``bundle_dir`` as a Path, or the shipped default bundle when it is None."""
    folder = Path(bundle_dir) if bundle_dir is not None else default_bundle_path()
    if not (folder / META_FILE).is_file():
        hint = "" if bundle_dir is not None else " The package was installed without its default model; reinstall it."
        raise BundleError(f"No model bundle at {folder} ({META_FILE} missing).{hint}")
    return folder
