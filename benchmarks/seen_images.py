"""Record the images a bundle saw (``training.seen_images``) and measure how well the hash tells films apart.

Bundles trained before the hashes existed (the shipped default among them) do not list them. This
script recomputes them from the bundle's own patient split: ``training.config`` records the data
folder's name, ``val_fraction`` and ``seed``, and :func:`pneumo.core.dataset.train_val_samples`
carves the same split again. It also measures the hash on that data: the smallest distance
between films of different children, and the largest between a full-resolution original and its
224-px training copy (``fullres_samples``), re-encoded, resized and as PNG.

    python benchmarks/seen_images.py                      # measure, write benchmarks/results/seen_images.json
    python benchmarks/seen_images.py --write              # ... and add the hashes to the default bundle.json
    python benchmarks/seen_images.py --bundle B --data ../shared/data/chest_xray_224 --write
"""

from __future__ import annotations

import argparse
import io
import json
import time
from pathlib import Path

import numpy as np
from PIL import Image

from pneumo.core.bundle import META_FILE, read_meta, resolve_bundle
from pneumo.core.dataset import train_val_samples
from pneumo.evaluation.overlap import MAX_DISTANCE, METHOD, content_hash, hash_files, seen_images

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def _bits(hashes: list[bytes]) -> np.ndarray:
    return np.unpackbits(np.frombuffer(b"".join(hashes), dtype=np.uint8).reshape(-1, 16), axis=1).astype(np.int8)


def separation(samples: list, fullres: Path) -> dict:
    """Smallest distance between different children's films; largest between one film's versions."""
    hashes = [h for h in hash_files([s.path for s in samples], "measuring") if h is not None]
    bits, patients = _bits(hashes), np.array([s.patient for s in samples])
    nearest = []
    for start in range(0, len(bits), 256):
        distance = (bits[start : start + 256, None, :] != bits[None, :, :]).sum(-1)
        distance[patients[start : start + 256, None] == patients[None, :]] = 10_000
        nearest.append(distance.min(axis=1))
    other_child = np.concatenate(nearest)
    names = {s.path.name: i for i, s in enumerate(samples)}
    same_film = []
    for path in sorted(fullres.glob("*/*.jpeg")):
        if path.name not in names:
            continue
        film = Image.open(path).convert("L")
        versions = [film, film.resize((512, 640))]
        for fmt, kwargs in (("JPEG", {"quality": 30}), ("PNG", {})):
            buffer = io.BytesIO()
            film.save(buffer, fmt, **kwargs)
            versions.append(Image.open(io.BytesIO(buffer.getvalue())))
        reference = bits[names[path.name]]
        same_film += [int((_bits([content_hash(v)])[0] != reference).sum()) for v in versions]
    return {
        "images": len(hashes),
        "other_child_min_distance": int(other_child.min()),
        "other_child_distance_percentiles_0.1_1_5": np.percentile(other_child, [0.1, 1, 5]).tolist(),
        "same_film_versions": len(same_film),
        "same_film_max_distance": max(same_film) if same_film else None,
        "max_distance_used": MAX_DISTANCE,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=None, help="bundle folder (default: the shipped one)")
    parser.add_argument("--data", type=Path, default=SHARED / "chest_xray_224", help="the bundle's training data root")
    parser.add_argument("--write", action="store_true", help="add the hashes to the bundle's bundle.json")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "seen_images.json")
    args = parser.parse_args()

    bundle = resolve_bundle(args.bundle)
    meta = read_meta(bundle)
    config = meta.training.config
    if config.get("data") and Path(config["data"]).name != args.data.name:
        raise SystemExit(f"the bundle was trained on {config['data']!r}, not {args.data.name!r}; pass --data")
    train, val, description = train_val_samples(
        args.data, config.get("label_mode", "binary"), config.get("val_fraction", 0.15), config.get("seed", 0)
    )
    if description != meta.training.split:
        raise SystemExit(f"the split carved now ({description}) is not the bundle's ({meta.training.split})")
    started = time.perf_counter()
    record = seen_images({"train": train, "val": val})
    seconds = time.perf_counter() - started
    result = {
        "bundle": meta.name,
        "method": METHOD,
        "split": description,
        "train_images": len(train),
        "val_images": len(val),
        "hash_seconds": round(seconds, 1),
        "record_characters": sum(len(v) for v in record.values() if isinstance(v, str)),
        "separation": separation([*train, *val], SHARED / "fullres_samples"),
    }
    if args.write:
        path = bundle / META_FILE
        data = json.loads(path.read_text())
        data["training"]["seen_images"] = record
        path.write_text(json.dumps(data, indent=2) + "\n")
        read_meta(bundle)  # still valid
        result["written_to"] = str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
