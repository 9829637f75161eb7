"""The one builder of test bundles: a tiny seeded random model, saved as a bundle and exported like production.

A freshly initialised timm network has BatchNorm statistics of exactly 0 and 1, so a bundle that
lost its buffers would still predict the same; and its head saturates the probabilities, so a
wrong threshold or temperature would not show. The models made here have random BatchNorm
statistics and a head chosen by ``head``:

- ``"small"`` (std 0.05): probabilities near 0.5 that still differ from image to image;
- ``"wide"`` (std 0.5): probabilities and heatmaps of ordinary spread, for the surfaces' tests;
- ``"spread"``: the head rescaled so the logit gaps of 32 synthetic X-rays have mean 0 and std 3
  (probabilities spread over (0, 1), so backend parity is tested away from one flat point).

Every bundle is exported to fp32 ONNX, into its own folder as ``model.onnx`` (where a user's export goes),
so ``Predictor(bundle)`` runs what production runs for a bundle without an INT8 graph; pass
``export=False`` for tests of the torch side only (:func:`pneumo.modeling.torch_predictor`).
An export takes seconds, so the same seeded weights are exported once per process and the graph copied.
Not the user cache: it keeps only the most recently used graphs, and pruned under a session
fixture's bundle it would leave that bundle without a graph halfway through the suite.
"""

from __future__ import annotations

import atexit
import functools
import io
import shutil
import tempfile
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from conftest import synthetic_xray
from torch import nn

from pneumo.core.bundle import ONNX_FILE, BundleMeta
from pneumo.core.decode import read_image
from pneumo.core.preprocess import PreprocessConfig, preprocess
from pneumo.inference.runners import weights_sha256
from pneumo.modeling.export import export_onnx
from pneumo.modeling.models import create_model, get_spec
from pneumo.modeling.weights import save_bundle

Head = Literal["small", "wide", "spread"]
#: What the API, app and DICOM tests expect a test bundle to call itself.
SURFACE_META: dict[str, Any] = {
    "name": "tiny-test",
    "version": "9.9.9",
    "metrics": {"roc_auc": 0.5, "sensitivity": 0.25},
}


def xray_jpegs(n: int, size: int = 96) -> list[bytes]:
    """``n`` different synthetic chest-like JPEGs (half with a pneumonia-like blotch), as bytes."""
    blobs = []
    for index in range(n):
        buffer = io.BytesIO()
        synthetic_xray(f"onnx-{index}", pneumonia=index % 2 == 1, size=size).save(buffer, "JPEG", quality=92)
        blobs.append(buffer.getvalue())
    return blobs


def tiny_model(
    arch: str = "efficientnet_lite0", num_classes: int = 2, seed: int = 0, head: Head = "small", input_size: int = 64
) -> nn.Module:
    """A seeded random eval-mode model with non-trivial BatchNorm statistics and a head chosen by ``head``."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = create_model(arch, num_classes=num_classes, pretrained=False)
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    assert module.running_mean is not None and module.running_var is not None
                    module.running_mean.uniform_(-0.05, 0.05)
                    module.running_var.uniform_(0.8, 1.2)
            classifier: Any = model.get_classifier()  # type: ignore[operator]
            classifier.weight.normal_(0.0, 0.5 if head == "wide" else 0.05 if head == "small" else 1.0)
            classifier.bias.zero_()
    model.eval()
    if head == "spread":
        _spread_head(model, input_size)
    return model


def _spread_head(model: Any, input_size: int) -> None:
    """Rescale and centre the head: logit gaps with mean 0 and standard deviation 3 on synthetic X-rays."""
    config = PreprocessConfig(input_size, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    batch = torch.from_numpy(np.stack([preprocess(read_image(blob).image, config) for blob in xray_jpegs(32)]))
    head = model.get_classifier()
    sign = torch.tensor([-1.0, 1.0])
    with torch.no_grad():
        features = model.forward_head(model.forward_features(batch), pre_logits=True)
        scale = 3.0 / (head(features) @ sign).std()
        head.weight.mul_(scale)
        head.bias.mul_(scale)
        head.bias[1] -= (head(features) @ sign).mean()


def tiny_bundle(
    folder: Path,
    model: nn.Module | None = None,
    *,
    arch: str = "efficientnet_lite0",
    labels: list[str] | None = None,
    input_size: int = 64,
    seed: int = 0,
    head: Head = "small",
    export: bool = True,
    **meta: Any,
) -> tuple[Path, nn.Module]:
    """Save ``model`` (default: :func:`tiny_model`) as a bundle with a small input size (and, with ``export``, its
    fp32 ``model.onnx``); returns both.

    ``meta`` sets or overrides fields of ``bundle.json`` (``threshold``, ``name``, ...).
    """
    labels = labels or ["NORMAL", "PNEUMONIA"]
    model = model if model is not None else tiny_model(arch, len(labels), seed, head, input_size)
    spec = get_spec(arch)
    fields: dict[str, Any] = {
        "arch": arch,
        "timm_name": spec.timm_name,
        "labels": labels,
        "preprocess": PreprocessConfig(input_size, spec.preprocess.mean, spec.preprocess.std),
        **meta,
    }
    folder = save_bundle(folder, model, BundleMeta(**fields))
    if export:
        key = (weights_sha256(folder), arch, input_size)
        if key not in _GRAPHS:
            _GRAPHS[key] = export_onnx(folder, out=Path(_graph_folder()) / f"{len(_GRAPHS)}.onnx")
        shutil.copyfile(_GRAPHS[key], folder / ONNX_FILE)
    return folder, model


#: This process's exports by (weights' SHA-256, arch, input size): the graph records the weights' hash,
#: arch and size only, so one export serves every bundle of the same seeded weights.
_GRAPHS: dict[tuple[str, str, int], Path] = {}


@functools.cache
def _graph_folder() -> str:
    folder = tempfile.mkdtemp(prefix="pneumo-test-graphs-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder
