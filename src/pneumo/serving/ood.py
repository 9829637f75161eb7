"""The "not a chest X-ray" gate: distance of an image's backbone features to the training X-rays.

A classifier trained on two classes of chest X-rays answers NORMAL or PNEUMONIA for *anything*,
a selfie included, often with high confidence. The gate looks at the pooled backbone features
that :meth:`pneumo.serving.inference.Predictor.forward` already computes (1280 numbers for
EfficientNet-Lite0) and asks how far they are from the features of the training X-rays.

The distance is the Mahalanobis distance under a probabilistic-PCA model of the training
features (Tipping & Bishop, 1999): the ``k`` leading principal directions keep their own
variances, every other direction shares one "noise" variance (the mean of the discarded
eigenvalues). Both parts matter: an image can move the features off the subspace the X-rays
span without moving them along its leading directions, which a distance on the leading
directions alone cannot see (tests/serving/test_ood.py builds such a case). Compared with a full
covariance (1280 x 1280 floats = 6.5 MB), the stored statistics are the mean, ``k`` directions
and ``k`` variances (~330 KB for ``k = 64``) in ``ood.safetensors`` next to the weights. The
score is the squared distance divided by the feature dimension, so a typical training X-ray
scores about 1.

The threshold is a high quantile (99.5th by default) of the scores of *validation* X-rays,
which the statistics never saw, so by construction about 0.5% of real X-rays are refused.
Images whose gray levels barely vary are refused as blank whatever their features: flat gray
pictures sit close to the X-rays in feature space.

Training calls :func:`fit_ood` on the features it already has;
:func:`pneumo.modeling.calibration.calibrate_bundle` does the same for an existing bundle, and
from the command line (see docs/reliability.md)::

    pneumo ood calibrate path/to/bundle --data ../shared/data/chest_xray_224
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageStat

from pneumo.core.errors import BundleError

log = logging.getLogger(__name__)

OOD_FILE = "ood.safetensors"
METHOD = "ppca-mahalanobis"
DEFAULT_QUANTILE = 0.995
DEFAULT_COMPONENTS = 64
#: Gray-level standard deviation under which an image is blank. The 5,216 training X-rays have
#: 20-87 (median 57); flat gray pictures otherwise sit close to the X-rays in feature space.
MIN_PIXEL_STD = 8.0


@dataclass
class OodGate:
    """Statistics of the training features and the acceptance threshold.

    Attributes:
        mean: mean training feature vector, shape (F,).
        components: the ``k`` leading principal directions, orthonormal rows, shape (k, F).
        variances: training variance along each of them, shape (k,).
        noise_variance: the variance assumed along every other direction.
        threshold: scores above it are refused.
        info: how the gate was fitted (sizes, quantile, validation refusal rate); kept in ``bundle.json``.
        min_pixel_std: images whose gray levels vary less than this are refused as blank.
    """

    mean: np.ndarray
    components: np.ndarray
    variances: np.ndarray
    noise_variance: float
    threshold: float
    info: dict[str, Any] = field(default_factory=dict)
    min_pixel_std: float = MIN_PIXEL_STD

    def set_threshold(self, scores: np.ndarray, quantile: float, sample: str) -> None:
        """Accept the ``quantile`` share of ``scores`` (real X-rays the statistics never saw), named ``sample``."""
        scores = np.asarray(scores, dtype=np.float64)
        self.threshold = float(np.quantile(scores, quantile, method="higher"))
        self.info.update(
            quantile=quantile,
            threshold_sample=sample,
            n_val=len(scores),
            val_refusal_rate=float(np.mean(scores > self.threshold)),
            val_score_median=float(np.median(scores)),
        )

    @property
    def feature_dim(self) -> int:
        return int(self.mean.shape[0])

    def score(self, features: np.ndarray) -> np.ndarray:
        """Squared PPCA-Mahalanobis distance / F for each row of ``features`` (N, F) or one vector (F,).

        About 1 for a typical training X-ray; larger is further from the X-rays.
        """
        x = np.atleast_2d(np.asarray(features, dtype=np.float64))
        if x.shape[1] != self.feature_dim:
            raise BundleError(
                f"The OOD gate was fitted on {self.feature_dim}-d features but got {x.shape[1]}-d ones; "
                "recalibrate it for this model (pneumo ood calibrate BUNDLE --data DATA)."
            )
        centred = x - self.mean
        projected = centred @ self.components.T
        # The off-subspace part explicitly (not |x|^2 - |z|^2, which cancels badly with float32 statistics).
        residual = centred - projected @ self.components
        distance = (projected**2 / self.variances).sum(axis=1) + (residual**2).sum(axis=1) / self.noise_variance
        return np.asarray(distance / self.feature_dim)

    def accepts(self, features: np.ndarray) -> np.ndarray:
        """Boolean per row: True where the image looks like the training X-rays."""
        return self.score(features) <= self.threshold

    def check(
        self, features: np.ndarray, image: Image.Image | None = None, name: str | None = None
    ) -> tuple[float, str | None]:
        """Score one image; returns ``(score, reason)`` where ``reason`` says why it is refused, or is None.

        Args:
            features: its pooled features (F,).
            image: the decoded grayscale image, for the blank-image check.
            name: file name for the message.
        """
        score = float(self.score(features)[0])
        what = name or "The image"
        if image is not None:
            spread = float(ImageStat.Stat(image).stddev[0])
            if spread < self.min_pixel_std:
                return score, (
                    f"{what} is blank (its gray levels vary by {spread:.1f}, under {self.min_pixel_std:g}); "
                    "it is not a chest X-ray. Upload a frontal chest radiograph."
                )
        if score > self.threshold:
            share = 100 * (1 - float(self.info.get("quantile", DEFAULT_QUANTILE)))
            return score, (
                f"{what} does not look like a frontal chest X-ray: its distance to the training X-rays is "
                f"{score:.2f}, over the threshold {self.threshold:.2f} (which {share:g}% of validation X-rays "
                "exceed). Upload a frontal chest radiograph."
            )
        return score, None

    def save(self, bundle_dir: str | Path) -> dict[str, Any]:
        """Write ``ood.safetensors`` into ``bundle_dir``; returns the dict to store as ``meta.ood``."""
        from safetensors.numpy import save_file

        # C order matters: safetensors writes a Fortran-ordered array's buffer as if it were C-ordered.
        arrays = {
            name: np.ascontiguousarray(value, dtype=np.float32)
            for name, value in (("mean", self.mean), ("components", self.components), ("variances", self.variances))
        }
        save_file(arrays, str(Path(bundle_dir) / OOD_FILE), metadata={"method": METHOD})
        return {
            "method": METHOD,
            "file": OOD_FILE,
            "score": "squared Mahalanobis distance of the pooled features (PPCA covariance) / feature dim",
            "threshold": float(self.threshold),
            "noise_variance": float(self.noise_variance),
            "components": int(self.components.shape[0]),
            "feature_dim": self.feature_dim,
            "min_pixel_std": self.min_pixel_std,
            **self.info,
        }

    @classmethod
    def load(cls, bundle_dir: str | Path, meta_ood: dict[str, Any]) -> OodGate:
        """Read a gate written by :meth:`save` (``meta_ood`` is the bundle's ``ood`` entry)."""
        from safetensors.numpy import load_file

        if meta_ood.get("method") != METHOD:
            raise BundleError(f"Unknown OOD method {meta_ood.get('method')!r} in bundle.json; expected {METHOD!r}.")
        path = Path(bundle_dir) / str(meta_ood.get("file", OOD_FILE))
        if not path.is_file():
            raise BundleError(
                f"bundle.json has an OOD gate but {path} is missing; copy the whole bundle folder or recalibrate "
                "(pneumo ood calibrate BUNDLE --data DATA)."
            )
        try:
            arrays = load_file(str(path))
            mean, components, variances = arrays["mean"], arrays["components"], arrays["variances"]
            threshold, noise = float(meta_ood["threshold"]), float(meta_ood["noise_variance"])
        except (KeyError, ValueError, OSError) as err:
            raise BundleError(f"The OOD gate in {path} is incomplete or malformed: {err}") from err
        k, dim = components.shape
        if mean.shape != (dim,) or variances.shape != (k,) or noise <= 0 or (variances <= 0).any():
            raise BundleError(f"The OOD gate in {path} is inconsistent (shapes {mean.shape}, {components.shape}).")
        skip = {"method", "file", "score", "threshold", "noise_variance", "components", "feature_dim", "min_pixel_std"}
        info = {key: value for key, value in meta_ood.items() if key not in skip}
        return cls(
            mean.astype(np.float64),
            components.astype(np.float64),
            variances.astype(np.float64),
            noise,
            threshold,
            info,
            float(meta_ood.get("min_pixel_std", MIN_PIXEL_STD)),
        )


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
