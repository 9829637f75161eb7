"""Heatmaps: what an explainer is, what it returns, and the overlay drawn from it (no torch).

Two explainers satisfy :class:`Explainer`: CAM from the ONNX graph's feature map
(:class:`pneumo.inference.cam.OnnxCamExplainer`, what the API, the app and the DICOM node use) and
the torch Grad-CAM of the training stack (:class:`pneumo.modeling.gradcam.GradCamExplainer`, the
reference the CAM is tested against). The surfaces only ever see this protocol.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
from PIL import Image, ImageDraw

from pneumo.core.decode import DecodedImage
from pneumo.core.errors import PneumoError
from pneumo.core.framing import Box

#: Default share of the colour map in the overlay's hottest pixels.
DEFAULT_OPACITY = 0.45
#: Longest side of the image the heatmap is drawn on (a DICOM can be 3000 px; a screen shows ~600).
DEFAULT_MAX_SIDE = 1024

# Matplotlib's ``jet`` (its ``_jet_data`` segments, sampled as its 256-entry lookup table): the same
# colours to 1e-15 (tests/modeling/test_gradcam.py), without an 80 MB plotting library in the serving install.
_JET_SEGMENTS = (
    ((0.0, 0.0), (0.35, 0.0), (0.66, 1.0), (0.89, 1.0), (1.0, 0.5)),
    ((0.0, 0.0), (0.125, 0.0), (0.375, 1.0), (0.64, 1.0), (0.91, 0.0), (1.0, 0.0)),
    ((0.0, 0.5), (0.11, 1.0), (0.34, 1.0), (0.65, 0.0), (1.0, 0.0)),
)
_JET = np.stack([np.interp(np.linspace(0.0, 1.0, 256), *np.transpose(seg)) for seg in _JET_SEGMENTS], axis=1)


def jet_colours(heat: np.ndarray) -> np.ndarray:
    """RGB in [0, 1] (shape ``heat.shape + (3,)``) of heat values in [0, 1], as ``matplotlib.colormaps["jet"]``."""
    return _JET[np.clip((np.asarray(heat) * 256).astype(np.int64), 0, 255)]


class ExplainUnavailableError(PneumoError):
    """No heatmap for this model (its graph exports no feature map, or the backend has none)."""

    code = "explain_unavailable"
    http_status = 501


@dataclass
class Explanation:
    """A heatmap aligned with the image it explains.

    Attributes:
        heatmap: float32 array (H, W) in [0, 1], the size of ``image``; 1 = strongest evidence.
        image: the grayscale image (display size) the heatmap is aligned with.
        target_label: the answer whose evidence is shown (``PNEUMONIA`` or ``NORMAL``).
        layer: name of the module the map was taken from.
        crop: the part of the image the model saw, when the bundle frames films to their lungs (the
            map is zero outside it, and the overlay outlines it).
    """

    heatmap: np.ndarray
    image: Image.Image
    target_label: str
    layer: str
    crop: Box | None = None

    def overlay(self, opacity: float = DEFAULT_OPACITY) -> Image.Image:
        """The image in RGB with the heatmap laid over it and the crop outlined (see :func:`overlay_heatmap`)."""
        return overlay_heatmap(self.image, self.heatmap, opacity, self.crop)


class Explainer(Protocol):
    """Computes the heatmap of one decoded image: where the evidence for an answer lies."""

    #: Where the map is taken from (shown to users next to the heatmap).
    layer_name: str

    def explain(
        self, image: DecodedImage | Image.Image, target_label: str | None = None, max_side: int = DEFAULT_MAX_SIDE
    ) -> Explanation:
        """The map of ``image`` for ``target_label`` (default: the model's own answer), at most ``max_side`` px."""
        ...


def to_display(cam: np.ndarray, crop: Box, display_size: tuple[int, int]) -> np.ndarray:
    """A map over the model's input (the crop, squashed square) laid onto the displayed image; 0 outside the crop."""
    width, height = display_size
    left, top, right, bottom = crop.to_pixels(width, height)
    region = Image.fromarray(np.asarray(cam, dtype=np.float32), mode="F").resize(
        (right - left, bottom - top), Image.Resampling.BILINEAR
    )
    out = np.zeros((height, width), dtype=np.float32)
    out[top:bottom, left:right] = np.asarray(region, dtype=np.float32)
    return np.clip(out, 0.0, 1.0)


def overlay_heatmap(
    image: Image.Image, heatmap: np.ndarray, opacity: float = DEFAULT_OPACITY, crop: Box | None = None
) -> Image.Image:
    """Blend a ``jet``-coloured heatmap onto ``image``, weighting each pixel by its heat; outline ``crop``.

    A pixel's colour share is ``opacity * heat``: regions without evidence keep the plain
    radiograph (a uniform blue wash, as a plain alpha blend gives, hides the anatomy) and the
    hottest regions get ``opacity`` of colour. ``opacity`` 0 returns the image unchanged (but for
    the outline of ``crop``, the part of the film the model saw, drawn in yellow when given).

    Raises:
        ValueError: the heatmap does not have the image's size, or ``opacity`` is outside [0, 1].
    """
    if not 0.0 <= opacity <= 1.0:
        raise ValueError(f"opacity must be in [0, 1], got {opacity}.")
    if heatmap.shape != (image.height, image.width):
        raise ValueError(f"heatmap shape {heatmap.shape} does not match the image ({image.height}, {image.width}).")
    base = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    heat = np.clip(heatmap.astype(np.float32), 0.0, 1.0)
    colour = jet_colours(heat).astype(np.float32)
    weight = (opacity * heat)[..., None]
    blended = base * (1.0 - weight) + colour * weight
    out = Image.fromarray(np.round(blended * 255.0).astype(np.uint8), mode="RGB")
    if crop is not None and crop.found:
        left, top, right, bottom = crop.to_pixels(out.width, out.height)
        line = max(1, round(min(out.size) / 300))
        ImageDraw.Draw(out).rectangle((left, top, right - 1, bottom - 1), outline=(255, 220, 0), width=line)
    return out
