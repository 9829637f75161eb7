"""What ``pneumo bench`` runs, and how those settings travel to a benchmark process (JSON)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass
class BenchSettings:
    """What ``pneumo bench`` runs.

    Attributes:
        bundle: the model bundle; None is the default bundle.
        images: folder of full-resolution images; None synthesizes ``n_synthetic`` JPEGs.
        max_images: at most this many files are taken from ``images``.
        n_synthetic: number of synthetic JPEGs (1500-2500 px, grayscale, quality 92).
        runs: passes over the images for the latency percentiles.
        batch_size: batch of the throughput measurements.
        batches: timed batches per throughput figure (after one warm-up batch).
        gradcam: also time one Grad-CAM map per image.
        backends: the backends to compare.
        preload: modules each benchmark process imports first: those that register a backend
            (``pneumo.modeling.torch_backend`` for ``torch``; the inference package never imports it).
        isolate: run each backend in a fresh process (clean peak RSS, no competing thread pools).
        torch_threads: intra-op threads of the torch backend; None keeps torch's default (one per core).
        startup: also measure cold start and serving memory (:mod:`pneumo.inference.bench.startup`;
            on by default in ``pneumo bench``, off here so library callers opt in to ~1 min of extra work).
        serve_predictions: uploads sent to the server before its RSS is read.
        draft_fractions: JPEG draft fractions to time decoding at (:mod:`pneumo.inference.bench.decode`);
            empty: none.
    """

    bundle: Path | None = None
    images: Path | None = None
    max_images: int = 32
    n_synthetic: int = 16
    runs: int = 3
    batch_size: int = 32
    batches: int = 3
    gradcam: bool = False
    backends: tuple[str, ...] = ("int8", "fp32")
    draft_fractions: tuple[float, ...] = ()
    preload: tuple[str, ...] = ()
    isolate: bool = True
    torch_threads: int | None = None
    startup: bool = False
    serve_predictions: int = 1000


def settings_json(settings: BenchSettings) -> dict[str, Any]:
    """``settings`` as JSON (what the result records, and what a benchmark process is handed)."""
    data = asdict(settings)
    for key in ("bundle", "images"):
        data[key] = str(data[key]) if data[key] is not None else None
    data["backends"] = list(settings.backends)
    data["preload"] = list(settings.preload)
    data["draft_fractions"] = list(settings.draft_fractions)
    return data


def settings_from_json(raw: dict[str, Any]) -> BenchSettings:
    """The inverse of :func:`settings_json`."""
    return BenchSettings(
        **{
            **raw,
            "bundle": Path(raw["bundle"]) if raw["bundle"] else None,
            "images": Path(raw["images"]) if raw["images"] else None,
            "backends": tuple(raw["backends"]),
            "preload": tuple(raw.get("preload", ())),
            "draft_fractions": tuple(raw.get("draft_fractions", ())),
        }
    )
