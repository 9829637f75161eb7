"""The one inference path: file or bytes -> decode -> preprocess -> model -> calibrated probability.

The CLI, the Streamlit app and the API all call :class:`Predictor`; none of them decodes,
resizes or normalizes an image on its own. Everything the path needs (input size, mean/std,
labels, temperature, threshold) comes from the model bundle.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pneumo.bundle import BundleMeta, load_bundle, resolve_bundle
from pneumo.errors import NotAChestXrayError, PneumoError
from pneumo.io import DEFAULT_LIMITS, DecodedImage, Limits, read_image
from pneumo.ood import OodGate
from pneumo.preprocess import PreprocessConfig, preprocess

log = logging.getLogger(__name__)

Source = str | Path | bytes


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
        limits: input limits applied by :func:`pneumo.io.read_image`.
        device: torch device for the torch backend.
        backend: ``"auto"`` (ONNX Runtime when the bundle has, or can get, an ONNX export and
            onnxruntime imports; else PyTorch), ``"torch"`` or ``"onnx"`` (raises if impossible).
            See :func:`pneumo.export.select_onnx_runner`. ``self.backend`` says which one runs;
            ``self.model`` (torch) stays loaded either way, for Grad-CAM.
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
        self.meta: BundleMeta
        self.meta, self.model = load_bundle(self.bundle_dir)
        #: The "not a chest X-ray" gate, when the bundle has one (see pneumo.ood).
        self.ood_gate: OodGate | None = OodGate.load(self.bundle_dir, self.meta.ood) if self.meta.ood else None
        self.check_ood = check_ood
        if self.ood_gate is None and check_ood:
            log.warning(
                "The bundle %s has no OOD gate: images that are not chest X-rays are not refused.", self.bundle_dir
            )
        self.device = torch.device(device)
        self.model.to(self.device)
        self.limits = limits
        from pneumo.export import select_onnx_runner  # lazy: onnx/onnxruntime load only when used

        self._onnx = select_onnx_runner(self.bundle_dir, backend, device=device)
        self.backend = "torch" if self._onnx is None else "onnx"

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

    def prepare(self, decoded: DecodedImage) -> torch.Tensor:
        """A decoded image as the model's normalized (3, S, S) input."""
        return preprocess(decoded.image, self.meta.preprocess)

    @torch.inference_mode()
    def forward(self, batch: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Raw logits (N, C) and pooled backbone features (N, F) for a preprocessed batch (N, 3, S, S).

        The features feed the out-of-distribution gate; computing both in one pass costs nothing extra.
        """
        if self._onnx is not None:
            return self._onnx(batch.detach().cpu().numpy())
        model: Any = self.model  # a timm model: forward_features / forward_head / get_classifier
        features = model.forward_head(model.forward_features(batch.to(self.device)), pre_logits=True)
        logits = model.get_classifier()(features)
        return logits.float().cpu().numpy(), features.float().cpu().numpy()

    def logits(self, batch: torch.Tensor) -> np.ndarray:
        """Raw logits (N, C) for a preprocessed batch (N, 3, S, S)."""
        return self.forward(batch)[0]

    def calibrated(self, logits: np.ndarray) -> np.ndarray:
        """Temperature-scaled softmax probabilities (N, C)."""
        scaled = logits / self.meta.temperature
        scaled = scaled - scaled.max(axis=1, keepdims=True)
        exp = np.exp(scaled)
        return exp / exp.sum(axis=1, keepdims=True)

    def pneumonia_probability(self, probs: np.ndarray) -> np.ndarray:
        """P(pneumonia) per row: the sum over the bundle's positive labels."""
        return probs[:, self.meta.positive_indices].sum(axis=1)

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
        others still run.
        """
        results: list[Prediction | PneumoError | None] = [None] * len(sources)
        pending: list[tuple[int, DecodedImage, torch.Tensor]] = []

        def flush() -> None:
            if not pending:
                return
            logits, features = self.forward(torch.stack([tensor for _, _, tensor in pending]))
            for (index, decoded, _), row, feats in zip(pending, self.calibrated(logits), features):
                try:
                    results[index] = self._answer(row, feats, decoded, _name_of(sources[index]))
                except PneumoError as err:
                    results[index] = err
            pending.clear()

        for index, source in enumerate(sources):
            try:
                decoded = self.decode(source)
                pending.append((index, decoded, self.prepare(decoded)))
            except PneumoError as err:
                results[index] = err
            if len(pending) >= batch_size:
                flush()
        flush()
        return [r for r in results if r is not None]

    def predict_tensors(self, batch: torch.Tensor) -> np.ndarray:
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
