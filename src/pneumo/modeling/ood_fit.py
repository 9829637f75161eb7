"""Fitting the not-a-chest-X-ray gate: training work (scikit-learn's PCA), apart from the scoring in inference.

:func:`fit_ood` fits the statistics on training features and sets the threshold on validation
features; the end of training calls it with the features it already has. :func:`refit_gate`
fits the gate of an existing bundle through the bundle's own inference path
(``pneumo ood fit BUNDLE --data DATA``). The gate itself, and how it scores, is
:class:`pneumo.inference.ood.OodGate`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pneumo.core.bundle import OodEntry, read_meta, write_meta
from pneumo.core.decode import read_image
from pneumo.core.errors import PneumoError
from pneumo.evaluation import robustness
from pneumo.inference.files import Source
from pneumo.inference.ood import DEFAULT_COMPONENTS, DEFAULT_QUANTILE, OodGate
from pneumo.inference.predictor import Predictor

log = logging.getLogger(__name__)

#: What the threshold of a gate fitted by training accepts (see :func:`threshold_on_shifts`).
SHIFTED_SAMPLE = "validation X-rays and their robustness shifts"


def fit_ood(
    features_train: np.ndarray,
    features_val: np.ndarray,
    quantile: float = DEFAULT_QUANTILE,
    n_components: int = DEFAULT_COMPONENTS,
) -> OodGate:
    """Fit the gate on training-image features; set its threshold on validation-image features.

    Args:
        features_train: pooled features of the training X-rays (N, F); the statistics.
        features_val: pooled features of validation X-rays (M, F), never seen by the statistics;
            the threshold is their ``quantile``-th score, so about ``1 - quantile`` of them are refused.
        quantile: e.g. 0.995 for about 0.5% false refusals.
        n_components: principal directions kept (capped below the feature dimension and N).
    """
    from sklearn.decomposition import PCA

    train = np.asarray(features_train, dtype=np.float64)
    val = np.asarray(features_val, dtype=np.float64)
    if train.ndim != 2 or val.ndim != 2 or train.shape[1] != val.shape[1]:
        raise ValueError(f"features must be (N, F) arrays of one width; got {train.shape} and {val.shape}.")
    if len(train) < 3 or len(val) < 1:
        raise ValueError(f"fit_ood needs at least 3 training and 1 validation vectors; got {len(train)}, {len(val)}.")
    if not 0.5 <= quantile < 1.0:
        raise ValueError(f"quantile must be in [0.5, 1); got {quantile}.")
    k = max(1, min(n_components, train.shape[1] - 1, len(train) - 2))
    pca = PCA(n_components=k, svd_solver="full").fit(train)
    total = float(pca.explained_variance_.sum() + pca.noise_variance_ * (train.shape[1] - k))
    floor = 1e-6 * total / train.shape[1]  # rank-deficient features: keep the distance finite
    gate = OodGate(
        mean=pca.mean_,
        components=pca.components_,
        variances=np.maximum(pca.explained_variance_, floor),
        noise_variance=max(float(pca.noise_variance_), floor),
        threshold=0.0,
    )
    gate.info = {"n_train": len(train), "train_score_median": float(np.median(gate.score(train)))}
    gate.set_threshold(gate.score(val), quantile, "validation X-rays")
    return gate


def threshold_on_shifts(gate: OodGate, scores: Sequence[np.ndarray]) -> None:
    """Set the gate's threshold on the validation X-rays *and* their robustness shifts.

    A threshold on the clean validation films alone refused real films of the same hospital
    uploaded at full resolution (2 of the 14 samples for the round-4 model: draft decoding and
    resizing move the features off the dataset's 224 px copies). Reframed, blurred, noisy or
    re-compressed X-rays are still X-rays, so they belong in the sample the gate must accept.
    """
    gate.set_threshold(np.concatenate(scores), float(gate.info.get("quantile", DEFAULT_QUANTILE)), SHIFTED_SAMPLE)


def extract_features(
    predictor: Predictor, sources: Sequence[Source], batch_size: int = 32
) -> tuple[np.ndarray, list[int]]:
    """Pooled features of ``sources`` through ``predictor``'s own decode/preprocess/forward path.

    Returns:
        ``(features, kept)``: one row per input that decoded, and the indices of those inputs
        (inputs that fail to decode are logged and skipped: the gate is fitted on what decodes).
    """
    rows: list[np.ndarray] = []
    kept: list[int] = []
    batch: list[np.ndarray] = []
    for index, source in enumerate(sources):
        try:
            batch.append(predictor.prepare(predictor.decode(source)))
            kept.append(index)
        except PneumoError as err:
            log.warning("Skipping %s: %s", source, err.message)
        if len(batch) == batch_size or (index == len(sources) - 1 and batch):
            rows.append(predictor.forward(np.stack(batch))[1])
            batch = []
            log.info("Features: %d / %d images", index + 1, len(sources))
    if not rows:
        raise ValueError("None of the inputs could be decoded; there is nothing to fit the OOD gate on.")
    return np.concatenate(rows), kept


def refit_gate(
    bundle: str | Path,
    train_files: Sequence[Source],
    val_files: Sequence[Source],
    *,
    quantile: float = DEFAULT_QUANTILE,
    n_components: int = DEFAULT_COMPONENTS,
    batch_size: int = 32,
    shifts: bool = True,
) -> OodEntry:
    """Fit the gate with ``bundle``'s own model and write it into the bundle (ood.safetensors + bundle.json).

    Use the bundle's training images for ``train_files`` and its validation images (other
    patients) for ``val_files``. With ``shifts`` the threshold accepts ``quantile`` of the
    validation images under the robustness validation's shifts too, as training does.
    Returns the new ``meta.ood`` entry.
    """
    predictor = Predictor(bundle, check_ood=False)
    features_train, _ = extract_features(predictor, train_files, batch_size)
    features_val, _ = extract_features(predictor, val_files, batch_size)
    gate = fit_ood(features_train, features_val, quantile=quantile, n_components=n_components)
    if shifts:  # the threshold as training sets it
        size = predictor.preprocess_config.input_size  # keyed by file name, as training keys the shifts' seeds
        images = [(Path(f).name if isinstance(f, str | Path) else str(i), read_image(f, draft_size=size).image)
                  for i, f in enumerate(val_files)]  # fmt: skip
        scores: list[np.ndarray] = []
        robustness.shifted_probabilities(robustness.predictor_prob_fn(predictor, gate, scores), images)
        threshold_on_shifts(gate, scores)
    meta = read_meta(predictor.bundle_dir)
    meta.ood = gate.save(predictor.bundle_dir)
    write_meta(predictor.bundle_dir, meta)
    log.info(
        "OOD gate written to %s: threshold %.3f refuses %.2f%% of %d validation X-rays.",
        predictor.bundle_dir,
        gate.threshold,
        100 * gate.info["val_refusal_rate"],
        len(features_val),
    )
    return meta.ood
