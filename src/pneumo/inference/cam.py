"""Heatmaps without torch: CAM from the ONNX graph's last feature map, in NumPy.

For a backbone whose pooled features are the spatial mean of its last feature map ``A`` (C, h, w)
and whose head is one linear layer ``W`` (labels, C), Grad-CAM *is* CAM: the gradient of a logit
with respect to ``A`` is ``W[label] / (h w)`` at every position, so Grad-CAM's channel weights are
the head's weights and the map is ``relu(sum_c w_c A_c)``. The exported graph
(:mod:`pneumo.modeling.export`) outputs ``A`` as ``feature_map`` and names the head in its metadata
only when that holds (checked numerically at export), and the head's weights are read from the
bundle's ``weights.safetensors`` (two tensors, with the NumPy reader of safetensors).

The score explained is the same as :mod:`pneumo.modeling.gradcam`'s: the temperature-scaled
log-odds of the answer shown, ``logsumexp(z_pos / T) - logsumexp(z_neg / T)``; its gradient with
respect to the logits is a softmax within each group over ``T``, which weights the head's rows.
The map then goes through the same steps as the ``grad-cam`` package (ReLU, min-max scaling,
bilinear resize to the input size) and the same display resize, so both explainers draw the same
picture (checked in the tests: correlation >= 0.99 on real X-rays).

:func:`make_explainer` is what the API, the app and the DICOM node call: CAM from ONNX when the
Predictor's graph allows it, else a clear :class:`ExplainUnavailableError` (the torch Grad-CAM is
the training stack's reference, :mod:`pneumo.modeling.gradcam`).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from pneumo.core.bundle import CAM_HEAD_KEY, POSITIVE, WEIGHTS_FILE, bundle_file
from pneumo.core.decode import DecodedImage
from pneumo.inference.explain import DEFAULT_MAX_SIDE, Explainer, ExplainUnavailableError, Explanation, to_display
from pneumo.inference.runners import GraphRunner

if TYPE_CHECKING:
    from pneumo.inference.predictor import Predictor

log = logging.getLogger(__name__)

#: What :attr:`Explanation.layer` says for maps made here.
CAM_LAYER = "feature_map (CAM from ONNX)"


class OnnxCamExplainer:
    """CAM heatmaps from the Predictor's ONNX graph (int8 or fp32, ONNX Runtime or OpenVINO); as ``GradCamExplainer``.

    Thread-safe without a lock: every map is one ``session.run`` plus NumPy on local arrays.

    Raises:
        ExplainUnavailableError: the Predictor runs no ONNX graph, or its graph has no feature map
            or no CAM head (another architecture: the torch Grad-CAM of pneumo.modeling.gradcam applies).
    """

    def __init__(self, predictor: Predictor) -> None:
        runner = getattr(predictor, "runner", None)
        if not isinstance(runner, GraphRunner):  # ONNX Runtime or OpenVINO, on the same graph
            raise ExplainUnavailableError("CAM from ONNX needs an ONNX backend; this predictor runs another backend.")
        head = runner.metadata.get(CAM_HEAD_KEY)
        if not runner.has_feature_map or not head:
            raise ExplainUnavailableError(
                f"The ONNX graph of {predictor.meta.arch} does not allow CAM (no feature map output or no linear head)."
            )
        from safetensors import safe_open  # the NumPy reader: two tensors, no torch

        try:
            with safe_open(str(bundle_file(predictor.bundle_dir, WEIGHTS_FILE)), framework="numpy") as weights:
                self.head_weight = np.asarray(weights.get_tensor(f"{head}.weight"), dtype=np.float64)
        except Exception as err:  # missing key or unreadable file: the weights do not fit the graph
            raise ExplainUnavailableError(f"The head {head!r} cannot be read from the bundle's weights: {err}") from err
        self.predictor = predictor
        self.runner = runner
        self.layer_name = CAM_LAYER

    def explain(
        self, image: DecodedImage | Image.Image, target_label: str | None = None, max_side: int = DEFAULT_MAX_SIDE
    ) -> Explanation:
        """The CAM map of ``image`` for ``target_label`` (default: the model's own answer); see ``GradCamExplainer``."""
        if target_label not in (None, "PNEUMONIA", "NORMAL"):
            raise ValueError(f"target_label must be 'PNEUMONIA', 'NORMAL' or None, got {target_label!r}.")
        decoded = image if isinstance(image, DecodedImage) else DecodedImage(image.convert("L"), "image", image.size)
        display = decoded.image.copy()
        display.thumbnail((max_side, max_side), Image.Resampling.BILINEAR)
        array, crop = self.predictor.preprocessor.prepare(decoded.image)
        logits, _, feature_map = self.runner.with_feature_map(array[None])
        label, grad = self._score_gradient(logits[0], target_label)
        cam = np.maximum(np.tensordot(grad @ self.head_weight, feature_map[0], axes=1), 0.0).astype(np.float32)
        heatmap = to_display(_scaled(cam, array.shape[-1]), crop, display.size)
        return Explanation(
            heatmap, display, label, self.layer_name, crop if self.predictor.meta.preprocess.framed else None
        )

    def _score_gradient(self, logits: np.ndarray, target_label: str | None) -> tuple[str, np.ndarray]:
        """The answer explained and d(calibrated log-odds of that answer)/d(logits).

        The log-odds is the bundle's own (:mod:`pneumo.core.probability`): ``slope * gap(z / T) + intercept``,
        whose gradient is, within each group of labels, their softmax share times ``slope / T``.
        """
        meta = self.predictor.meta
        scaled = np.asarray(logits, dtype=np.float64) / meta.temperature
        positive = list(meta.positive_indices)
        negative = [i for i in range(len(scaled)) if i not in positive]
        grad = np.zeros_like(scaled)
        for group, sign in ((positive, 1.0), (negative, -1.0)):
            part = np.exp(scaled[group] - scaled[group].max())
            grad[group] = sign * part / part.sum()
        grad *= meta.calibration.slope / meta.temperature
        label = target_label or meta.decide(float(meta.probability(logits[None])[0]))
        return label, grad if label == POSITIVE else -grad


def _scaled(cam: np.ndarray, input_size: int) -> np.ndarray:
    """Min-max scale and resize to the input size (the ``grad-cam`` package's steps); the display comes after."""
    cam = cam - cam.min()
    cam = cam / (1e-7 + cam.max())
    full = Image.fromarray(cam, mode="F").resize((input_size, input_size), Image.Resampling.BILINEAR)
    return np.asarray(full, dtype=np.float32)


def make_explainer(predictor: Predictor) -> Explainer:
    """The heatmap explainer for ``predictor``: CAM from its ONNX graph.

    Raises:
        ExplainUnavailableError: the predictor's graph exports no feature map or has no linear head
            (another architecture, or another backend); the message says why.
    """
    return OnnxCamExplainer(predictor)
