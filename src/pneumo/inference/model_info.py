"""What users and integrators may see about the model: shared by the API (``GET /v1/model``) and the app."""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from pneumo.core.redact import strip_paths

if TYPE_CHECKING:
    from PIL import Image

#: Shown in the app's sidebar and returned by ``GET /v1/model``.
INTENDED_USE = (
    "Decision support for frontal (anterior-posterior) chest X-rays of children aged 1 to 5, like the training data "
    "(Guangzhou Women and Children's Medical Center). It is not a diagnosis: a qualified clinician reads "
    "every image and decides. Not validated for adults, lateral views, CT or other body parts."
)

#: Keys of the bundle metadata that are safe and useful to show (no server paths, no large arrays).
_PUBLIC_KEYS = (
    "name", "version", "arch", "timm_name", "labels", "positive_labels", "threshold", "threshold_rule",
    "temperature", "preprocess", "metrics", "training", "versions", "created", "backend",
)  # fmt: skip


def public_model_info(description: Mapping[str, Any]) -> dict[str, Any]:
    """``Predictor.describe()`` reduced to what a user or an integrator may see.

    The OOD statistics are summarized (their mean vectors and covariances are large and say
    nothing to a reader), the server's bundle path is dropped and every other server path is
    reduced to its name (:func:`pneumo.core.redact.strip_paths`).
    """
    info = {key: description[key] for key in _PUBLIC_KEYS if key in description}
    ood = description.get("ood")
    summary: dict[str, Any] = {"enabled": bool(ood)}
    if isinstance(ood, Mapping):
        summary.update({k: v for k, v in ood.items() if isinstance(v, str | int | float | bool)})
    info["ood"] = summary
    info["intended_use"] = INTENDED_USE
    return strip_paths(info)  # bundles written before paths were stripped at save time still carry them


def png_bytes(image: Image.Image) -> bytes:
    """``image`` encoded as PNG."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
