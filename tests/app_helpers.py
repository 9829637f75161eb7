"""Helpers shared by the explain, API, app and DICOM tests: encoded test images and the app page."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import synthetic_xray
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian, generate_uid
from streamlit.testing.v1 import AppTest

import pneumo
from pneumo.app import support as app_support

#: The Streamlit page the app tests drive.
PAGE = Path(pneumo.__file__).parent / "app" / "page.py"


def encode(image: Image.Image, fmt: str = "JPEG") -> bytes:
    """``image`` encoded in memory (JPEG quality 92, or PNG)."""
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **({"quality": 92} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def xray_bytes(name: str = "case", pneumonia: bool = True, size: int = 96, fmt: str = "JPEG") -> bytes:
    """A synthetic chest-like grayscale picture, encoded."""
    return encode(synthetic_xray(name, pneumonia, size), fmt)


def dicom_bytes(
    pixels: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    bits_stored: int = 12,
    modality: str | None = "DX",
    window: tuple[float, float] | None = None,
    rescale: tuple[float, float] | None = None,
    with_pixels: bool = True,
    transfer_syntax: str = ExplicitVRLittleEndian,
    **fields: Any,
) -> bytes:
    """An uncompressed single-frame DICOM file (Digital X-Ray) holding ``pixels``, as written by pydicom.

    Args:
        pixels: 2-D unsigned array (H, W), or (H, W, 3) with ``photometric="RGB"``.
        window: (center, width) written as WindowCenter/WindowWidth.
        rescale: (slope, intercept) written as RescaleSlope/RescaleIntercept.
        fields: more header elements, e.g. ``ViewPosition="AP"``.
    """
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = transfer_syntax
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    if modality is not None:
        ds.Modality = modality
    for key, value in fields.items():
        setattr(ds, key, value)
    if with_pixels:
        bits_allocated = 8 if bits_stored <= 8 else 16
        ds.Rows, ds.Columns = pixels.shape[:2]
        ds.SamplesPerPixel = 3 if pixels.ndim == 3 else 1
        if pixels.ndim == 3:
            ds.PlanarConfiguration = 0
        ds.PhotometricInterpretation = photometric
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits_allocated, bits_stored, bits_stored - 1
        ds.PixelRepresentation = 0
        if window is not None:
            ds.WindowCenter, ds.WindowWidth = window
        if rescale is not None:
            ds.RescaleSlope, ds.RescaleIntercept = rescale
        ds.PixelData = pixels.astype(np.uint8 if bits_allocated == 8 else np.uint16).tobytes()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def xray_array(name: str = "case", size: int = 96, bits: int = 12, pneumonia: bool = True) -> np.ndarray:
    """The synthetic X-ray of :func:`xray_bytes` as unsigned integers with ``bits`` significant bits."""
    gray = np.asarray(synthetic_xray(name, pneumonia, size), dtype=np.float64) / 255.0
    return np.round(gray * (2**bits - 1)).astype(np.uint16 if bits > 8 else np.uint8)


@contextmanager
def pneumo_log_handlers_restored() -> Iterator[None]:
    """Undo the handler ``pneumo.cli`` adds to the ``pneumo`` logger.

    Under CliRunner that handler writes to a stream the runner closes afterwards, so later log
    records in the same test process would end in "Logging error" noise.
    """
    logger = logging.getLogger("pneumo")
    handlers, level = list(logger.handlers), logger.level
    try:
        yield
    finally:
        logger.handlers[:] = handlers
        logger.setLevel(level)


def open_page(bundle: Path, monkeypatch: pytest.MonkeyPatch, timeout: float = 120) -> AppTest:
    """The app page run once with ``bundle`` as its model; fails on any exception the page raised."""
    monkeypatch.setenv(app_support.MODEL_ENV, str(bundle))
    at = AppTest.from_file(str(PAGE), default_timeout=timeout)
    at.run()
    assert not at.exception, at.exception
    return at
