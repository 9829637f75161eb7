"""ONNX export of a model bundle: an explicit step (``pneumo export onnx``, the end of training), never implicit.

:mod:`pneumo.inference.runners` says where the graphs live and how a backend finds them.

The exporter is ``torch.onnx.export(..., dynamo=True)``: it specializes the TensorFlow-style
"same" padding of the ``tf_`` EfficientNets to the bundle's fixed input size, giving a graph of
plain Conv/Clip/Add nodes, where the legacy TorchScript exporter (deprecated since torch 2.9) keeps
a dynamic Pad and ~400 shape-computation nodes that run ~1.5x slower. The legacy exporter is kept
only as a fallback when the dynamo exporter fails on some exotic backbone.

Exporting the shipped default bundle without ``out`` writes to the user cache, never into the
installed package.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pneumo.core.bundle import (
    CAM_HEAD_KEY,
    FEATURE_MAP_OUTPUT,
    INPUT_NAME,
    INPUT_SIZE_KEY,
    ONNX_FILE,
    OUTPUT_NAMES,
    WEIGHTS_SHA_KEY,
    BundleMeta,
    default_bundle_path,
    read_meta,
    resolve_bundle,
)
from pneumo.core.probability import temperature_softmax
from pneumo.inference.runners import (
    BackendError,
    OnnxRunner,
    cache_dir,
    cached_onnx_path,
    prune_cache,
    weights_sha256,
)
from pneumo.modeling.models import logits_and_features
from pneumo.modeling.weights import load_model

log = logging.getLogger(__name__)

#: Opset 18 is the oldest the dynamo exporter targets natively and is supported by every
#: onnxruntime this project admits (>= 1.18); all backbones we ship need nothing newer.
DEFAULT_OPSET = 18
#: Largest |P_onnx - P_torch| accepted by the check run right after every export.
EXPORT_TOLERANCE = 1e-4


# ----------------------------------------------------------------------------------------- export


def export_onnx(
    bundle: str | Path | None = None,
    out: str | Path | None = None,
    opset: int = DEFAULT_OPSET,
    *,
    model: nn.Module | None = None,
    meta: BundleMeta | None = None,
) -> Path:
    """Export a bundle's model to ONNX (dynamic batch axis, outputs ``logits`` and ``features``).

    The graph is checked against PyTorch on a random batch before it is written, and it is
    written atomically (temporary file + rename), so concurrent processes never read half a file.

    Args:
        bundle: the bundle; ``None`` is the default bundle shipped with pneumo.
        out: destination file. Default: ``model.onnx`` inside the bundle, except for the shipped
            default bundle, whose export goes to the user cache (see the module docstring).
        opset: ONNX opset version.
        model: the bundle's network when the caller holds it already (the end of training), with ``meta``;
            its weights must be the bundle's ``weights.safetensors``, whose hash the graph records.
        meta: the bundle's metadata when the caller holds it (``bundle.json`` may not be written yet).

    Returns:
        The path of the written file.

    Raises:
        BackendError: the export failed, or the exported graph disagrees with PyTorch.
    """
    folder = Path(bundle) if meta is not None and bundle is not None else resolve_bundle(bundle)
    sha = weights_sha256(folder)
    meta = meta if meta is not None else read_meta(folder)
    size = meta.preprocess.input_size
    if out is not None:
        target = Path(out)
    elif folder.resolve() == default_bundle_path().resolve():
        target = cached_onnx_path(folder, size, sha)
        log.info("The shipped default bundle is exported to the user cache (%s), not into the package.", target)
    else:
        target = folder / ONNX_FILE
    model = model if model is not None else load_model(folder, meta)
    example = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    head = cam_head_name(model, example)
    wrapper = _ExportWrapper(model, with_feature_map=head is not None).eval()
    props = {WEIGHTS_SHA_KEY: sha, "pneumo_arch": meta.arch, INPUT_SIZE_KEY: str(size)}
    if head is not None:
        props[CAM_HEAD_KEY] = head
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(suffix=".onnx.tmp", dir=target.parent)
    os.close(handle)
    tmp = Path(tmp_name)
    try:
        with _quiet_exporter_logs():
            _torch_export(wrapper, example, tmp, opset)
        _stamp(tmp, props)
        _check_against_torch(tmp, wrapper, example, meta.temperature)
        tmp.chmod(0o644)  # mkstemp makes it private; a bundle or cache file is meant to be read by others
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    log.info("Exported %s (opset %d) to %s", meta.arch, opset, target)
    if target.parent == cache_dir():
        prune_cache()  # every retrained bundle adds a cached graph; keep the most recently used few
    return target


class _ExportWrapper(nn.Module):
    """What the ONNX graph computes: ``(logits, features)``, plus the last feature map when CAM applies."""

    def __init__(self, model: nn.Module, with_feature_map: bool) -> None:
        super().__init__()
        self.model = model
        self.with_feature_map = with_feature_map

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if not self.with_feature_map:
            return logits_and_features(self.model, x)
        net: Any = self.model
        feature_map = net.forward_features(x)
        features = net.forward_head(feature_map, pre_logits=True)
        return net.get_classifier()(features), features, feature_map


def cam_head_name(model: nn.Module, example: torch.Tensor) -> str | None:
    """The state-dict prefix of the linear head when CAM equals Grad-CAM for ``model``, else None.

    CAM (the last feature map weighted by the head's weights) is exactly Grad-CAM when the pooled
    features are the spatial mean of that map and the head is one linear layer (the gradient of a
    logit with respect to the map is then the head's weight over H x W, everywhere). Checked
    numerically on ``example`` rather than by class name, so any timm backbone that fits qualifies
    and ensembles or attention-pooled models fall back to the torch Grad-CAM.
    """
    net: Any = model
    head = net.get_classifier() if hasattr(net, "get_classifier") else None
    if not isinstance(head, nn.Linear) or not hasattr(net, "forward_features"):
        return None
    with torch.inference_mode():
        feature_map = net.forward_features(example)
        if feature_map.dim() != 4:
            return None
        pooled = net.forward_head(feature_map, pre_logits=True)
    if pooled.shape != feature_map.shape[:2] or not torch.allclose(pooled, feature_map.mean((2, 3)), atol=1e-5):
        return None
    return next((name for name, module in model.named_modules() if module is head), None)


@contextlib.contextmanager
def _quiet_exporter_logs() -> Iterator[None]:
    """Hold back the exporter's per-pass INFO lines (~100 of them) under ``pneumo -v``; warnings still show."""
    loggers = [logging.getLogger(name) for name in ("onnxscript", "onnx_ir", "torch.onnx")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(max(logger.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _torch_export(wrapper: nn.Module, example: torch.Tensor, path: Path, opset: int) -> None:
    """Dynamo export (static spatial size, dynamic batch); the legacy exporter only if dynamo fails."""
    outputs = [*OUTPUT_NAMES, FEATURE_MAP_OUTPUT] if getattr(wrapper, "with_feature_map", False) else list(OUTPUT_NAMES)
    names: dict[str, Any] = {"input_names": [INPUT_NAME], "output_names": outputs}
    try:
        torch.onnx.export(
            wrapper,
            (example,),
            str(path),
            **names,
            opset_version=opset,
            dynamo=True,
            dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},),
            external_data=False,
            verbose=False,
        )
        return
    except Exception as err:  # the dynamo exporter raises many types; the fallback decides
        log.warning("The dynamo ONNX exporter failed (%s: %s); trying the legacy exporter.", type(err).__name__, err)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # we know; it is the fallback
            torch.onnx.export(
                wrapper,
                (example,),
                str(path),
                **names,
                opset_version=opset,
                dynamo=False,
                dynamic_axes={name: {0: "batch"} for name in (INPUT_NAME, *outputs)},
            )
    except Exception as err:
        raise BackendError(f"ONNX export failed: {type(err).__name__}: {err}", code="onnx_export_failed") from err


def _stamp(path: Path, props: dict[str, str]) -> None:
    """Record where the graph came from in the file's ``metadata_props``."""
    import onnx

    model = onnx.load(str(path))
    kept = [p for p in model.metadata_props if p.key not in props]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for key, value in props.items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(path))


def _check_against_torch(path: Path, wrapper: nn.Module, example: torch.Tensor, temperature: float) -> None:
    """Refuse an export whose probabilities differ from PyTorch's by more than :data:`EXPORT_TOLERANCE`."""
    with torch.inference_mode():
        logits = wrapper(example)[0]
    onnx_logits, _ = OnnxRunner(path)(example.numpy())
    diff = float(
        np.abs(temperature_softmax(onnx_logits, temperature) - temperature_softmax(logits.numpy(), temperature)).max()
    )
    if not diff <= EXPORT_TOLERANCE:
        raise BackendError(
            f"The exported graph disagrees with PyTorch: probabilities differ by {diff:.2e} "
            f"(tolerance {EXPORT_TOLERANCE:g}). "
            "Report the architecture; serve it with pneumo.modeling.torch_predictor meanwhile.",
            code="onnx_export_failed",
        )
