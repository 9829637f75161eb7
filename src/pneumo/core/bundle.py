"""The model bundle: the one contract between training and every surface that uses a model.

A bundle is a folder: ``weights.safetensors`` + ``bundle.json``, plus the files the metadata lists
(the INT8 ONNX graph, the OOD gate's statistics). ``bundle.json`` carries everything needed to use
the weights without the training code: the architecture, the preprocessing (input size, mean/std),
the labels, the decision threshold and how it was chosen, the calibration temperature, the
out-of-distribution gate, what it was trained on and how well it did on validation data. Like
torchxrayvision's weights, it describes itself, so the CLI, the app, the API and the DICOM node
cannot disagree with training about how to use it.

This module owns the whole contract, so nothing else spells it:

* the folder layout and file names (:data:`META_FILE`, :data:`WEIGHTS_FILE`, ...), and the ONNX
  graphs' input/output names (:data:`INPUT_NAME`, :data:`OUTPUT_NAMES`, ...);
* the schema of ``bundle.json`` (:class:`BundleMeta` and its typed sections), checked when read,
  with every number finite and ranged and every size capped, so a tampered file fails here with a
  :class:`BundleError` naming the field, not later as a traceback or a ``null`` probability;
* the decision (:func:`decide`), and the closed sets :class:`Backend` and :class:`ThresholdRule`;
* how bundle files are opened (:func:`bundle_file`: regular files of bounded size only).

No torch here: loading the weights into a network lives in :mod:`pneumo.modeling.weights`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import stat
from enum import StrEnum
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from pneumo.core.errors import BundleError
from pneumo.core.preprocess import PreprocessConfig
from pneumo.core.redact import strip_paths

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------ the layout

FORMAT_VERSION = 1
META_FILE = "bundle.json"
WEIGHTS_FILE = "weights.safetensors"
#: The fp32 ONNX graph a bundle may hold (``pneumo export onnx``); the default bundle does not ship it.
ONNX_FILE = "model.onnx"
#: The statically quantized (INT8, QDQ) graph a bundle may ship (see :mod:`pneumo.modeling.quantize`).
INT8_FILE = "model_int8.onnx"
#: The out-of-distribution gate's statistics (see :mod:`pneumo.inference.ood`).
OOD_FILE = "ood.safetensors"

#: The exported graphs' contract: one input (N, 3, S, S) and two outputs, logits (N, C) and pooled
#: features (N, F); :meth:`pneumo.inference.Predictor.forward` returns exactly these.
INPUT_NAME = "input"
OUTPUT_NAMES = ("logits", "features")
#: Optional third output: the last feature map (N, C, h, w), from which CAM heatmaps are computed.
FEATURE_MAP_OUTPUT = "feature_map"
#: ONNX metadata key holding the SHA-256 of the weights a graph was exported from (stale graphs are refused).
WEIGHTS_SHA_KEY = "pneumo_weights_sha256"
#: ONNX metadata key holding the input side a graph was exported for (its spatial size is fixed).
INPUT_SIZE_KEY = "pneumo_input_size"
#: ONNX metadata key naming the state-dict prefix of the linear head (set when CAM equals Grad-CAM).
CAM_HEAD_KEY = "pneumo_cam_head"

#: Largest file of each kind a bundle may hold; anything bigger is refused unread (a tampered or wrong file).
MAX_FILE_BYTES = {META_FILE: 8 * 2**20, OOD_FILE: 64 * 2**20}
MAX_MODEL_BYTES = 2 * 2**30  # weights and graphs: VGG19 is the largest registered model (~0.6 GB)

# ------------------------------------------------------------------------------------ closed sets

#: The two answers a bundle gives, whatever its labels (3-class bundles sum bacteria and virus).
POSITIVE = "PNEUMONIA"
NEGATIVE = "NORMAL"


class Backend(StrEnum):
    """What runs the model; ``auto`` picks the fastest checked one (see ``inference.runners.select_runner``)."""

    AUTO = "auto"
    INT8 = "int8"  # the bundle's quantized ONNX graph, ONNX Runtime
    FP32 = "fp32"  # the fp32 ONNX graph (the bundle's model.onnx or an explicit export), ONNX Runtime
    TORCH = "torch"  # eager PyTorch (the training stack registers it: pneumo.modeling.torch_predictor)


class ThresholdRule(StrEnum):
    """How a bundle's decision threshold is chosen on validation data (:mod:`pneumo.evaluation.metrics`)."""

    YOUDEN = "youden"  # maximize sensitivity + specificity - 1
    SENSITIVITY = "sensitivity"  # the highest threshold keeping sensitivity >= a target
    F1 = "f1"  # maximize F1
    ROBUST = "robust"  # the best of several rules on the robustness validation (pneumo.evaluation.robustness)


def is_positive(probability: Any, threshold: float) -> Any:
    """Whether calibrated P(pneumonia) values reach ``threshold``: a bool, or a bool array for an array.

    The one place the decision rule is written; :func:`decide`, the INT8 check and the evaluation use it.
    """
    return probability >= threshold


def decide(probability: float, threshold: float) -> str:
    """The label of a calibrated P(pneumonia): :data:`POSITIVE` when it reaches ``threshold``, else :data:`NEGATIVE`."""
    return POSITIVE if is_positive(probability, threshold) else NEGATIVE


# ------------------------------------------------------------------------------------ the schema


def _finite(value: float) -> float:
    if not math.isfinite(value):
        raise ValueError("must be a finite number")
    return value


Finite = Annotated[float, AfterValidator(_finite)]
Name = Annotated[str, Field(min_length=1, max_length=200)]


class _Section(BaseModel):
    """A section of ``bundle.json``: typed known fields; unknown ones kept (a later pneumo may add some)."""

    model_config = ConfigDict(extra="allow")


class OodEntry(_Section):
    """The ``ood`` section: how the not-a-chest-X-ray gate scores and where its statistics are."""

    method: Literal["ppca-mahalanobis"] = "ppca-mahalanobis"
    file: Literal["ood.safetensors"] = "ood.safetensors"  # OOD_FILE; a bundle's gate is always this file
    score: str = ""
    threshold: Finite = Field(ge=0.0)
    noise_variance: Finite = Field(gt=0.0)
    components: int = Field(ge=1, le=4096)
    feature_dim: int = Field(ge=1, le=65536)
    min_pixel_std: Finite = Field(default=8.0, ge=0.0, le=255.0)
    quantile: Finite = Field(default=0.995, ge=0.5, lt=1.0)
    threshold_sample: str = "validation X-rays"
    n_train: int | None = None
    n_val: int | None = None
    train_score_median: float | None = None
    val_score_median: float | None = None
    val_refusal_rate: float | None = None

    @model_validator(mode="after")
    def _fewer_components_than_features(self) -> OodEntry:
        if self.components > self.feature_dim:
            raise ValueError(f"ood.components ({self.components}) exceeds ood.feature_dim ({self.feature_dim})")
        return self


class FileEntry(_Section):
    """An extra file of the bundle (``files`` section): what it is and its checksums."""

    kind: str = Field(min_length=1, max_length=100)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    weights_sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    bytes: int | None = Field(default=None, ge=0)


class Int8Entry(FileEntry):
    """The INT8 graph's entry: its checksums, which convolutions stayed fp32 and its agreement check against fp32."""

    passed_check: bool = False
    fp32_early_convs: int | None = None
    fp32_kept: str | None = None
    convs_at_runtime: dict[str, int] = Field(default_factory=dict)
    validation: dict[str, Any] = Field(default_factory=dict)
    heldout: dict[str, Any] = Field(default_factory=dict)
    tries: list[dict[str, Any]] = Field(default_factory=list)


def _file_kind(value: Any) -> str:
    kind = value.get("kind", "") if isinstance(value, dict) else getattr(value, "kind", "")
    return "int8" if str(kind).startswith("onnx-int8") else "file"


AnyFileEntry = Annotated[
    Annotated[Int8Entry, Tag("int8")] | Annotated[FileEntry, Tag("file")], Discriminator(_file_kind)
]


class TrainingRecord(_Section):
    """The ``training`` section: the recipe and what it ran on (free-form figures beyond these are kept)."""

    config: dict[str, Any] = Field(default_factory=dict)
    split: str = ""
    train_data: dict[str, Any] = Field(default_factory=dict)
    val_data: dict[str, Any] = Field(default_factory=dict)
    epochs_run: int | None = None
    best_epoch: int | None = None
    epoch_seconds: list[float] = Field(default_factory=list)
    fit_seconds: float | None = None
    hardware: dict[str, Any] = Field(default_factory=dict)


class BundleMeta(BaseModel):
    """What ``bundle.json`` holds, and its schema: required keys, types, ranges, a known ``format_version``.

    One declaration serves both as the metadata object the code passes around and as the check a
    file must pass when read (:meth:`from_dict`). Keys it does not know are allowed and kept (a
    later pneumo may add some; :attr:`extra`). Construction in code is validated too.
    """

    model_config = ConfigDict(extra="allow", validate_assignment=True)

    format_version: Literal[1] = 1  # FORMAT_VERSION; a later format needs a later pneumo
    arch: Name
    #: The timm model the weights belong to: what the training stack builds to load them.
    timm_name: Name
    labels: list[Annotated[str, Field(min_length=1, max_length=64)]] = Field(min_length=2, max_length=16)
    preprocess: PreprocessConfig
    positive_labels: list[str] = Field(default_factory=lambda: [POSITIVE], min_length=1, max_length=16)
    # Up to just above 1: a rule whose best choice is "call nobody positive" returns the float just
    # above the largest probability (pneumo.evaluation.metrics.select_threshold), which may be 1.0.
    threshold: Finite = Field(default=0.5, ge=0.0, le=1.0 + 1e-6)
    threshold_rule: str = Field(default="default 0.5 (not chosen on data)", max_length=2000)
    # A temperature outside [1e-3, 1e3] turns every probability into 0, 0.5 or 1 (or NaN): refused.
    temperature: Finite = Field(default=1.0, ge=1e-3, le=1e3)
    name: Name = "pneumo"
    version: str = Field(default="0.0.0", max_length=100)
    ood: OodEntry | None = None
    training: TrainingRecord = Field(default_factory=TrainingRecord)
    metrics: dict[str, Any] = Field(default_factory=dict)
    versions: dict[str, str] = Field(default_factory=dict)
    created: str = Field(default="", max_length=100)
    #: Extra files of the bundle by name (the INT8 graph: :class:`Int8Entry`).
    files: dict[str, AnyFileEntry] = Field(default_factory=dict)

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

    @property
    def int8(self) -> Int8Entry | None:
        """The INT8 graph's entry, when the bundle lists one."""
        entry = self.files.get(INT8_FILE)
        return entry if isinstance(entry, Int8Entry) else None

    def decide(self, probability: float) -> str:
        """:func:`decide` at this bundle's threshold."""
        return decide(probability, self.threshold)

    def to_dict(self) -> dict[str, Any]:
        """The content of ``bundle.json`` (unknown keys read from a file included)."""
        return self.model_dump(mode="json")

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
        except (RecursionError, ValueError, TypeError) as err:  # absurd values a validator cannot even look at
            raise BundleError(f"bundle.json holds values pneumo cannot read ({type(err).__name__}).") from err


def _describe(err: ValidationError) -> str:
    """The first problem of a failed validation as one sentence naming the field."""
    first = err.errors()[0]
    field = ".".join(str(part) for part in first["loc"])
    if not field:  # a check across fields (positive_labels against labels)
        return f"bundle.json is inconsistent: {first['msg'].removeprefix('Value error, ')}."
    received = first.get("input")
    try:
        shown = repr(received)
    except ValueError:  # an integer too long to print
        shown = f"a {type(received).__name__} too large to show"
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    more = f" ({err.error_count() - 1} more problems)" if err.error_count() > 1 else ""
    if first["type"] == "missing":
        return f"bundle.json lacks the required field '{field}'{more}."
    if field == "format_version":
        return (
            f"bundle.json has format_version {shown}, which this pneumo cannot read (it reads {FORMAT_VERSION}); "
            f"upgrade pneumo.{more}"
        )
    return f"bundle.json field '{field}' is invalid: {first['msg']} (got {shown}){more}."


# ------------------------------------------------------------------------------------ files


def bundle_file(bundle: str | Path, name: str, *, required: bool = True) -> Path | None:
    """The path of the bundle's file ``name``, checked to be a regular file of bounded size, never opened here.

    A FIFO or a device in place of ``weights.safetensors`` would block the reader forever, and a
    multi-gigabyte ``bundle.json`` would fill the memory: both are refused before any read.

    Returns:
        The path; ``None`` when the file is absent and not ``required``.

    Raises:
        BundleError: absent (when required), not a regular file, or over its size cap.
    """
    path = Path(bundle) / name
    try:
        info = os.stat(path)  # follows symbolic links: a link to a regular file is fine
    except FileNotFoundError:
        if not required:
            return None
        raise BundleError(f"The bundle {Path(bundle)} lacks {name}; copy the whole bundle folder.") from None
    except OSError as err:
        raise BundleError(f"The bundle file {path} cannot be examined: {err.strerror or err}.") from err
    if not stat.S_ISREG(info.st_mode):
        raise BundleError(f"The bundle file {path} is not a regular file (a pipe, device or folder); refused unread.")
    cap = MAX_FILE_BYTES.get(name, MAX_MODEL_BYTES)
    if info.st_size > cap:
        raise BundleError(
            f"The bundle file {path} is {info.st_size / 2**20:.0f} MB, over the {cap / 2**20:.0f} MB a {name} may be."
        )
    return path


def write_meta(bundle: str | Path, meta: BundleMeta) -> None:
    """Write ``bundle.json``, leaving the weights alone.

    Server paths (the training config's data, run and cache folders) are reduced to their
    names (:func:`pneumo.core.redact.strip_paths`): a bundle travels, the layout of its maker's disks need not.
    """
    (Path(bundle) / META_FILE).write_text(json.dumps(strip_paths(meta.to_dict()), indent=2) + "\n")


def read_meta(bundle: str | Path) -> BundleMeta:
    """Read and validate ``bundle.json`` only (cheap: no weights).

    Raises:
        BundleError: the file is missing, not a regular file, too large, not JSON, or fails the schema.
    """
    if not (Path(bundle) / META_FILE).exists():
        raise BundleError(
            f"{Path(bundle)} is not a model bundle: {META_FILE} is missing. "
            "Pass the folder written by `pneumo train` (it holds bundle.json and weights.safetensors)."
        )
    path = bundle_file(bundle, META_FILE)
    assert path is not None  # required=True
    try:
        data = json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BundleError(f"{path} is not valid JSON: {err}") from err
    except (RecursionError, ValueError) as err:  # nesting too deep, an integer of 100,000 digits
        raise BundleError(
            f"{path} holds JSON pneumo will not read ({err.__class__.__name__}: nesting or a number too large)."
        ) from err
    except OSError as err:
        raise BundleError(f"{path} cannot be read: {err.strerror or err}.") from err
    return BundleMeta.from_dict(data)


def default_bundle_path() -> Path:
    """The bundle that ships inside the package (``pneumo/assets/default_bundle``)."""
    return Path(str(resources.files("pneumo") / "assets" / "default_bundle"))


def resolve_bundle(bundle: str | Path | None) -> Path:
    """``bundle`` as a Path, or the shipped default bundle when it is None."""
    folder = Path(bundle) if bundle is not None else default_bundle_path()
    if not (folder / META_FILE).is_file():
        hint = "" if bundle is not None else " The package was installed without its default model; reinstall it."
        raise BundleError(f"No model bundle at {folder} ({META_FILE} missing).{hint}")
    return folder
