"""Shared fixtures: a tiny synthetic dataset in the Kaggle layout, and the real data when present."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

#: The read-only real data (see its README), next to the repository checkout.
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def normal_names(n: int) -> list[str]:
    """``n`` NORMAL file names in the dataset's three styles; every other patient has two films."""
    names: list[str] = []
    patient = 1
    while len(names) < n:
        style = (patient - 1) % 3
        for k in range(1, 3 if patient % 2 else 2):
            if style == 0:
                names.append(f"IM-{patient:04d}-{k:04d}.jpeg")
            elif style == 1:
                names.append(f"NORMAL2-IM-{patient:04d}-{k:04d}.jpeg")
            else:
                names.append(f"IM-{patient:04d}-0001-{k:04d}.jpeg")
        patient += 1
    return names[:n]


def pneumonia_names(n: int) -> list[str]:
    """``n`` PNEUMONIA file names ``personP_{bacteria,virus}_M``, about 2:1 bacteria, some multi-film patients."""
    patterns = (("bacteria", "virus"), ("bacteria", "bacteria"), ("virus",), ("bacteria",))
    names: list[str] = []
    patient, image = 1, 1
    while len(names) < n:
        for kind in patterns[(patient - 1) % len(patterns)]:
            names.append(f"person{patient}_{kind}_{image}.jpeg")
            image += 1
        patient += 1
    return names[:n]


def synthetic_xray(name: str, pneumonia: bool, size: int = 64) -> Image.Image:
    """A grayscale chest-like picture: two dark lungs in a brighter body; pneumonia adds a bright blotch.

    The pixels are seeded by ``name``, so the same file name always gives the same image.
    """
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    y, x = np.mgrid[0:size, 0:size] / size
    image = 150.0 - 60.0 * np.abs(x - 0.5)
    for cx in (0.3, 0.7):
        lung = ((x - cx) / 0.15) ** 2 + ((y - 0.5) / 0.3) ** 2 < 1.0
        image[lung] -= 90.0
    if pneumonia:
        cx, cy = rng.choice([0.3, 0.7]), rng.uniform(0.4, 0.65)
        image += 110.0 * np.exp(-(((x - cx) ** 2 + (y - cy) ** 2) / (2 * 0.08**2)))
    image += rng.normal(0.0, 8.0, image.shape)
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8), mode="L")


def write_tiny_dataset(root: Path, n_per_class: int = 12, splits: Sequence[str] = ("train",), size: int = 64) -> Path:
    """Write ``root/<split>/{NORMAL,PNEUMONIA}/*.jpeg`` with realistic names and return ``root``."""
    for split in splits:
        for class_dir, names in (("NORMAL", normal_names(n_per_class)), ("PNEUMONIA", pneumonia_names(n_per_class))):
            folder = root / split / class_dir
            folder.mkdir(parents=True, exist_ok=True)
            for name in names:
                synthetic_xray(f"{split}/{name}", class_dir == "PNEUMONIA", size).save(folder / name, quality=92)
    return root


@pytest.fixture
def tiny_dataset(tmp_path: Path) -> Path:
    """A Kaggle-layout root with ``train/{NORMAL,PNEUMONIA}``, 12 64x64 JPEGs per class."""
    return write_tiny_dataset(tmp_path / "chest_xray")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test that asks for the real data is marked ``realdata`` by that very request (``-m "not realdata"``)."""
    for item in items:
        if "shared_data" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.realdata)


@pytest.fixture
def shared_data() -> Path:
    """``../shared/data`` (the real dataset); skips the test where it is absent. Marks the test ``realdata``."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(autouse=True, scope="session")
def _production_backend_and_private_onnx_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Run the backend production runs (``auto``: the INT8 graph, else the fp32 graph); exports in a private cache.

    No ``PNEUMO_BACKEND`` from the caller's shell leaks in; exports to the cache (the default bundle's fp32
    graph, the cache tests) go to a session folder, not ``~/.cache``.
    """
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("PNEUMO_BACKEND", raising=False)
        patch.setenv("PNEUMO_CACHE", str(tmp_path_factory.mktemp("pneumo-cache")))
        yield


@pytest.fixture(autouse=True)
def _library_logging() -> Iterator[None]:
    """Give every test the library's own logging, whatever a command line run configured before it.

    ``pneumo.cli.common.setup_logging`` gives pneumo's logger its own handler and stops it propagating
    (a command line's choice); left in place by a CLI test or a fixture that ran the CLI, ``caplog``
    would miss the warnings later tests assert on.
    """
    logger = logging.getLogger("pneumo")
    saved = (logger.handlers[:], logger.propagate, logger.level)
    logger.handlers.clear()
    logger.propagate = True
    logger.setLevel(logging.NOTSET)
    yield
    logger.handlers[:], logger.propagate = saved[0], saved[1]
    logger.setLevel(saved[2])


def noise_image(seed: int, side: int = 96) -> Image.Image:
    """Uniform gray-level noise: a picture that is plainly not a chest X-ray."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (side, side), dtype=np.uint8))


@pytest.fixture(scope="session")
def gated_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight bundle whose OOD gate is calibrated on synthetic X-rays (the real gate code)."""
    from model_helpers import SURFACE_META, tiny_bundle

    from pneumo.modeling.ood_fit import refit_gate

    root = tmp_path_factory.mktemp("gated")
    bundle = tiny_bundle(root / "bundle", head="wide", **SURFACE_META)[0]
    sources = {}
    for split, count, parity in (("train", 96, 0), ("val", 48, 1)):
        folder = root / split
        folder.mkdir()
        for i in range(count):
            prefix = "t" if split == "train" else "v"
            path = folder / f"{prefix}{i}.png"
            synthetic_xray(f"{prefix}{i}", i % 2 == parity).save(path)
            sources.setdefault(split, []).append(path)
    # Clean validation images only: a random-weight model's features of shifted synthetic films (noise, text)
    # are no closer to X-rays than a document's, so the shifted sample would accept everything here.
    refit_gate(bundle, sources["train"], sources["val"], quantile=0.99, n_components=8, shifts=False)
    return bundle


def run_with_helpers(script: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """Run ``script`` in a fresh single-threaded Python whose ``sys.argv[1]`` is this folder (the test helpers).

    For checks that cap the process (address space, memory) and must not cap pytest itself.
    """
    return subprocess.run(
        [sys.executable, "-c", script, str(Path(__file__).parent)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
