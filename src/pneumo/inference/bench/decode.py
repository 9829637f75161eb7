"""The decode options of ``pneumo bench``: JPEG draft decoding at each fraction of the needed size, timed side by side.

A JPEG decodes at 1/1, 1/2, 1/4 or 1/8 scale; the Predictor takes the coarsest scale that still gives
``fraction x input_size`` pixels on each side (:func:`pneumo.inference.predictor.draft_size_for`).
The fractions are timed interleaved, file by file, so a change in the machine's load hits them
alike; ``decode_cpu_ms_mean`` is the decoding thread's own CPU time, which other processes on a
shared machine disturb far less than the wall time. How much each fraction changes the answers is
measured on films by ``benchmarks/decode_draft_study.py`` (docs/performance.md).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pneumo.core.decode import read_image
from pneumo.core.preprocess import PreprocessConfig, preprocess
from pneumo.inference.predictor import draft_fraction, draft_size_for


def decode_options(
    files: Sequence[Path], config: PreprocessConfig, fractions: Sequence[float], runs: int = 3
) -> dict[str, Any]:
    """Decode and preprocess times (p50 wall, mean CPU) and decoded size per draft fraction, on ``files``."""
    blobs = [Path(f).read_bytes() for f in files]
    drafts = {fraction: draft_size_for(config.input_size, fraction) for fraction in fractions}
    wall: dict[float, list[float]] = {f: [] for f in fractions}
    cpu: dict[float, list[float]] = {f: [] for f in fractions}
    prep: dict[float, list[float]] = {f: [] for f in fractions}
    sides: dict[float, list[int]] = {f: [] for f in fractions}
    for blob in blobs[:2]:
        read_image(blob, draft_size=drafts[fractions[0]])  # warm-up
    for _ in range(runs):
        for blob in blobs:
            for fraction in fractions:
                t0, c0 = time.perf_counter(), time.thread_time()
                decoded = read_image(blob, draft_size=drafts[fraction])
                t1, c1 = time.perf_counter(), time.thread_time()
                preprocess(decoded.image, config)
                wall[fraction].append(t1 - t0)
                cpu[fraction].append(c1 - c0)
                prep[fraction].append(time.perf_counter() - t1)
                sides[fraction].append(min(decoded.image.size))
    return {
        f"{fraction:g}": {
            "draft_size": drafts[fraction],
            "default": fraction == draft_fraction(config),
            "decode_p50_ms": round(float(np.median(wall[fraction])) * 1e3, 3),
            "decode_cpu_ms_mean": round(float(np.mean(cpu[fraction])) * 1e3, 3),
            "preprocess_p50_ms": round(float(np.median(prep[fraction])) * 1e3, 3),
            "decoded_short_side_mean": round(float(np.mean(sides[fraction])), 1),
        }
        for fraction in fractions
    }
