"""How much JPEG draft decoding at reduced scale changes the model's answers, and what it saves (issue 23).

A JPEG decodes at 1/1, 1/2, 1/4 or 1/8 scale (DCT scaling, Pillow's ``draft``). The Predictor asks
for at least ``fraction x input_size`` pixels on each side (``pneumo.inference.predictor.draft_size_for``):
at 1.0 (the default) the film is never decoded below the model's input size; below 1.0 a coarser
scale may be taken and the resize then enlarges one or both sides. This script measures, for each
fraction, against the default path (1.0) with the INT8 check's rule
(``pneumo.modeling.quantize.compare_probabilities``: decision agreement at the bundle's threshold >= 99.5%,
ROC AUC within 0.002), and against the dataset's own 224 px copy of each film:

- ``fullres``: the 14 real full-resolution films of ``DATA/fullres_samples`` (1000-1800 px);
- ``validation_reencoded``: the bundle's validation split of ``DATA/chest_xray_224`` (its patient split),
  each 224 px film enlarged (bicubic) to a seeded full-resolution size (1000-2400 px wide, aspect
  0.70-0.95) and re-encoded as JPEG quality 92. What it shows: the decision change caused by the
  decode/resize path alone (DCT scaling, then resampling to the input size) on 783 films with the
  model's real inputs and a realistic film size. What it does not show: real detail finer than the
  224 px copies (an enlarged copy has none, so a coarse scale loses less here than on a real film)
  and the grain of a real detector; the 14 real films cover that, too few to bound a rate.

Also recorded: the decode CPU time (thread time, robust to other processes) and decoded size per fraction.

Usage::

    PYTHONPATH=src python benchmarks/decode_draft_study.py --data ../shared/data \\
        --out benchmarks/results/decode_draft_study.json
"""

from __future__ import annotations

import argparse
import io
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pneumo.core.dataset import train_val_samples
from pneumo.core.decode import read_image
from pneumo.inference import Predictor
from pneumo.inference.bench.floor import machine_info
from pneumo.inference.predictor import draft_size_for
from pneumo.modeling.quantize import compare_probabilities


def _reencode(path: Path, rng: np.random.Generator) -> bytes:
    width = int(rng.integers(1000, 2401))
    height = int(width * rng.uniform(0.70, 0.95))
    film = Image.open(path).convert("L").resize((width, height), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    film.save(buffer, "JPEG", quality=92)
    return buffer.getvalue()


def _probabilities(predictor: Predictor, blobs: list[bytes], draft: int | None) -> tuple[np.ndarray, dict[str, float]]:
    arrays, cpu, sides = [], [], []
    for blob in blobs:
        start = time.thread_time()
        decoded = read_image(blob, predictor.limits, draft_size=draft)
        cpu.append(time.thread_time() - start)
        sides.append(min(decoded.image.size))
        arrays.append(predictor.prepare(decoded))
    batch = np.stack(arrays)
    probs = np.concatenate([predictor.predict_tensors(batch[i : i + 32]) for i in range(0, len(batch), 32)])
    return probs, {
        "decode_cpu_ms_mean": round(float(np.mean(cpu)) * 1e3, 3),
        "decoded_short_side_mean": float(np.mean(sides)),
    }


def study(
    predictor: Predictor, blobs: list[bytes], copies: list[Path], labels: np.ndarray, fractions: list[float]
) -> dict[str, Any]:
    size = predictor.meta.preprocess.input_size
    copy_probs, _ = _probabilities(predictor, [p.read_bytes() for p in copies], None)
    reference, _ = _probabilities(predictor, blobs, draft_size_for(size, 1.0))
    out: dict[str, Any] = {"n_images": len(blobs)}
    for fraction in fractions:
        probs, timing = _probabilities(predictor, blobs, draft_size_for(size, fraction))
        out[f"fraction_{fraction:g}"] = {
            "draft_size": draft_size_for(size, fraction),
            **timing,
            "vs_default_path": compare_probabilities(reference, probs, labels, predictor.meta),
            "vs_224px_copy": compare_probabilities(copy_probs, probs, labels, predictor.meta),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="folder holding chest_xray_224/ and fullres_samples/")
    parser.add_argument("--model", type=Path, default=None, help="bundle (default: the shipped one)")
    parser.add_argument("--backend", default="fp32", help="backend that scores the films (default fp32: no INT8 noise)")
    parser.add_argument("--fractions", default="1,0.75,0.5", help="draft fractions to compare")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/decode_draft_study.json"))
    args = parser.parse_args()
    fractions = [float(f) for f in args.fractions.split(",")]
    predictor = Predictor(args.model, backend=args.backend, check_ood=False)
    meta = predictor.meta
    result: dict[str, Any] = {"backend": predictor.backend, "input_size": meta.preprocess.input_size}

    films = sorted((args.data / "fullres_samples").glob("*/*.jpeg"))
    copies = [args.data / "chest_xray_224" / "train" / f.parent.name / f.name for f in films]
    labels = np.array([meta.labels.index(f.parent.name) for f in films])
    result["fullres"] = study(predictor, [f.read_bytes() for f in films], copies, labels, fractions)

    config = meta.training.config
    _, val, how = train_val_samples(
        args.data / "chest_xray_224", config.get("label_mode", "binary"), config.get("val_fraction", 0.15),
        config.get("seed", 0),
    )  # fmt: skip
    rng = np.random.default_rng(0)
    blobs = [_reencode(s.path, rng) for s in val]
    labels = np.array([s.label for s in val])
    result["validation_reencoded"] = {"split": how, **study(predictor, blobs, [s.path for s in val], labels, fractions)}
    result["machine"] = machine_info()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for name in ("fullres", "validation_reencoded"):
        for fraction in fractions:
            row = result[name][f"fraction_{fraction:g}"]
            print(
                f"{name} fraction {fraction:g}: agreement with the default path "
                f"{row['vs_default_path']['decision_agreement']:.4f}, with the 224 px copy "
                f"{row['vs_224px_copy']['decision_agreement']:.4f}, "
                f"max |dp| {row['vs_default_path']['max_abs_probability_diff']}, "
                f"decode CPU {row['decode_cpu_ms_mean']} ms, short side {row['decoded_short_side_mean']:.0f} px"
            )


if __name__ == "__main__":
    main()
