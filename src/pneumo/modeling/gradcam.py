"""Grad-CAM heatmaps: where in the X-ray the model found the evidence for its answer.

The maintained ``grad-cam`` package (``pytorch_grad_cam``) computes the map; this module only
decides *which* layer to look at for each backbone family, *which* score to explain, and how
to lay the map over the image a clinician sees:

- layer: the last convolutional stage, where the features are still spatial but already
  semantic (EfficientNet: ``bn2`` after the 1x1 head conv; VGG: the last ReLU before the final
  pool, 14 x 14 at 224 px; Xception: ``act4``; other timm models: the last stage timm lists in
  ``feature_info``; anything else: the last module with a spatial 4-D output).
- score: the log-odds of the answer shown (PNEUMONIA vs NORMAL, summed over the bundle's
  positive labels), so the map explains the decision, in binary and 3-class bundles alike.
- image: the map is resized (squashed back, as preprocessing squashed the input) onto the
  decoded grayscale image, shrunk to at most ``max_side`` pixels for display
  (:mod:`pneumo.inference.explain` draws it, without torch).

The explainer works on a private structural copy of the predictor's model that shares its
weight storage (no extra memory) with gradients switched off, and cuts the backward pass at
the target layer, so a map costs about one extra forward pass, never touches the predictor's
own model (other threads may be predicting with it) and never accumulates ``.grad`` tensors.
"""

from __future__ import annotations

import copy
import logging
import threading
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from pneumo.core.bundle import POSITIVE, decide
from pneumo.core.decode import DecodedImage
from pneumo.inference.explain import DEFAULT_MAX_SIDE, ExplainUnavailableError, Explanation, to_display
from pneumo.modeling.weights import load_model

if TYPE_CHECKING:
    from pneumo.inference.predictor import Predictor

log = logging.getLogger(__name__)


def target_layer_name(model: nn.Module, probe_size: int = 64) -> str:
    """The name of the module whose output Grad-CAM explains (the last convolutional stage).

    Args:
        model: a timm classifier (or any CNN returning logits).
        probe_size: input side of the dry run used by the generic fallback only.

    Raises:
        ExplainUnavailableError: the model has no module with a spatial 4-D output.
    """
    modules = dict(model.named_modules())
    family = type(model).__name__
    if family == "EfficientNet" and "bn2" in modules:
        return "bn2"
    if family == "VGG" and "features" in modules:
        relus = [name for name, m in modules.items() if name.startswith("features.") and isinstance(m, nn.ReLU)]
        if relus:
            return relus[-1]
    if family == "Xception" and "act4" in modules:
        return "act4"
    spatial = _spatial_outputs(model, probe_size)
    info = getattr(model, "feature_info", None)
    if info:
        name = info[-1].get("module") if isinstance(info[-1], dict) else None
        if name in spatial:
            return str(name)
    if not spatial:
        raise ExplainUnavailableError(
            f"{family} has no convolutional layer with a spatial output, so Grad-CAM cannot map its evidence."
        )
    log.info("Grad-CAM: no rule for %s; using the last spatial layer %s", family, spatial[-1])
    return spatial[-1]


def _spatial_outputs(model: nn.Module, size: int) -> list[str]:
    """Names of the modules whose output is (N, C, H, W) with H, W > 1, in the order they finish."""
    finished: list[str] = []
    handles = []

    def hook(name: str) -> Any:
        def record(_module: nn.Module, _inputs: Any, output: Any) -> None:
            if isinstance(output, torch.Tensor) and output.dim() == 4 and min(output.shape[-2:]) > 1:
                finished.append(name)

        return record

    for name, module in model.named_modules():
        if name:
            handles.append(module.register_forward_hook(hook(name)))
    try:
        with torch.inference_mode():
            model(torch.zeros(1, 3, size, size))
    finally:
        for handle in handles:
            handle.remove()
    return list(dict.fromkeys(finished))  # a module called twice counts once, at its first finish


class _DecisionTarget:
    """Grad-CAM target: the calibrated log-odds of the answer to explain (:mod:`pneumo.core.probability`).

    ``log sum exp(positive logits) - log sum exp(negative logits)`` is the log-odds of
    P(pneumonia) in binary and multi-class bundles alike; its negation explains NORMAL.
    With ``label`` None the answer is decided from the same logits and threshold as
    :class:`~pneumo.inference.predictor.Predictor`, and remembered in ``label``.
    """

    def __init__(
        self,
        positive: list[int],
        n_labels: int,
        temperature: float,
        threshold: float,
        label: str | None,
        slope: float = 1.0,
        intercept: float = 0.0,
    ):
        self.positive = positive
        self.negative = [i for i in range(n_labels) if i not in positive]
        self.temperature = temperature
        self.threshold = threshold
        self.label = label
        self.slope, self.intercept = slope, intercept

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        scaled = logits / self.temperature
        gap = torch.logsumexp(scaled[self.positive], 0) - torch.logsumexp(scaled[self.negative], 0)
        log_odds = self.slope * gap + self.intercept  # the bundle's calibrated log-odds (core.probability)
        if self.label is None:
            self.label = decide(float(torch.sigmoid(log_odds.detach())), self.threshold)
        return log_odds if self.label == POSITIVE else -log_odds


class GradCamExplainer:
    """Grad-CAM for the model of a :class:`~pneumo.inference.predictor.Predictor`.

    Thread-safe: maps are computed one at a time (the ``grad-cam`` hooks live on a shared
    layer), while predictions on the predictor's own model carry on in parallel.

    Args:
        predictor: the predictor whose bundle to explain; its torch network is the torch backend's
            when it runs one, else loaded from the bundle's weights.
        layer: module name to explain; default: :func:`target_layer_name`.

    Raises:
        ExplainUnavailableError: no spatial layer, or the grad-cam package is missing.
    """

    def __init__(self, predictor: Predictor, layer: str | None = None) -> None:
        try:  # slow first import (~3 s): pay it here, not on the first upload
            from pytorch_grad_cam import GradCAM
        except ImportError as err:
            raise ExplainUnavailableError("Heatmaps need the grad-cam package: pip install grad-cam.") from err
        self._cam_class = GradCAM
        model = getattr(predictor.runner, "model", None)
        if not isinstance(model, nn.Module):
            model = load_model(predictor.bundle_dir, predictor.meta)
        self.predictor = predictor
        self.model = _frozen_view(model)
        self.layer_name = layer or target_layer_name(self.model)
        try:
            self.layer = self.model.get_submodule(self.layer_name)
        except AttributeError as err:
            raise ExplainUnavailableError(f"The model has no layer named {self.layer_name!r}.") from err
        self._lock = threading.Lock()

    def explain(
        self,
        image: DecodedImage | Image.Image,
        target_label: str | None = None,
        max_side: int = DEFAULT_MAX_SIDE,
    ) -> Explanation:
        """The Grad-CAM map of ``image`` for ``target_label`` (default: the model's own answer).

        Args:
            image: the decoded input (as from ``Predictor.decode``) or a grayscale Pillow image.
            target_label: ``PNEUMONIA`` or ``NORMAL``; pass the label shown to the user so the
                map explains that answer.
            max_side: the returned image and heatmap are shrunk to at most this many pixels a side.
        """
        if target_label not in (None, "PNEUMONIA", "NORMAL"):
            raise ValueError(f"target_label must be 'PNEUMONIA', 'NORMAL' or None, got {target_label!r}.")
        decoded = image if isinstance(image, DecodedImage) else DecodedImage(image.convert("L"), "image", image.size)
        display = decoded.image.copy()
        display.thumbnail((max_side, max_side), Image.Resampling.BILINEAR)
        array, crop = self.predictor.preprocessor.prepare(decoded.image)
        batch = torch.from_numpy(array[None])
        meta = self.predictor.meta
        target = _DecisionTarget(
            meta.positive_indices, len(meta.labels), meta.temperature, meta.threshold, target_label,
            meta.calibration.slope, meta.calibration.intercept,
        )  # fmt: skip
        with self._lock:
            cam = self._grad_cam(batch, target)
        heatmap = to_display(cam, crop, display.size)
        framed = crop if self.predictor.meta.preprocess.framed else None
        return Explanation(heatmap, display, str(target.label), self.layer_name, framed)

    def _grad_cam(self, batch: torch.Tensor, target: _DecisionTarget) -> np.ndarray:
        # The target layer's output becomes a leaf that needs a gradient: the backward pass
        # stops there instead of running down to the input through frozen weights.
        cut = self.layer.register_forward_hook(lambda _m, _i, out: out.detach().requires_grad_(True))
        try:
            with torch.inference_mode(False), torch.enable_grad(), self._cam_class(self.model, [self.layer]) as cam:
                maps = cam(input_tensor=batch.clone(), targets=[target])
        finally:
            cut.remove()
        return np.asarray(maps[0], dtype=np.float32)


def _frozen_view(model: nn.Module) -> nn.Module:
    """A structural copy of ``model`` whose parameters share storage with it but never need gradients.

    Hooks registered on the copy do not fire on the original, so Grad-CAM cannot disturb
    predictions running on the original in other threads.
    """
    memo: dict[int, Any] = {id(p): nn.Parameter(p.detach(), requires_grad=False) for p in model.parameters()}
    memo.update({id(b): b for b in model.buffers()})
    view = copy.deepcopy(model, memo)
    return view.eval()
