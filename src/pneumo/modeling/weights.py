"""A bundle's weights in and out of a torch network (the torch half of :mod:`pneumo.core.bundle`)."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from pneumo.core.bundle import WEIGHTS_FILE, BundleMeta, bundle_file, read_meta, resolve_bundle, write_meta
from pneumo.core.environment import software_versions
from pneumo.core.errors import BundleError
from pneumo.modeling.models import create_model

log = logging.getLogger(__name__)


def save_weights(out_dir: str | Path, model: nn.Module, meta: BundleMeta) -> Path:
    """Write ``model``'s weights into ``out_dir`` (created if needed) and stamp ``meta`` (creation time, versions).

    ``bundle.json`` is left to the caller, which may still be adding to ``meta`` (the end of training).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not meta.created:
        meta.created = datetime.now(UTC).isoformat(timespec="seconds")
    meta.versions = {**software_versions(), **meta.versions}
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / WEIGHTS_FILE), metadata={"arch": meta.arch, "format": "pneumo-bundle"})
    return out


def save_bundle(out_dir: str | Path, model: nn.Module, meta: BundleMeta) -> Path:
    """Write ``model``'s weights and ``meta`` into ``out_dir`` (created if needed); returns the folder."""
    out = save_weights(out_dir, model, meta)
    write_meta(out, meta)
    log.info("Saved model bundle to %s", out)
    return out


def load_model(folder: Path, meta: BundleMeta) -> nn.Module:
    """The eval-mode network of the bundle in ``folder`` described by ``meta``."""
    weights = bundle_file(folder, WEIGHTS_FILE)
    model = create_model(meta.arch, num_classes=len(meta.labels), pretrained=False)
    try:
        model.load_state_dict(load_file(str(weights)))
    except (RuntimeError, SafetensorError) as err:
        raise BundleError(f"The weights in {weights} do not match {meta.arch} or are damaged: {err}") from err
    return model.eval()


def load_bundle(bundle_dir: str | Path | None = None) -> tuple[BundleMeta, nn.Module]:
    """Load a bundle (the shipped default when ``bundle_dir`` is None) as metadata and an eval-mode model."""
    folder = resolve_bundle(bundle_dir)
    meta = read_meta(folder)
    return meta, load_model(folder, meta)
