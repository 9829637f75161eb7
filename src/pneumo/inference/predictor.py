"""The one inference path: file or bytes -> decode -> preprocess -> model -> calibrated probability.

The CLI, the Streamlit app and the API all call :class:`Predictor`; none of them decodes,
resizes or normalizes an image on its own. Everything the path needs (input size, mean/std,
labels, temperature, threshold) comes from the model bundle.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pneumo.core.bundle import LOCALIZER_FILE, POSITIVE, Backend, BundleMeta, bundle_file, read_meta, resolve_bundle
from pneumo.core.decode import DEFAULT_LIMITS, DecodedImage, Limits, read_image
from pneumo.core.decode.isolate import default_pool
from pneumo.core.environment import available_cores
from pneumo.core.errors import NotAChestXrayError, PneumoError
from pneumo.core.framing import Box
from pneumo.core.preprocess import PreprocessConfig, Preprocessor
from pneumo.core.probability import positive_probability
from pneumo.inference.files import Source, name_of
from pneumo.inference.ood import OodGate
from pneumo.inference.runners import OnnxRunner, Runner, select_runner

log = logging.getLogger(__name__)

#: JPEG draft decoding asks for at least this fraction of the pixels the model needs on each side
#: (1.0: never below the needed size; see :func:`draft_size_for` and docs/performance.md).
DRAFT_FRACTION = 0.75


def bundle_preprocessor(folder: Path, meta: BundleMeta) -> Preprocessor:
    """Decoded image -> model input for the bundle in ``folder``: its framing with its own localizer, if any."""
    return Preprocessor(meta.preprocess, bundle_file(folder, LOCALIZER_FILE, required=meta.preprocess.framed))


def draft_fraction(config: PreprocessConfig) -> float:
    """The draft fraction a bundle decodes JPEGs at: :data:`DRAFT_FRACTION`, or 1.0 when it frames its films.

    A framed bundle crops the lung box *before* resizing, and the 0.75 study (docs/performance.md)
    measured the unframed model only, so it keeps the full input size until the study is repeated.
    """
    return 1.0 if config.framed else DRAFT_FRACTION


def draft_size_for(needed: int, fraction: float = DRAFT_FRACTION) -> int:
    """The ``draft_size`` to decode JPEGs at when the model needs ``needed`` pixels on each side of the film.

    A JPEG decodes at 1/1, 1/2, 1/4 or 1/8 scale (DCT scaling, Pillow's ``draft``): the smallest scale
    that still gives ``fraction * needed`` pixels on each side is taken. ``needed`` is the input size
    today; a crop before resizing (canonical framing) needs ``input_size / crop_fraction`` of the film.
    """
    return max(1, round(needed * fraction))


@dataclass
class Prediction:
    """The answer for one image.

    Attributes:
        label: ``PNEUMONIA`` when ``probability >= threshold``, else ``NORMAL``.
        probability: calibrated probability of pneumonia (the bundle's calibration: :mod:`pneumo.core.probability`).
        threshold: the decision threshold in force (chosen on validation data, from the bundle).
        probabilities: calibrated probability of every label of the bundle.
        source: file name, when known.
        format: the decoded format (jpeg, png, dicom, ...).
        metadata: DICOM header fields a clinician checks, when the input was DICOM.
        ood_score: distance to the training distribution, when the bundle has an OOD gate.
        crop: the part of the image the model saw, when the bundle frames films to their lungs:
            ``x0, y0, x1, y1`` as fractions of the width and height, and ``found`` (False: no lungs
            were found and the model saw the full frame).
        borderline: the probability and the label sit on opposite sides of 50% (the operating point
            is not at 50%): show it as a borderline answer, never as a plain percentage beside the
            label, which would read as a contradiction.
        operating_point: what the threshold was chosen for (from the bundle), to show with the answer.
    """

    label: str
    probability: float
    threshold: float
    probabilities: dict[str, float]
    source: str | None = None
    format: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    ood_score: float | None = None
    crop: dict[str, float | bool] | None = None
    borderline: bool = False
    operating_point: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Predictor:
    """Loads a model bundle once and answers predictions for files, bytes or preprocessed batches.

    Args:
        bundle: folder of a model bundle; ``None`` uses the default bundle shipped in the package.
        backend: ``"auto"`` (the bundle's checked INT8 graph, else its exported fp32 graph), ``"int8"``,
            ``"fp32"`` or a registered backend (``"torch"``, with the training stack: see
            :func:`pneumo.inference.runners.select_runner`); ``PNEUMO_BACKEND`` overrides ``"auto"``.
            ``self.backend`` says which one answers.
        limits: input limits applied by :func:`pneumo.core.decode.read_image`.
        check_ood: refuse images the bundle's out-of-distribution gate rejects (raise
            :class:`NotAChestXrayError`); when False the score is still reported but nothing is refused.
        meta: the bundle's metadata when the caller already holds it (the end of training scores a
            bundle whose ``bundle.json`` is not written yet); default: read from ``bundle``.
        runner: a ready runner instead of ``backend`` (the end of training passes its fp32 graph).
        isolate_decoding: decode DICOM and TIFF in the process-wide pool of worker processes
            (:func:`pneumo.core.decode.isolate.default_pool`), killed past ``limits.decode_cpu_seconds``
            of CPU; JPEG and PNG, bounded before decoding, stay in-process. False decodes all in-process.

    Raises:
        BundleError: the bundle is missing or invalid.
        BackendError: the backend cannot run here; the message says what to install or export.
    """

    def __init__(
        self,
        bundle: str | Path | None = None,
        *,
        backend: Backend | str = Backend.AUTO,
        limits: Limits = DEFAULT_LIMITS,
        check_ood: bool = True,
        meta: BundleMeta | None = None,
        runner: Runner | None = None,
        isolate_decoding: bool = True,
    ) -> None:
        # With ``meta`` given, bundle.json need not be written yet (the end of training scores the bundle first).
        self.bundle_dir = Path(bundle) if meta is not None and bundle is not None else resolve_bundle(bundle)
        self.meta: BundleMeta = meta if meta is not None else read_meta(self.bundle_dir)
        #: The "not a chest X-ray" gate, when the bundle has one (see pneumo.inference.ood).
        self.ood_gate: OodGate | None = OodGate.load(self.bundle_dir, self.meta.ood) if self.meta.ood else None
        self.check_ood = check_ood
        if self.ood_gate is None and check_ood:
            log.warning(
                "The bundle %s has no OOD gate: images that are not chest X-rays are not refused.", self.bundle_dir
            )
        self.limits = limits
        self._decode_isolated = isolate_decoding
        #: Decoded image -> model input, framing included (the bundle's own localizer when it frames).
        self.preprocessor = bundle_preprocessor(self.bundle_dir, self.meta)
        #: Least side JPEGs are draft-decoded to (:func:`draft_size_for`, :func:`draft_fraction`).
        self.draft_size = draft_size_for(self.meta.preprocess.input_size, draft_fraction(self.meta.preprocess))
        self.runner: Runner = runner if runner is not None else select_runner(self.bundle_dir, self.meta, backend)
        #: The backend that answers: ``"int8"``, ``"fp32"`` or a registered one (``"torch"``).
        self.backend = self.runner.kind
        self._pool_lock = threading.Lock()
        self._decode_pool: ThreadPoolExecutor | None = None
        self._half_runner: Runner | None = None

    @property
    def onnx_runner(self) -> OnnxRunner | None:
        """The ONNX Runtime session answering predictions (None on other backends); CAM reads its feature map."""
        return self.runner if isinstance(self.runner, OnnxRunner) else None

    @property
    def preprocess_config(self) -> PreprocessConfig:
        return self.meta.preprocess

    @property
    def threshold(self) -> float:
        return self.meta.threshold

    def describe(self) -> dict[str, Any]:
        """Bundle metadata for the app's sidebar and the API's ``/v1/model``."""
        meta = self.meta.to_dict()
        meta["backend"] = self.backend
        meta["bundle_dir"] = str(self.bundle_dir)
        return meta

    # --- the pipeline, step by step (each step usable on its own, e.g. by explain.py) ---

    def decode(self, source: Source) -> DecodedImage:
        """Read and validate one input (JPEG draft decoding: :func:`draft_size_for`), DICOM/TIFF under a deadline."""
        pool = default_pool() if self._decode_isolated else None
        return read_image(source, self.limits, draft_size=self.draft_size, pool=pool)

    def prepare(self, decoded: DecodedImage) -> np.ndarray:
        """A decoded image as the model's normalized float32 (3, S, S) input (framing included)."""
        return self.preprocessor(decoded.image)

    def prepare_image(self, image: Image.Image) -> np.ndarray:
        """A grayscale image (already decoded, e.g. a shifted one) as the model's input."""
        return self.preprocessor(image)

    def frame(self, decoded: DecodedImage) -> Box:
        """The box of ``decoded`` the model sees (the full frame, ``found=False``, when the bundle does not frame)."""
        return self.preprocessor.frame(decoded.image)[1]

    def forward(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Raw logits (N, C) and pooled backbone features (N, F) for a preprocessed batch (N, 3, S, S).

        The features feed the out-of-distribution gate; computing both in one pass costs nothing extra.
        """
        return self.runner(np.asarray(batch, dtype=np.float32))

    def logits(self, batch: np.ndarray) -> np.ndarray:
        """Raw logits (N, C) for a preprocessed batch (N, 3, S, S)."""
        return self.forward(batch)[0]

    def calibrated(self, logits: np.ndarray) -> np.ndarray:
        """Calibrated per-label probabilities (N, C): the bundle's calibration (:mod:`pneumo.core.probability`)."""
        return np.asarray(self.meta.label_probabilities(logits))

    def pneumonia_probability(self, probs: np.ndarray) -> np.ndarray:
        """P(pneumonia) per row: the sum over the bundle's positive labels."""
        return positive_probability(probs, self.meta.positive_indices)

    def _answer(
        self,
        probs: np.ndarray,
        features: np.ndarray,
        decoded: DecodedImage | None,
        source: str | None,
        box: Box | None = None,
    ) -> Prediction:
        ood_score = None
        if self.ood_gate is not None:
            ood_score, refusal = self.ood_gate.check(features, decoded.image if decoded else None, source)
            if self.check_ood and refusal:
                raise NotAChestXrayError(refusal)
        p = float(self.pneumonia_probability(probs[None])[0])
        return Prediction(
            label=self.meta.decide(p),
            probability=p,
            threshold=self.meta.threshold,
            probabilities={name: float(v) for name, v in zip(self.meta.labels, probs)},
            source=source,
            format=decoded.format if decoded else None,
            metadata=dict(decoded.metadata) if decoded else {},
            ood_score=ood_score,
            crop=_crop(box) if self.meta.preprocess.framed and box is not None else None,
            borderline=(p >= 0.5) != (self.meta.decide(p) == POSITIVE),
            operating_point=self.meta.threshold_rule,
        )

    # --- the public entry points ---

    def predict(self, source: Source | DecodedImage, name: str | None = None) -> Prediction:
        """Predict one file or upload, or an image :meth:`decode` already read (a caller that also
        explains the answer decodes once and passes the result to both).

        Raises:
            PneumoError: a typed error (invalid image, not a chest X-ray, ...) with a stable ``code``.
        """
        if isinstance(source, DecodedImage):
            decoded, name = source, name
        else:
            decoded, name = self.decode(source), name or name_of(source)
        array, box = self.preprocessor.prepare(decoded.image)
        logits, features = self.forward(array[None])
        return self._answer(self.calibrated(logits)[0], features[0], decoded, name, box)

    def predict_many(self, sources: Sequence[Source], batch_size: int = 16) -> list[Prediction | PneumoError]:
        """Predict many inputs in batches; one entry per input, in input order: a result or its error.

        Nothing is lost: a file that fails yields its :class:`PneumoError` in its place and the
        others still run. Decoding and preprocessing run in a pool of one thread per core, two
        batches ahead of the model (Pillow and the runtimes release the GIL). The model runs a batch
        with half the cores while decoding is still under way, and with all of them once everything
        ahead is decoded: a full-resolution JPEG costs about as much CPU as the model, and a model
        using every core while the decoders run too would stall at each of its parallel sections.
        Measured on 2 loaded cores (benchmarks/predict_many_overlap.py, docs/performance.md).
        """
        results: list[Prediction | PneumoError | None] = [None] * len(sources)
        pending: list[tuple[int, DecodedImage, np.ndarray, Box]] = []
        in_flight: deque[Future[tuple[DecodedImage, np.ndarray, Box] | PneumoError]] = deque()

        def flush() -> None:
            if not pending:
                return
            decoding = any(not future.done() for future in in_flight)
            runner = self._batch_runner() if decoding else self.runner
            logits, features = runner(np.stack([array for _, _, array, _ in pending]))
            for (index, decoded, _, box), row, feats in zip(pending, self.calibrated(logits), features):
                try:
                    results[index] = self._answer(row, feats, decoded, name_of(sources[index]), box)
                except PneumoError as err:
                    results[index] = err
            pending.clear()

        for index, prepared in enumerate(self._prepared(sources, 2 * batch_size, in_flight)):
            if isinstance(prepared, PneumoError):
                results[index] = prepared
            else:
                pending.append((index, *prepared))
            if len(pending) >= batch_size:
                flush()
        flush()
        return [r for r in results if r is not None]

    def predict_with_progress(
        self, sources: Sequence[Source], batch_size: int = 16, description: str = "predicting"
    ) -> list[Prediction | PneumoError]:
        """:meth:`predict_many` batch by batch under a progress bar (stderr; off when not a terminal or quiet)."""
        from pneumo.core import progress

        if len(sources) <= batch_size:
            return self.predict_many(sources, batch_size=batch_size)
        results: list[Prediction | PneumoError] = []
        with progress.task(description, len(sources)) as advance:
            for start in range(0, len(sources), batch_size):
                chunk = sources[start : start + batch_size]
                results += self.predict_many(chunk, batch_size=batch_size)
                advance(len(chunk))
        return results

    def _batch_runner(self) -> Runner:
        """The model with half the cores (made once, on the first batch that needs it), else the runner itself.

        Only runners that can be rebuilt with fewer threads (``with_threads``: ONNX Runtime, OpenVINO) get
        one; it holds a second copy of the graph.
        """
        cores = available_cores()
        make = getattr(self.runner, "with_threads", None)
        if cores < 2 or make is None:
            return self.runner
        with self._pool_lock:
            if self._half_runner is None:
                self._half_runner = make(max(1, cores // 2))
        return self._half_runner

    def _decode_and_prepare(self, source: Source) -> tuple[DecodedImage, np.ndarray, Box] | PneumoError:
        try:
            decoded = self.decode(source)
            return (decoded, *self.preprocessor.prepare(decoded.image))
        except PneumoError as err:
            return err

    def _prepared(
        self,
        sources: Sequence[Source],
        lookahead: int,
        queue: deque[Future[tuple[DecodedImage, np.ndarray, Box] | PneumoError]],
    ) -> Iterator[tuple[DecodedImage, np.ndarray, Box] | PneumoError]:
        """Decoded and preprocessed inputs in input order, at most ``lookahead`` in flight (bounded memory).

        ``queue`` holds the inputs in flight, so the caller sees whether decoding is still under way.
        """
        if len(sources) <= 1:
            yield from map(self._decode_and_prepare, sources)
            return
        with self._pool_lock:
            if self._decode_pool is None:
                self._decode_pool = ThreadPoolExecutor(
                    max_workers=available_cores(), thread_name_prefix="pneumo-decode"
                )
        for source in sources:
            queue.append(self._decode_pool.submit(self._decode_and_prepare, source))
            if len(queue) >= lookahead:
                yield queue.popleft().result()
        while queue:
            yield queue.popleft().result()

    def predict_tensors(self, batch: np.ndarray) -> np.ndarray:
        """P(pneumonia) for an already preprocessed batch (used by evaluation)."""
        return self.pneumonia_probability(self.calibrated(self.logits(batch)))


def _crop(box: Box) -> dict[str, float | bool]:
    """A crop box as the fields of :attr:`Prediction.crop` (rounded: 0.1% of the image is far below a pixel)."""
    return {"x0": round(box.x0, 4), "y0": round(box.y0, 4), "x1": round(box.x1, 4), "y1": round(box.y1, 4),
            "found": box.found}  # fmt: skip
