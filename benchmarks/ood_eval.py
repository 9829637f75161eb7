"""Measure the "not a chest X-ray" gate: false refusals of real X-rays, acceptance of non-X-rays.

    python benchmarks/ood_eval.py --data ../shared/data/chest_xray_224 [--bundle BUNDLE] [--compare]

What it does, with the bundle's own model (default: the bundle shipped in the package):

1. splits ``--data`` by patient into train / validation with :func:`pneumo.modeling.data.train_val_samples`
   (the split training uses, same defaults);
2. computes pooled backbone features of every image (cached under ``--cache``, keyed by the
   weights' hash, so reruns take seconds);
3. fits the gate (:func:`pneumo.modeling.ood_fit.fit_ood`) on the train features, threshold on validation; a
   decision counts the feature distance *and* the blank-image check (gray-level std under
   ``pneumo.inference.ood.MIN_PIXEL_STD``), as :meth:`pneumo.inference.ood.OodGate.check` does in the Predictor;
4. **false refusals**: fraction of validation X-rays refused. The in-sample figure is
   ~``1 - quantile`` by construction, so the honest figure is 2-fold by patient: threshold on one
   half of the validation patients, count refusals on the other half, and swap;
5. **acceptance of non-X-rays**: fraction of the set built by ``ood_nonxray.build_nonxray_set``
   (photos, faces, documents, screenshots, noise, gradients, other modalities) that the gate
   accepts, per category; images already refused by ``pneumo.core.decode`` count as refused (and are
   listed). X-ray look-alikes (a photo of an X-ray on a screen, inverted, rotated) are reported
   apart, as is acceptance of the 14 full-resolution originals in ``fullres_samples``;
6. ``--compare``: the same figures for other gate variants (number of components, leading
   directions only, a full Ledoit-Wolf covariance), which is how the default was chosen.

Writes ``--out`` (JSON) and prints a table.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ood_nonxray import build_nonxray_set, hard_cases

from pneumo.core.dataset import Sample, train_val_samples
from pneumo.core.errors import PneumoError
from pneumo.inference.ood import DEFAULT_COMPONENTS, DEFAULT_QUANTILE, MIN_PIXEL_STD
from pneumo.inference.predictor import Predictor
from pneumo.modeling.ood_fit import extract_features, fit_ood

log = logging.getLogger("ood_eval")
REPO = Path(__file__).resolve().parents[1]


def _weights_key(predictor: Predictor) -> str:
    digest = hashlib.sha256((predictor.bundle_dir / "weights.safetensors").read_bytes()).hexdigest()
    return digest[:16]


def cached_features(predictor: Predictor, paths: list[Path], cache: Path, tag: str) -> np.ndarray:
    """Features of ``paths`` (all must decode), from ``cache`` when the same weights and files were seen."""
    names = "\n".join(map(str, paths)).encode()
    key = f"{tag}-{_weights_key(predictor)}-{hashlib.sha256(names).hexdigest()[:12]}.npy"
    file = cache / key
    if file.is_file():
        return np.load(file)
    start = time.perf_counter()
    features, kept = extract_features(predictor, paths)
    if len(kept) != len(paths):
        raise SystemExit(f"{len(paths) - len(kept)} of the {tag} X-rays failed to decode; see the log.")
    log.info("%s: %d images in %.0f s", tag, len(paths), time.perf_counter() - start)
    cache.mkdir(parents=True, exist_ok=True)
    np.save(file, features)
    return features


def _halves(samples: list[Sample], seed: int) -> np.ndarray:
    """Boolean mask: True for the validation images of a random half of the patients."""
    patients = sorted({s.patient for s in samples})
    chosen = set(np.random.default_rng(seed).permutation(patients)[: len(patients) // 2])
    return np.array([s.patient in chosen for s in samples])


def pixel_stds(predictor: Predictor, sources: list[Any]) -> np.ndarray:
    """Gray-level standard deviation of each decoded input (NaN where decoding refuses it): the blank check."""
    from PIL import ImageStat

    stds = []
    for source in sources:
        try:
            stds.append(ImageStat.Stat(predictor.decode(source).image).stddev[0])
        except PneumoError:
            stds.append(float("nan"))
    return np.asarray(stds)


def false_refusals(
    train: np.ndarray, val: np.ndarray, val_blank: np.ndarray, half: np.ndarray, **kwargs: Any
) -> dict[str, Any]:
    """In-sample and 2-fold (by patient) false-refusal rates of validation X-rays (distance or blank)."""
    gate = fit_ood(train, val, **kwargs)
    refused_cross = 0
    for calibration in (half, ~half):
        fold = fit_ood(train, val[calibration], **kwargs)
        refused_cross += int((~fold.accepts(val[~calibration]) | val_blank[~calibration]).sum())
    return {
        "gate": gate,
        "in_sample": float((~gate.accepts(val) | val_blank).mean()),
        "two_fold": refused_cross / len(val),
        "refused_two_fold": refused_cross,
        "ci95_two_fold": _ci(refused_cross, len(val)),
        "n_val": len(val),
    }


def nonxray_features(
    predictor: Predictor, items: list[tuple[str, str, bytes]], cache: Path, tag: str
) -> tuple[np.ndarray, list[int], dict]:
    """Features of the items that decode (cached); the others are refusals by ``pneumo.core.decode`` (name -> code)."""
    digest = hashlib.sha256(b"".join(hashlib.sha256(data).digest() for _, _, data in items)).hexdigest()[:12]
    file = cache / f"{tag}-{_weights_key(predictor)}-{digest}.npz"
    if file.is_file():
        with np.load(file) as stored:
            features, kept = stored["features"], stored["kept"].tolist()
    else:
        features, kept = extract_features(predictor, [data for _, _, data in items])
        cache.mkdir(parents=True, exist_ok=True)
        np.savez(file, features=features, kept=np.asarray(kept))
    refused_io = {}
    for index, (_, name, data) in enumerate(items):
        if index not in set(kept):
            try:
                predictor.decode(data)
            except PneumoError as err:
                refused_io[name] = err.code
    return features, kept, refused_io


def acceptance(
    gate: Any, items: list[tuple[str, str, bytes]], features: np.ndarray, kept: list[int], blank: np.ndarray
) -> dict:
    """Per category: how many images the gate accepts (io refusals count as refused).

    ``blank``: per item (all of them), True where the blank-image check refuses it.
    """
    accepted = dict(zip(kept, (gate.accepts(features) & ~blank[kept]).tolist(), strict=True))
    scores = dict(zip(kept, gate.score(features).tolist(), strict=True))
    per: dict[str, dict[str, Any]] = defaultdict(lambda: {"n": 0, "accepted": 0, "accepted_names": []})
    for index, (category, name, _) in enumerate(items):
        row = per[category]
        row["n"] += 1
        if accepted.get(index, False):
            row["accepted"] += 1
            row["accepted_names"].append(f"{name} ({scores[index]:.2f})")
    for row in per.values():
        row["rate"] = row["accepted"] / row["n"]
    total = sum(r["n"] for r in per.values())
    not_blank = [scores[i] for i in kept if not blank[i]]
    accepted_total = sum(r["accepted"] for r in per.values())
    return {
        "rate": accepted_total / total,
        "accepted": accepted_total,
        "n": total,
        "ci95": _ci(accepted_total, total),
        "per_category": dict(per),
        "min_score": float(min(scores.values())) if scores else None,
        "min_score_not_blank": float(min(not_blank)) if not_blank else None,
    }


def _ci(k: int, n: int) -> list[float]:
    """Exact (Clopper-Pearson) 95% confidence interval of a rate k / n."""
    from scipy.stats import binomtest

    interval = binomtest(k, n).proportion_ci(confidence_level=0.95, method="exact")
    return [round(float(interval.low), 4), round(float(interval.high), 4)]


def variants() -> dict[str, dict[str, Any]]:
    """Gate settings compared with ``--compare`` (keyword arguments of fit_ood, or a special name)."""
    out: dict[str, dict[str, Any]] = {f"ppca k={k}": {"n_components": k} for k in (16, 32, 64, 128, 256)}
    out["leading 64 only"] = {"special": "leading"}
    out["full Ledoit-Wolf"] = {"special": "ledoitwolf"}
    return out


def _special_scores(kind: str, train: np.ndarray, *arrays: np.ndarray) -> list[np.ndarray]:
    from sklearn.covariance import LedoitWolf
    from sklearn.decomposition import PCA

    if kind == "leading":
        pca = PCA(64).fit(train)
        return [((pca.transform(a) ** 2) / pca.explained_variance_).sum(1) for a in arrays]
    lw = LedoitWolf().fit(train)
    return [lw.mahalanobis(a) for a in arrays]


def compare(
    train: np.ndarray,
    val: np.ndarray,
    val_blank: np.ndarray,
    half: np.ndarray,
    nonx: np.ndarray,
    nonx_blank: np.ndarray,
    quantile: float,
) -> dict:
    """Both error rates (2-fold false refusal, non-X-ray acceptance) for every variant, blank check included."""
    rows = {}
    for name, kwargs in variants().items():
        if "special" in kwargs:
            val_s, nonx_s = _special_scores(kwargs["special"], train, val, nonx)
            refused = 0
            for cal in (half, ~half):
                threshold = np.quantile(val_s[cal], quantile, method="higher")
                refused += int(((val_s[~cal] > threshold) | val_blank[~cal]).sum())
            threshold = np.quantile(val_s, quantile, method="higher")
            rows[name] = {
                "false_refusal_2fold": refused / len(val),
                "nonxray_accept": float(((nonx_s <= threshold) & ~nonx_blank).mean()),
            }
        else:
            fr = false_refusals(train, val, val_blank, half, quantile=quantile, **kwargs)
            rows[name] = {
                "false_refusal_2fold": fr["two_fold"],
                "nonxray_accept": float((fr["gate"].accepts(nonx) & ~nonx_blank).mean()),
            }
    return rows


def _write_copy(bundle_dir: Path, target: Path, gate: Any) -> None:
    """A copy of the bundle with ``gate`` in it (the same result as ``pneumo ood fit``)."""
    import shutil

    from pneumo.core.bundle import read_meta, write_meta

    shutil.copytree(bundle_dir, target, dirs_exist_ok=True)
    meta = read_meta(target)
    meta.ood = gate.save(target)
    write_meta(target, meta)
    log.info("Wrote a calibrated copy of the bundle to %s", target)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "chest_xray_224")
    parser.add_argument("--bundle", type=Path, default=None, help="Model bundle (default: the shipped one).")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/pneumo_ood_cache"))
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "ood_eval.json")
    parser.add_argument("--quantile", type=float, default=DEFAULT_QUANTILE)
    parser.add_argument("--components", type=int, default=DEFAULT_COMPONENTS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compare", action="store_true", help="Also evaluate other gate variants.")
    parser.add_argument(
        "--calibrated-copy", type=Path, default=None, help="Also write a copy of the bundle with this gate in it."
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")

    predictor = Predictor(args.bundle, check_ood=False)
    train_s, val_s, description = train_val_samples(args.data, seed=args.seed)
    train = cached_features(predictor, [s.path for s in train_s], args.cache, "train")
    val = cached_features(predictor, [s.path for s in val_s], args.cache, "val")
    half = _halves(val_s, args.seed)
    val_std = pixel_stds(predictor, [s.path for s in val_s])
    val_blank = val_std < MIN_PIXEL_STD
    fr = false_refusals(train, val, val_blank, half, quantile=args.quantile, n_components=args.components)
    gate = fr["gate"]

    if args.calibrated_copy is not None:
        _write_copy(predictor.bundle_dir, args.calibrated_copy, gate)
    items = build_nonxray_set(args.seed)
    nonx, kept, refused_io = nonxray_features(predictor, items, args.cache, "nonxray")
    nonx_blank = pixel_stds(predictor, [data for _, _, data in items]) < MIN_PIXEL_STD
    nonxray = acceptance(gate, items, nonx, kept, nonx_blank)
    distance_only = acceptance(gate, items, nonx, kept, np.zeros(len(items), dtype=bool))
    hard_paths = [s.path for s in val_s[:: max(1, len(val_s) // 20)]][:20]
    hard = hard_cases(hard_paths, args.seed)
    hard_feats, hard_kept, _ = nonxray_features(predictor, hard, args.cache, "hard")
    hard_blank = pixel_stds(predictor, [data for _, _, data in hard]) < MIN_PIXEL_STD
    fullres = sorted((args.data.parent / "fullres_samples").rglob("*.jpeg"))
    fullres_accept = None
    if fullres:
        feats, _ = extract_features(predictor, fullres)
        fullres_accept = {"n": len(fullres), "accepted": int(gate.accepts(feats).sum())}

    result: dict[str, Any] = {
        "bundle": str(predictor.bundle_dir),
        "bundle_name": predictor.meta.name,
        "split": description,
        "n_train": len(train),
        "gate": gate.info,
        "threshold": gate.threshold,
        "components": int(gate.components.shape[0]),
        "false_refusal": {k: v for k, v in fr.items() if k != "gate"},
        "val_pixel_std_min": float(np.nanmin(val_std)),
        "nonxray_acceptance": nonxray,
        "nonxray_acceptance_distance_only": {"rate": distance_only["rate"], "n": distance_only["n"]},
        "refused_by_io": refused_io,
        "hard_cases": acceptance(gate, hard, hard_feats, hard_kept, hard_blank),
        "fullres_samples": fullres_accept,
    }
    if args.compare:
        result["compare"] = compare(train, val, val_blank, half, nonx, nonx_blank[kept], args.quantile)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")

    print(f"\nOOD gate on {result['bundle_name']} ({len(train)} train / {len(val)} val X-rays, {description})")
    print(f"threshold {gate.threshold:.3f} = {args.quantile:g} quantile of validation scores, k={result['components']}")
    print(
        f"false refusals of validation X-rays: {fr['two_fold']:.2%} (2-fold by patient), "
        f"{fr['in_sample']:.2%} in-sample"
    )
    print(f"  (95% CI {fr['ci95_two_fold'][0]:.2%}-{fr['ci95_two_fold'][1]:.2%})")
    print(f"non-X-rays accepted: {nonxray['rate']:.2%} of {nonxray['n']} ", end="")
    print(f"({distance_only['rate']:.2%} on the feature distance alone, without the blank-image check)")
    print(f"  (95% CI {nonxray['ci95'][0]:.2%}-{nonxray['ci95'][1]:.2%}; ", end="")
    lowest = nonxray["min_score_not_blank"]
    print(f"lowest score of a non-blank non-X-ray {lowest:.2f} vs threshold {gate.threshold:.2f})")
    print(f"{'category':16s} {'n':>4s} {'accepted':>9s}")
    for category, row in sorted(nonxray["per_category"].items()):
        print(f"{category:16s} {row['n']:4d} {row['accepted']:9d}  {', '.join(row['accepted_names'][:4])}")
    for category, row in sorted(result["hard_cases"]["per_category"].items()):
        print(f"{category:16s} {row['n']:4d} {row['accepted']:9d}  (look-alike, not in the target)")
    if fullres_accept:
        print(f"full-resolution originals accepted: {fullres_accept['accepted']} / {fullres_accept['n']}")
    if args.compare:
        print(f"\n{'variant':20s} {'false refusal (2-fold)':>24s} {'non-X-ray accepted':>20s}")
        for name, row in result["compare"].items():
            print(f"{name:20s} {row['false_refusal_2fold']:24.2%} {row['nonxray_accept']:20.2%}")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
