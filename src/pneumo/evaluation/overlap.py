"""Which images a bundle has already seen: compact content hashes, recorded at training, checked at evaluation.

A model scored on its own training films looks better than it is, and nothing in a folder of JPEGs
says where the films came from. So a bundle records a perceptual hash of every image it trained
and validated on (:func:`seen_images`, in ``bundle.json``'s ``training.seen_images``), and
``pneumo evaluate`` hashes the images it is given and counts the matches (:func:`overlap`).

The hash (:func:`content_hash`) is a DCT hash of the decoded image shrunk to 32 x 32: the signs of
its 128 lowest-frequency coefficients against their median (pHash, after Zauner 2010, with more bits:
the classic 64 collide between chest films, which all look alike). It survives what a file hash does
not: re-encoding, resizing (the 224-px training copies match their full-resolution originals) and a
change of format. Measured on the 5,216 films of the official training split
(``benchmarks/seen_images.py``): films of different children are at least 12 bits apart, the same
film resized, re-encoded or converted to PNG at most 4, hence :data:`MAX_DISTANCE` = 6.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pneumo.core import progress

#: Name of the hash, recorded with the hashes so a later change of method is detected, not misread.
METHOD = "dct-phash-128"
#: Hamming distance (bits of 128) up to which two hashes are the same film.
MAX_DISTANCE = 6
_SIDE = 32
_N = np.arange(_SIDE)
_DCT = np.cos(np.pi * (2 * _N[None, :] + 1) * _N[:, None] / (2 * _SIDE))  # DCT-II basis, rows = frequencies
# The 128 lowest frequencies (by u + v, then u), the constant term left out.
_ORDER = sorted((u + v, u, v) for u in range(16) for v in range(16))[1:129]
_ROWS = np.array([u for _, u, _ in _ORDER])
_COLS = np.array([v for _, _, v in _ORDER])
_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def content_hash(image: Image.Image) -> bytes:
    """The 16-byte perceptual hash of a decoded image (any size or mode)."""
    small = image.convert("L").resize((_SIDE, _SIDE), Image.Resampling.BOX)
    coefficients = (_DCT @ np.asarray(small, dtype=np.float64) @ _DCT.T)[_ROWS, _COLS]
    return np.packbits(coefficients > np.median(coefficients)).tobytes()


def hash_files(paths: Sequence[Path | str], description: str = "hashing images") -> list[bytes | None]:
    """:func:`content_hash` of each file (decoded as the Predictor decodes it); ``None`` where it cannot be read."""
    from pneumo.core.decode import read_image
    from pneumo.core.errors import PneumoError

    hashes: list[bytes | None] = []
    for path in progress.track(paths, description):
        try:
            hashes.append(content_hash(read_image(path, draft_size=4 * _SIDE).image))
        except PneumoError:
            hashes.append(None)
    return hashes


def encode(hashes: Iterable[bytes]) -> str:
    """Hashes as one URL-safe base64 string (16 bytes each, ~22 characters per image in ``bundle.json``).

    URL-safe: no ``/`` in it, which :func:`pneumo.core.redact.strip_paths` would take for a server path.
    """
    return base64.urlsafe_b64encode(b"".join(hashes)).decode("ascii")


def decode(text: str) -> np.ndarray:
    """The (N, 16) uint8 array of an :func:`encode` string."""
    raw = np.frombuffer(base64.urlsafe_b64decode(text), dtype=np.uint8)
    if raw.size % 16:
        raise ValueError(f"a hash list must hold a multiple of 16 bytes, got {raw.size}")
    return raw.reshape(-1, 16)


def seen_images(splits: Mapping[str, Sequence[Any]]) -> dict[str, Any]:
    """The ``training.seen_images`` record of a bundle: the hashes of each split's samples (``.path`` each).

    ``splits`` maps a split name (``"train"``, ``"val"``) to its samples; files that cannot be read are left out.
    """
    record: dict[str, Any] = {"method": METHOD, "max_distance": MAX_DISTANCE}
    for name, samples in splits.items():
        hashes = hash_files([s.path for s in samples], f"hashing {name} images")
        record[name] = encode(h for h in hashes if h is not None)
    return record


def matches(queries: np.ndarray, reference: np.ndarray, max_distance: int = MAX_DISTANCE) -> np.ndarray:
    """For each query hash (rows of (N, 16) uint8), whether some reference hash is within ``max_distance`` bits."""
    found = np.zeros(len(queries), dtype=bool)
    if not len(queries) or not len(reference):
        return found
    for start in range(0, len(queries), 256):  # 256 x N_ref x 16 bytes at a time
        xor = queries[start : start + 256, None, :] ^ reference[None, :, :]
        found[start : start + 256] = (_POPCOUNT[xor].sum(axis=2, dtype=np.int32) <= max_distance).any(axis=1)
    return found


def overlap(hashes: Sequence[bytes | None], record: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """How many of ``hashes`` the bundle saw, per split of its ``seen_images`` record; ``None`` without a record.

    Returns ``{"train": n, "val": n, "any": n, "of": N, "indices": [...]}``: ``indices`` are the
    positions of the images seen in any split.
    """
    if not record or record.get("method") != METHOD:
        return None
    known = [i for i, h in enumerate(hashes) if h is not None]
    queries = np.frombuffer(b"".join(hashes[i] for i in known), dtype=np.uint8).reshape(-1, 16)  # type: ignore[misc]
    seen_any = np.zeros(len(known), dtype=bool)
    out: dict[str, Any] = {}
    for split in ("train", "val"):
        if isinstance(record.get(split), str):
            hit = matches(queries, decode(record[split]), int(record.get("max_distance", MAX_DISTANCE)))
            out[split] = int(hit.sum())
            seen_any |= hit
    out.update(any=int(seen_any.sum()), of=len(hashes), indices=[known[i] for i in np.flatnonzero(seen_any)])
    return out
