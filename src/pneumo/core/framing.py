"""Canonical framing: find the lung fields and hand the classifier the same anatomy, however the film was framed.

A classifier trained on squashed full films learns *how a film was framed* (tight collimation, cut
shoulders, burned-in text, black borders) along with the lungs. :class:`Framer` removes that cue:
it locates the lung fields with a tiny ONNX regressor (:mod:`pneumo.modeling.localizer` trains it
on classical pseudo-labels, with the label box moved along with random crops, pads, aspect
changes, rotations and burned-in text, so it learned to be equivariant), grows the box by a fixed
margin and crops. The crop then goes through the usual :func:`pneumo.core.preprocess.resize`.

The inference path is NumPy, Pillow and ONNX Runtime only (no torch, no scipy): 64 x 64
thumbnails through a 0.6 MB graph of ~6.5 M multiply-adds, run on the image and its mirror image,
twice (see :meth:`Framer.locate`): ~0.5 ms per film, under the 2 ms budget (measured by
``benchmarks/framing_equivariance.py``). Method ``"none"`` returns the full frame, so bundles made
before framing behave exactly as before.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import numpy as np
from PIL import Image
from pydantic import ConfigDict, Field, PositiveInt

from pneumo.core.errors import PneumoError

log = logging.getLogger(__name__)

#: The localizer graph shipped with the package (see the README next to it for how it was made).
DEFAULT_LOCALIZER = Path(__file__).resolve().parents[1] / "assets" / "localizer" / "lungbox-v1.onnx"
#: ONNX input and output names of the localizer graph (written by :mod:`pneumo.modeling.localizer`).
LOCALIZER_INPUT = "thumbnail"
LOCALIZER_OUTPUT = "box_found"
#: A thumbnail whose gray levels spread less than this (std, 0-255 scale) holds no anatomy: a
#: blank or nearly flat image. Checked before the graph runs, so its answer is never trusted there.
_MIN_STD = 4.0
#: Smallest side of the part of a lung box inside the image, as a fraction of it: smaller boxes are not lungs.
_MIN_SIDE = 0.15
#: Range the localizer's corners can take: past the frame where it cuts the lungs, never further.
_BOX_RANGE = (-0.5, 1.5)
#: Below this many pixels on a side, a further look is skipped (its thumbnail would be mostly blur).
_MIN_REFINE_PIXELS = 16


@dataclass(frozen=True)
class FramingConfig:
    """How an image is framed before the classifier sees it (a section of the bundle's preprocessing).

    The annotations double as a pydantic schema, like :class:`pneumo.core.preprocess.PreprocessConfig`.

    Attributes:
        method: ``"none"`` (the full frame; every bundle made before framing) or ``"lungbox-v1"``
            (the learned lung-field localizer).
        margin: added on each side of the lung box, as a fraction of the box's width (left and
            right) or height (top and bottom). 0.08 (~6% of a typical film, ~14 px at 224): the
            localizer's box, learned from dark aerated lung, stops a few pixels inside the pleura,
            and at 0.05 the crops of the full-resolution films grazed the lung apices; and no
            more, because every bit of margin that runs past the film's edge is clamped there,
            which lets the framing back in. Measured on training films: the crop stays inside the
            frame on 80% of films at 0.05, 70% at 0.08, 62% at 0.10, 26% at 0.15, and under the six
            framing shifts the crop the model sees matches the clean film's crop with mean IoU
            0.90, 0.88, 0.86 and 0.83.
        input_size: side of the square thumbnail the localizer reads (fixed by its graph).
        min_found: probability under which the localizer's "lungs found" output means fallback.
        passes: how many looks :meth:`Framer.locate` takes, each at the box of the one before (1: one
            look at the whole image). 2: on training films the second look lifts the mean IoU under
            crop_sides_10 from ~0.94 to 0.969 and a third to 0.975, but on a cartoon chest (out of
            the films' domain) each further look drifted more, so the default stops at two.
    """

    __pydantic_config__: ClassVar[ConfigDict] = ConfigDict(extra="forbid")

    method: Literal["none", "lungbox-v1"] = "none"
    margin: Annotated[float, Field(ge=0.0, le=1.0)] = 0.08
    input_size: PositiveInt = 64
    min_found: Annotated[float, Field(ge=0.0, le=1.0)] = 0.5
    passes: Annotated[int, Field(ge=1, le=5)] = 2

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Box:
    """A box in normalized image coordinates (0 = left/top edge, 1 = right/bottom edge).

    :meth:`Framer.locate`'s lung box may reach past 0 or 1 (by at most 0.5) where the frame cuts the
    lungs; :meth:`Framer.crop_box` is always inside [0, 1].

    Attributes:
        found: ``False`` when no lungs were found and the box is the full-frame fallback.
    """

    x0: float
    y0: float
    x1: float
    y1: float
    found: bool = True

    @property
    def width(self) -> float:
        return max(0.0, self.x1 - self.x0)

    @property
    def height(self) -> float:
        return max(0.0, self.y1 - self.y0)

    def to_pixels(self, width: int, height: int) -> tuple[int, int, int, int]:
        """``(left, top, right, bottom)`` pixel edges for ``Image.crop``, clamped and at least 1 x 1."""
        left = min(max(round(self.x0 * width), 0), max(width - 1, 0))
        top = min(max(round(self.y0 * height), 0), max(height - 1, 0))
        right = min(max(round(self.x1 * width), left + 1), max(width, left + 1))
        bottom = min(max(round(self.y1 * height), top + 1), max(height, top + 1))
        return left, top, right, bottom

    def iou(self, other: Box) -> float:
        """Intersection over union of the two boxes (0 when either is empty)."""
        inter = max(0.0, min(self.x1, other.x1) - max(self.x0, other.x0)) * max(
            0.0, min(self.y1, other.y1) - max(self.y0, other.y0)
        )
        union = self.width * self.height + other.width * other.height - inter
        return inter / union if union > 0 else 0.0


#: The full frame, flagged as a fallback.
FULL_FRAME = Box(0.0, 0.0, 1.0, 1.0, found=False)


def to_gray(image: Image.Image) -> Image.Image:
    """Any Pillow image as 8-bit grayscale (``read_image`` already gives "L"; this covers direct callers)."""
    if image.mode == "L":
        return image
    if image.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N", "F"):
        pixels = np.asarray(image, dtype=np.float64)
        pixels = np.nan_to_num(pixels, nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = float(pixels.min()), float(pixels.max())
        scaled = (pixels - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(pixels)
        return Image.fromarray(scaled.astype(np.uint8), mode="L")
    if image.mode in ("RGBA", "LA", "PA", "P"):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, image).convert("L")
    return image.convert("L")


def thumbnail(image: Image.Image, size: int) -> np.ndarray:
    """The localizer's input: ``image`` squashed to ``size`` x ``size``, float32 (1, 1, S, S) in [-1, 1].

    Shared with training (:mod:`pneumo.modeling.localizer`), so the graph always reads what it was
    trained on. Squashed like the dataset, so the aspect ratio of the film is part of what the
    augmentation taught the localizer to ignore. ``reducing_gap`` first shrinks huge images by
    an integer box filter: the result differs from a plain resize by under one gray level and
    costs a fraction on a 2,000 px film.
    """
    small = to_gray(image).resize((size, size), Image.Resampling.BILINEAR, reducing_gap=3.0)
    return (np.asarray(small, dtype=np.float32) / 127.5 - 1.0)[None, None]


def _grown(box: Box, dx: float, dy: float) -> Box:
    """``box`` grown by ``dx`` left and right and ``dy`` top and bottom, clamped to the image."""
    return Box(max(0.0, box.x0 - dx), max(0.0, box.y0 - dy), min(1.0, box.x1 + dx), min(1.0, box.y1 + dy), box.found)


class Framer:
    """Locates the lung fields and crops the image to them plus a fixed margin.

    Thread-safe: the ONNX session is created once and ONNX Runtime sessions may be run from
    several threads.

    Args:
        config: the bundle's framing section.
        localizer_path: the localizer graph; ``None`` means the one shipped with the package.

    Raises:
        PneumoError: ``localizer_missing`` when the method needs a graph that cannot be loaded.
    """

    def __init__(self, config: FramingConfig, localizer_path: Path | None = None) -> None:
        self.config = config
        self._session: Any = None
        if config.method == "none":
            return
        if config.method != "lungbox-v1":  # plain construction skips pydantic's Literal check
            raise PneumoError(
                f"Unknown framing method {config.method!r}; expected 'none' or 'lungbox-v1'. "
                "Upgrade pneumo to read this bundle.",
                code="unknown_framing_method",
            )
        path = Path(localizer_path) if localizer_path is not None else DEFAULT_LOCALIZER
        try:
            import onnxruntime as ort

            options = ort.SessionOptions()
            # One thread: the graph is tiny, and waking a pool costs more than the arithmetic on busy cores.
            options.intra_op_num_threads = 1
            options.inter_op_num_threads = 1
            self._session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as err:  # missing file, corrupt graph, wrong opset: one clear error
            raise PneumoError(
                f"The lung localizer {path} cannot be loaded ({type(err).__name__}); framing method "
                f"{config.method!r} needs it. Reinstall pneumo or pass the bundle's localizer.onnx.",
                code="localizer_missing",
            ) from err

    def locate(self, image: Image.Image) -> Box:
        """The box of the lung fields (no margin), or :data:`FULL_FRAME` (``found=False``) when none are found.

        The first look is at the whole image; each further look (``config.passes``) is at the image
        cropped to the box found before. That view is nearly the same however the film was framed
        (the lungs fill it), so the answer hardly depends on the framing any more. No margin around
        the box for that look: on training films a margin measured worse the wider it was (mean
        IoU under crop_sides_10 0.969 with none, 0.955 with 8%, 0.937 with 25%). Each look averages
        the image and its mirror image, which halves the regressor's jitter. The box may reach past
        0 or 1 (by at most 0.5) where the frame cuts the lungs: the localizer learned where they
        end, so the box names the same anatomy whatever the crop.

        Never raises on image content: any size, mode or picture gives a box.
        """
        if self._session is None or min(image.size) < 2:
            return FULL_FRAME
        try:
            gray = to_gray(image)
        except Exception as err:  # an exotic mode Pillow cannot convert: no lungs we can see
            log.info("Framing fell back to the full frame: %s", err)
            return FULL_FRAME
        # One integer box-filter shrink to at most ~4 thumbnails a side: both looks then resize a
        # small image (a full-resolution film drafted to ~400 px: 1.16 -> 0.8 ms); the 224 px
        # films the localizer trained on are left as they are.
        factor = min(gray.size) // (2 * self.config.input_size)
        if factor >= 2:
            gray = gray.reduce(factor)
        box = self._look(gray)
        if box is None:
            return FULL_FRAME
        w, h = gray.size
        for _ in range(self.config.passes - 1):
            left, top, right, bottom = _grown(box, 0.0, 0.0).to_pixels(w, h)  # the box, clamped
            if min(right - left, bottom - top) < _MIN_REFINE_PIXELS:
                break
            inner = self._look(gray.crop((left, top, right, bottom)), check_found=False)
            if inner is None:
                break
            sx, sy = (right - left) / w, (bottom - top) / h
            box = Box(
                left / w + inner.x0 * sx, top / h + inner.y0 * sy, left / w + inner.x1 * sx, top / h + inner.y1 * sy
            )
        return box

    def _look(self, gray: Image.Image, check_found: bool = True) -> Box | None:
        """One look at ``gray`` and its mirror image: the averaged box, or ``None`` when it holds no lungs."""
        pixels = thumbnail(gray, self.config.input_size)
        if float(pixels.std()) * 127.5 < _MIN_STD:
            return None
        both = np.concatenate([pixels, pixels[..., ::-1]])
        plain, mirrored = self._session.run([LOCALIZER_OUTPUT], {LOCALIZER_INPUT: both})[0].astype(np.float64)
        x0, x1 = (plain[0] + 1.0 - mirrored[2]) / 2, (plain[2] + 1.0 - mirrored[0]) / 2
        y0, y1 = (plain[1] + mirrored[1]) / 2, (plain[3] + mirrored[3]) / 2
        found = (plain[4] + mirrored[4]) / 2
        if not np.isfinite([x0, y0, x1, y1, found]).all() or (check_found and found < self.config.min_found):
            return None
        x0, x1 = sorted((float(np.clip(x0, *_BOX_RANGE)), float(np.clip(x1, *_BOX_RANGE))))
        y0, y1 = sorted((float(np.clip(y0, *_BOX_RANGE)), float(np.clip(y1, *_BOX_RANGE))))
        if min(x1, 1.0) - max(x0, 0.0) < _MIN_SIDE or min(y1, 1.0) - max(y0, 0.0) < _MIN_SIDE:
            return None
        return Box(x0, y0, x1, y1)

    def crop_box(self, image: Image.Image) -> Box:
        """The lung box grown by the margin and clamped to the image: the part of the film the model sees.

        Clamped, never padded beyond the frame: a crop that ran past the edge would have to be
        filled (black, say), and the width of that fill would say how tightly the film was
        collimated, the very cue framing removes. When the lungs reach the edge, the model sees
        the film up to its edge, as the training crops of such films did.
        """
        box = self.locate(image)
        if not box.found:
            return box
        return _grown(box, self.config.margin * box.width, self.config.margin * box.height)

    def apply(self, image: Image.Image) -> tuple[Image.Image, Box]:
        """The cropped image (grayscale "L") and its crop box; the full frame when no lungs were found.

        The input is never modified. The crop is not square: :func:`pneumo.core.preprocess.resize`
        squashes it to the model's input, as the dataset's films were squashed.
        """
        box = self.crop_box(image)
        gray = to_gray(image)
        if box == FULL_FRAME or (box.x0, box.y0, box.x1, box.y1) == (0.0, 0.0, 1.0, 1.0):
            return (gray.copy() if gray is image else gray), box
        return gray.crop(box.to_pixels(*gray.size)), box
