"""Which images a bundle saw: perceptual hashes that survive re-encoding and resizing, and evaluate's warning."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import numpy as np
import pytest
from conftest import synthetic_xray, write_tiny_dataset
from PIL import Image

from pneumo.core.dataset import discover
from pneumo.evaluation import overlap as O


def _bits_apart(a: bytes, b: bytes) -> int:
    return int(np.unpackbits(np.frombuffer(a, np.uint8) ^ np.frombuffer(b, np.uint8)).sum())


def _reencoded(image: Image.Image, fmt: str, **options: object) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return Image.open(io.BytesIO(buffer.getvalue()))


def test_content_hash_survives_resizing_and_reencoding() -> None:
    film = synthetic_xray("person7_bacteria_1.jpeg", True, 512)
    reference = O.content_hash(film)
    assert len(reference) == 16
    for version in (film.resize((224, 224)), film.convert("RGB"), _reencoded(film, "JPEG", quality=30),
                    _reencoded(film.resize((300, 300)), "PNG")):  # fmt: skip
        assert _bits_apart(O.content_hash(version), reference) <= O.MAX_DISTANCE


def test_real_films_match_their_224_px_training_copies(shared_data: Path) -> None:
    """The shipped bundle's training copies are squashed to 224 px: their full-resolution originals still match."""
    originals = sorted((shared_data / "fullres_samples").glob("*/*.jpeg"))
    copies = [shared_data / "chest_xray_224" / "train" / p.parent.name / p.name for p in originals]
    hashes = O.hash_files([*originals, *copies])
    pairs = list(zip(hashes[: len(originals)], hashes[len(originals) :], strict=True))
    assert len(pairs) == 14 and all(_bits_apart(a, b) <= O.MAX_DISTANCE for a, b in pairs)  # type: ignore[arg-type]
    others = [_bits_apart(a, b) for i, (a, _) in enumerate(pairs) for j, (_, b) in enumerate(pairs) if i != j]
    assert min(others) > 2 * O.MAX_DISTANCE  # type: ignore[arg-type]


def test_content_hash_tells_different_films_apart() -> None:
    hashes = [O.content_hash(synthetic_xray(f"person{i}_virus_{i}.jpeg", bool(i % 2), 128)) for i in range(12)]
    distances = [_bits_apart(a, b) for i, a in enumerate(hashes) for b in hashes[i + 1 :]]
    assert min(distances) > 2 * O.MAX_DISTANCE


def test_overlap_counts_images_seen_per_split(tmp_path: Path) -> None:
    root = write_tiny_dataset(tmp_path / "data")
    samples = discover(root, "train")
    record = O.seen_images({"train": samples[:8], "val": samples[8:10]})
    assert record["method"] == O.METHOD and len(O.decode(record["train"])) == 8
    # The evaluation set: 3 training films (one of them as a larger PNG), 1 validation film, 2 unseen.
    small = tmp_path / "larger.png"
    Image.open(samples[0].path).resize((96, 96)).save(small)  # a PNG at another size
    queries = O.hash_files(
        [small, samples[1].path, samples[2].path, samples[8].path, *(s.path for s in samples[20:22])]
    )
    found = O.overlap(queries, record)
    assert found == {"train": 3, "val": 1, "any": 4, "of": 6, "indices": [0, 1, 2, 3]}
    assert O.overlap(queries, None) is None
    assert O.overlap(queries, {**record, "method": "md5"}) is None  # another method is not misread


def test_hash_files_gives_none_for_unreadable_files(tmp_path: Path) -> None:
    bad = tmp_path / "notes.txt"
    bad.write_text("not an image")
    good = tmp_path / "film.png"
    synthetic_xray("IM-0001-0001.jpeg", False, 96).save(good)
    hashes = O.hash_files([bad, good])
    assert hashes[0] is None and hashes[1] is not None
    assert O.overlap(hashes, O.seen_images({"train": []})) == {"train": 0, "any": 0, "of": 2, "indices": []}


@pytest.fixture(scope="module")
def data_and_bundles(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A tiny Kaggle root, a bundle that records having seen its train/ films, and one that records nothing."""
    from model_helpers import tiny_bundle

    tmp = tmp_path_factory.mktemp("overlap")
    root = write_tiny_dataset(tmp / "data", n_per_class=6)
    samples = discover(root, "train")
    seen = O.seen_images({"train": samples[:9], "val": samples[9:]})
    with_record, _ = tiny_bundle(tmp / "seen", training={"seen_images": seen})
    without, _ = tiny_bundle(tmp / "unknown")
    return root, with_record, without


def test_evaluate_warns_when_the_bundle_saw_the_images(
    data_and_bundles: tuple[Path, Path, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from pneumo.evaluation.evaluate import evaluate_folder

    root, seen_bundle, _ = data_and_bundles
    logger = logging.getLogger("pneumo.evaluation.evaluate")  # the CLI stops pneumo's records at its own handler
    logger.addHandler(caplog.handler)
    try:
        report = evaluate_folder(root, seen_bundle, split="train", out_dir=tmp_path / "r", n_boot=50)
    finally:
        logger.removeHandler(caplog.handler)
    assert report["overlap"]["checked"] and report["overlap"]["any"] == 12
    assert (report["overlap"]["train"], report["overlap"]["val"]) == (9, 3)
    assert "12 of 12 images were seen by the bundle" in caplog.text
    assert "12 of 12 images were seen by this model" in (tmp_path / "r" / "report.md").read_text()
    assert json.loads((tmp_path / "r" / "metrics.json").read_text())["overlap"]["any"] == 12


def test_evaluate_says_when_it_cannot_check(data_and_bundles: tuple[Path, Path, Path], tmp_path: Path) -> None:
    from pneumo.evaluation.evaluate import evaluate_folder

    root, _, unknown = data_and_bundles
    report = evaluate_folder(root, unknown, split="train", out_dir=tmp_path / "r", n_boot=50)
    assert report["overlap"] == {"checked": False, "reason": "the bundle records no hashes of the images it saw"}
    assert report["n_patients"] == len({s.patient for s in discover(root, "train")})
    assert "cluster bootstrap" in report["ci_method"]
