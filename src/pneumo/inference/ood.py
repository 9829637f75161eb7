"""The "not a chest X-ray" gate: distance of an image's backbone features to the training X-rays.

A classifier trained on two classes of chest X-rays answers NORMAL or PNEUMONIA for *anything*,
a selfie included, often with high confidence. The gate looks at the pooled backbone features
that :meth:`pneumo.inference.predictor.Predictor.forward` already computes (1280 numbers for
EfficientNet-Lite0) and asks how far they are from the features of the training X-rays.

The distance is the Mahalanobis distance under a probabilistic-PCA model of the training
features (Tipping & Bishop, 1999): the ``k`` leading principal directions keep their own
variances, every other direction shares one "noise" variance (the mean of the discarded
eigenvalues). Both parts matter: an image can move the features off the subspace the X-rays
span without moving them along its leading directions, which a distance on the leading
directions alone cannot see (tests/inference/test_ood.py builds such a case). Compared with a full
covariance (1280 x 1280 floats = 6.5 MB), the stored statistics are the mean, ``k`` directions
and ``k`` variances (~330 KB for ``k = 64``) in ``ood.safetensors`` next to the weights. The
score is the squared distance divided by the feature dimension, so a typical training X-ray
scores about 1.

The threshold is a high quantile (99.5th by default) of the scores of *validation* X-rays,
which the statistics never saw, so by construction about 0.5% of real X-rays are refused.
Images whose gray levels barely vary are refused as blank whatever their features: flat gray
pictures sit close to the X-rays in feature space.

Fitting the statistics is training work (:func:`pneumo.modeling.ood_fit.fit_ood`, scikit-learn's
PCA); this module only scores with them. Training fits the gate on the features it already has;
:func:`pneumo.modeling.ood_fit.refit_bundle_gate` does the same for an existing bundle, and from the
command line (see docs/reliability.md)::

    pneumo ood fit path/to/bundle --data ../shared/data/chest_xray_224
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageStat

from pneumo.core.bundle import OOD_FILE, OodEntry, bundle_file
from pneumo.core.errors import BundleError

log = logging.getLogger(__name__)

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
                "refit it for this model (pneumo ood fit BUNDLE --data DATA)."
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

    def save(self, bundle: str | Path) -> OodEntry:
        """Write ``ood.safetensors`` into ``bundle``; returns the entry to store as ``meta.ood``."""
        from safetensors.numpy import save_file

        # C order matters: safetensors writes a Fortran-ordered array's buffer as if it were C-ordered.
        arrays = {
            name: np.ascontiguousarray(value, dtype=np.float32)
            for name, value in (("mean", self.mean), ("components", self.components), ("variances", self.variances))
        }
        save_file(arrays, str(Path(bundle) / OOD_FILE), metadata={"method": METHOD})
        return OodEntry(
            score="squared Mahalanobis distance of the pooled features (PPCA covariance) / feature dim",
            threshold=float(self.threshold),
            noise_variance=float(self.noise_variance),
            components=int(self.components.shape[0]),
            feature_dim=self.feature_dim,
            min_pixel_std=self.min_pixel_std,
            **self.info,
        )

    @classmethod
    def load(cls, bundle: str | Path, entry: OodEntry) -> OodGate:
        """Read a gate written by :meth:`save` (``entry`` is the bundle's ``ood`` section).

        Raises:
            BundleError: the statistics file is missing, not a regular file, unreadable or inconsistent with ``entry``.
        """
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        path = bundle_file(bundle, entry.file)
        try:
            arrays = load_file(str(path))
            mean, components, variances = arrays["mean"], arrays["components"], arrays["variances"]
        except (KeyError, ValueError, OSError, SafetensorError) as err:
            raise BundleError(
                f"The OOD gate in {path} is incomplete or malformed ({type(err).__name__}); copy the whole bundle "
                "folder or refit it (pneumo ood fit BUNDLE --data DATA)."
            ) from err
        k, dim = components.shape if components.ndim == 2 else (0, 0)
        if (
            (k, dim) != (entry.components, entry.feature_dim)
            or mean.shape != (dim,)
            or variances.shape != (k,)
            or not (np.isfinite(mean).all() and np.isfinite(components).all() and (variances > 0).all())
        ):
            raise BundleError(
                f"The OOD gate in {path} does not match bundle.json (shapes {mean.shape}, {components.shape}, "
                f"{variances.shape}; expected {entry.components} x {entry.feature_dim}) or holds invalid values."
            )
        known = set(OodEntry.model_fields) - {"n_train", "n_val", "train_score_median", "val_score_median",
                                              "val_refusal_rate", "quantile", "threshold_sample"}  # fmt: skip
        info = {key: value for key, value in entry.model_dump().items() if key not in known and value is not None}
        return cls(
            mean.astype(np.float64),
            components.astype(np.float64),
            variances.astype(np.float64),
            entry.noise_variance,
            entry.threshold,
            info,
            entry.min_pixel_std,
        )
