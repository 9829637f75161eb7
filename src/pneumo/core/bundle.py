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
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pneumo.core.errors import BundleError
from pneumo.core.preprocess import PreprocessConfig
from pneumo.core.redact import strip_paths

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
WEIGHTS_FILE = "weights.safetensors"
META_FILE = "bundle.json"


class BundleMeta(BaseModel):
    """What ``bundle.json`` holds, and its schema: required keys, types, ranges, a known ``format_version``.

    One declaration serves both as the metadata object the code passes around and as the check a
    file must pass when read (:meth:`from_dict`). Keys it does not know are allowed and kept (a
    later pneumo may add some; :attr:`extra`); the free-form sections (``training``, ``metrics``,
    ``ood``) may hold anything, and ``files`` maps a file name inside the bundle to what it is
    (kind, ``sha256``, check figures). Construction in code is validated too.
    """

    model_config = ConfigDict(extra="allow")

    format_version: Literal[1] = 1  # FORMAT_VERSION; a later format needs a later pneumo
    arch: str = Field(min_length=1)
    timm_name: str = Field(min_length=1)
    labels: list[str] = Field(min_length=2)
    preprocess: PreprocessConfig
    positive_labels: list[str] = Field(default_factory=lambda: ["PNEUMONIA"], min_length=1)
    # Up to just above 1: a rule whose best choice is "call nobody positive" returns the float just
    # above the largest probability (pneumo.evaluation.metrics.select_threshold), which may be 1.0.
    threshold: float = Field(default=0.5, ge=0.0, le=1.0 + 1e-6)
    threshold_rule: str = "default 0.5 (not chosen on data)"
    temperature: float = Field(default=1.0, gt=0.0)
    name: str = "pneumo"
    version: str = "0.0.0"
    ood: dict[str, Any] | None = None
    training: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)
    versions: dict[str, str] = Field(default_factory=dict)
    created: str = ""
    #: Extra files of the bundle by name, each with its ``sha256`` and what it is, e.g.
    #: ``{"model_int8.onnx": {"kind": "onnx-int8", "sha256": ..., "weights_sha256": ..., "validation": {...}}}``.
    files: dict[str, dict[str, Any]] = Field(default_factory=dict)

    @field_validator("files", mode="before")
    @classmethod
    def _no_files_is_empty(cls, value: Any) -> Any:
        return {} if value is None else value  # bundles written before INT8 graphs say null

    @model_validator(mode="after")
    def _positive_labels_are_labels(self) -> BundleMeta:
        unknown = [label for label in self.positive_labels if label not in self.labels]
        if unknown:
            raise ValueError(f"positive_labels {unknown} are not among labels {self.labels}")
        return self

    @property
    def extra(self) -> dict[str, Any]:
        """The keys of ``bundle.json`` this pneumo does not know, kept as they were."""
        return dict(self.model_extra or {})

    @property
    def positive_indices(self) -> list[int]:
        """Indices of the labels that mean pneumonia (one in binary mode, bacteria+virus in 3-class)."""
        return [self.labels.index(label) for label in self.positive_labels]

    def to_dict(self) -> dict[str, Any]:
        """The content of ``bundle.json`` (unknown keys read from a file included)."""
        return self.model_dump()

    @classmethod
    def from_dict(cls, data: Any) -> BundleMeta:
        """Validate ``bundle.json``'s content and build the metadata.

        Raises:
            BundleError: naming the field at fault, what it holds and what was expected.
        """
        if not isinstance(data, dict):
            raise BundleError(f"bundle.json must hold a JSON object, not {type(data).__name__}.")
        try:
            return cls.model_validate(data)
        except ValidationError as err:
            raise BundleError(_describe(err)) from err


def _describe(err: ValidationError) -> str:
    """The first problem of a failed validation as one sentence naming the field."""
    first = err.errors()[0]
    field = ".".join(str(part) for part in first["loc"])
    if not field:  # a check across fields (positive_labels against labels)
        return f"bundle.json is inconsistent: {first['msg'].removeprefix('Value error, ')}."
    received = first.get("input")
    shown = repr(received) if len(repr(received)) <= 80 else repr(received)[:77] + "..."
    more = f" ({err.error_count() - 1} more problems)" if err.error_count() > 1 else ""
    if first["type"] == "missing":
        return f"bundle.json lacks the required field '{field}'{more}."
    if field == "format_version":
        return (
            f"bundle.json has format_version {shown}, which this pneumo cannot read (it reads {FORMAT_VERSION}); "
            f"upgrade pneumo.{more}"
        )
    return f"bundle.json field '{field}' is invalid: {first['msg']} (got {shown}){more}."


def write_meta(bundle_dir: str | Path, meta: BundleMeta) -> None:
    """Rewrite ``bundle.json`` (e.g. after attaching OOD statistics), leaving the weights alone.

    Server paths (the training config's data, run and cache folders) are reduced to their
    names (:func:`pneumo.core.redact.strip_paths`): a bundle travels, the layout of its maker's disks need not.
    """
    (Path(bundle_dir) / META_FILE).write_text(json.dumps(strip_paths(meta.to_dict()), indent=2) + "\n")


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
