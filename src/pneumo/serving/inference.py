"""The one inference path: file or bytes -> decode -> preprocess -> model -> calibrated probability.

The CLI, the Streamlit app and the API all call :class:`Predictor`; none of them decodes,
resizes or normalizes an image on its own. Everything the path needs (input size, mean/std,
labels, temperature, threshold) comes from the model bundle.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pneumo.core.bundle import BundleMeta, read_meta, resolve_bundle
from pneumo.core.errors import NotAChestXrayError, PneumoError
from pneumo.core.io import DEFAULT_LIMITS, DecodedImage, Limits, read_image
from pneumo.core.preprocess import PreprocessConfig, preprocess
from pneumo.core.probability import positive_probability, temperature_softmax
from pneumo.serving.onnx_runtime import OnnxRunner, select_onnx_runner
from pneumo.serving.ood import OodGate

if TYPE_CHECKING:
    from torch import nn

log = logging.getLogger(__name__)

Source = str | Path | bytes
#: A backend: preprocessed float32 batch (N, 3, S, S) -> (logits (N, C), pooled features (N, F)).
Runner = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


@dataclass
class Prediction:
    """The answer for one image.

    Attributes:
        label: ``PNEUMONIA`` when ``probability >= threshold``, else ``NORMAL``.
        probability: calibrated probability of pneumonia (temperature-scaled softmax).
        threshold: the decision threshold in force (chosen on validation data, from the bundle).
        probabilities: calibrated probability of every label of the bundle.
        source: file name, when known.
        format: the decoded format (jpeg, png, dicom, ...).
        metadata: DICOM header fields a clinician checks, when the input was DICOM.
        ood_score: distance to the training distribution, when the bundle has an OOD gate.
    """

    label: str
    probability: float
    threshold: float
    probabilities: dict[str, float]
    source: str | None = None
    format: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    ood_score: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Predictor:
    """Loads a model bundle once and answers predictions for files, bytes or tensors.

    Args:
        bundle: folder of a model bundle; ``None`` uses the default bundle shipped in the package.
        limits: input limits applied by :func:`pneumo.core.io.read_image`.
        device: torch device for the torch backend.
        backend: ``"auto"`` (the bundle's INT8 ONNX graph when it ships one, else the fp32 ONNX graph
            when onnxruntime imports, else PyTorch), ``"int8"``, ``"onnx"`` (fp32) or ``"torch"``
            (raise if impossible); the environment variable ``PNEUMO_BACKEND`` overrides ``"auto"``.
            See :func:`pneumo.serving.onnx_runtime.select_onnx_runner`. ``self.backend`` says which one
            runs; ``self.model`` (the torch network, for Grad-CAM) is loaded on first use only.
        check_ood: refuse images the bundle's out-of-distribution gate rejects (raise
            :class:`NotAChestXrayError`); when False the score is still reported but nothing is refused.
    """

    def __init__(
        self,
        bundle: str | Path | None = None,
        *,
        limits: Limits = DEFAULT_LIMITS,
        device: str = "cpu",
        backend: str = "auto",
        check_ood: bool = True,
    ) -> None:
        self.bundle_dir = resolve_bundle(bundle)
        self.meta: BundleMeta = read_meta(self.bundle_dir)
        #: The "not a chest X-ray" gate, when the bundle has one (see pneumo.serving.ood).
        self.ood_gate: OodGate | None = OodGate.load(self.bundle_dir, self.meta.ood) if self.meta.ood else None
        self.check_ood = check_ood
        if self.ood_gate is None and check_ood:
            log.warning(
                "The bundle %s has no OOD gate: images that are not chest X-rays are not refused.", self.bundle_dir
            )
        self.device = device
        self.limits = limits
        self._model: nn.Module | None = None
        self._model_lock = threading.Lock()
        self._onnx = select_onnx_runner(self.bundle_dir, backend, device=device)
        #: ``"int8"``, ``"onnx"`` (fp32) or ``"torch"``: the backend that answers.
        self.backend = "torch" if self._onnx is None else self._onnx.kind
        self._runner: Runner = self._onnx if self._onnx is not None else self._torch_runner()
        self._decode_pool: ThreadPoolExecutor | None = None

    @property
    def onnx_runner(self) -> OnnxRunner | None:
        """The ONNX Runtime session answering predictions (None on the torch backend); CAM reads its feature map."""
        return self._onnx

    @property
    def model(self) -> nn.Module:
        """The bundle's torch network on ``self.device`` (loaded on first use: Grad-CAM or the torch backend)."""
        with self._model_lock:
            if self._model is None:
                from pneumo.modeling.weights import load_model  # lazy: the ONNX path needs no torch

                self._model = load_model(self.bundle_dir, self.meta).to(self.device)
            return self._model

    def _torch_runner(self) -> Runner:
        from pneumo.modeling.torch_backend import TorchRunner  # lazy: imports torch

        return TorchRunner(self.model, self.device)

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
        """Read and validate one input (JPEG draft decoding at the model's input size)."""
        return read_image(source, self.limits, draft_size=self.meta.preprocess.input_size)

    def prepare(self, decoded: DecodedImage) -> np.ndarray:
        """A decoded image as the model's normalized float32 (3, S, S) input."""
        return preprocess(decoded.image, self.meta.preprocess)

    def forward(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Raw logits (N, C) and pooled backbone features (N, F) for a preprocessed batch (N, 3, S, S).

        The features feed the out-of-distribution gate; computing both in one pass costs nothing extra.
        """
        return self._runner(np.asarray(batch, dtype=np.float32))

    def logits(self, batch: np.ndarray) -> np.ndarray:
        """Raw logits (N, C) for a preprocessed batch (N, 3, S, S)."""
        return self.forward(batch)[0]

    def calibrated(self, logits: np.ndarray) -> np.ndarray:
        """Temperature-scaled softmax probabilities (N, C)."""
        return temperature_softmax(logits, self.meta.temperature)

    def pneumonia_probability(self, probs: np.ndarray) -> np.ndarray:
        """P(pneumonia) per row: the sum over the bundle's positive labels."""
        return positive_probability(probs, self.meta.positive_indices)

    def _answer(
        self, probs: np.ndarray, features: np.ndarray, decoded: DecodedImage | None, source: str | None
    ) -> Prediction:
        ood_score = None
        if self.ood_gate is not None:
            ood_score, refusal = self.ood_gate.check(features, decoded.image if decoded else None, source)
            if self.check_ood and refusal:
                raise NotAChestXrayError(refusal)
        p = float(self.pneumonia_probability(probs[None])[0])
        label = "PNEUMONIA" if p >= self.meta.threshold else "NORMAL"
        return Prediction(
            label=label,
            probability=p,
            threshold=self.meta.threshold,
            probabilities={name: float(v) for name, v in zip(self.meta.labels, probs)},
            source=source,
            format=decoded.format if decoded else None,
            metadata=dict(decoded.metadata) if decoded else {},
            ood_score=ood_score,
        )

    # --- the public entry points ---

    def predict(self, source: Source, name: str | None = None) -> Prediction:
        """Predict one file or upload.

        Raises:
            PneumoError: a typed error (invalid image, not a chest X-ray, ...) with a stable ``code``.
        """
        decoded = self.decode(source)
        logits, features = self.forward(self.prepare(decoded)[None])
        return self._answer(self.calibrated(logits)[0], features[0], decoded, name or _name_of(source))

    def predict_many(self, sources: Sequence[Source], batch_size: int = 16) -> list[Prediction | PneumoError]:
        """Predict many inputs in batches; one entry per input, in input order: a result or its error.

        Nothing is lost: a file that fails yields its :class:`PneumoError` in its place and the
        others still run. Decoding and preprocessing run in a small thread pool a few batches
        ahead of the model (Pillow and ONNX Runtime release the GIL), so the cores decode the next
        batch while the model runs on this one.
        """
        results: list[Prediction | PneumoError | None] = [None] * len(sources)
        pending: list[tuple[int, DecodedImage, np.ndarray]] = []

        def flush() -> None:
            if not pending:
                return
            logits, features = self.forward(np.stack([array for _, _, array in pending]))
            for (index, decoded, _), row, feats in zip(pending, self.calibrated(logits), features):
                try:
                    results[index] = self._answer(row, feats, decoded, _name_of(sources[index]))
                except PneumoError as err:
                    results[index] = err
            pending.clear()

        for index, prepared in enumerate(self._prepared(sources, lookahead=2 * batch_size)):
            if isinstance(prepared, PneumoError):
                results[index] = prepared
            else:
                pending.append((index, *prepared))
            if len(pending) >= batch_size:
                flush()
        flush()
        return [r for r in results if r is not None]

    def _decode_and_prepare(self, source: Source) -> tuple[DecodedImage, np.ndarray] | PneumoError:
        try:
            decoded = self.decode(source)
            return decoded, self.prepare(decoded)
        except PneumoError as err:
            return err

    def _prepared(
        self, sources: Sequence[Source], lookahead: int
    ) -> Iterator[tuple[DecodedImage, np.ndarray] | PneumoError]:
        """Decoded and preprocessed inputs in input order, at most ``lookahead`` in flight (bounded memory)."""
        if len(sources) <= 1:
            yield from map(self._decode_and_prepare, sources)
            return
        with self._model_lock:
            if self._decode_pool is None:
                self._decode_pool = ThreadPoolExecutor(
                    max_workers=min(4, os.cpu_count() or 1), thread_name_prefix="pneumo-decode"
                )
        queue: deque[Future[tuple[DecodedImage, np.ndarray] | PneumoError]] = deque()
        for source in sources:
            queue.append(self._decode_pool.submit(self._decode_and_prepare, source))
            if len(queue) >= lookahead:
                yield queue.popleft().result()
        while queue:
            yield queue.popleft().result()

    def predict_tensors(self, batch: np.ndarray) -> np.ndarray:
        """P(pneumonia) for an already preprocessed batch (used by evaluation)."""
        return self.pneumonia_probability(self.calibrated(self.logits(batch)))


def _name_of(source: Source) -> str | None:
    return str(source) if isinstance(source, str | Path) else None


def iter_image_files(paths: Iterable[str | Path]) -> list[Path]:
    """Expand files and folders (recursively, sorted) into the list of files to predict.

    Every entry inside a folder that is not itself a folder is included, whatever its extension
    or kind (regular file, broken symbolic link, FIFO, device), so that anything that is not an
    image gets an error row instead of being skipped silently; a subfolder that cannot be listed
    is included too, for its ``unreadable_file`` row. Hidden entries are ignored. Paths named
    explicitly are kept as given, even when they cannot be examined (a name too long): their
    row says why. Symbolic links to folders are followed, each real folder once.
    """
    files: list[Path] = []
    for entry in map(Path, paths):
        try:
            is_dir = entry.is_dir()
        except OSError:  # name too long, permission denied on a parent: read_bytes explains it in the row
            is_dir = False
        if not is_dir:
            files.append(entry)
            continue
        files.extend(_walk(entry))
    return files


def _walk(root: Path) -> list[Path]:
    """Every non-folder entry under ``root`` and every folder that cannot be listed, sorted; hidden ones skipped."""
    found: list[Path] = []
    seen: set[tuple[int, int]] = set()
    for folder, subfolders, names in os.walk(
        root, followlinks=True, onerror=lambda err: found.append(Path(err.filename))
    ):
        here = Path(folder)
        info = here.stat()
        if (info.st_dev, info.st_ino) in seen:  # a link loop, or a folder reached twice through links
            subfolders.clear()
            continue
        seen.add((info.st_dev, info.st_ino))
        subfolders[:] = [name for name in subfolders if not name.startswith(".")]
        found.extend(here / name for name in names if not name.startswith("."))
    return sorted(found)
