"""Tests of DICOM decoding (pneumo.core.decode.dicom.read_dicom) on files written with pydicom."""

from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest
from app_helpers import dicom_bytes, xray_array
from model_helpers import SURFACE_META, tiny_bundle
from pydicom.encaps import encapsulate
from pydicom.uid import RLELossless

from pneumo.core.decode import read_image
from pneumo.core.errors import DicomError
from pneumo.inference import Predictor


@pytest.fixture(scope="module")
def predictor(tmp_path_factory: pytest.TempPathFactory) -> Predictor:
    return Predictor(tiny_bundle(tmp_path_factory.mktemp("bundle"), head="wide", **SURFACE_META)[0])


def _pixels(data: bytes) -> np.ndarray:
    return np.asarray(read_image(data).image, dtype=np.int16)


@pytest.mark.parametrize("bits", [8, 12, 16])
def test_any_bit_depth_fills_the_gray_scale(bits: int) -> None:
    stored = xray_array("depth", bits=bits)
    decoded = read_image(dicom_bytes(stored, bits_stored=bits))
    pixels = np.asarray(decoded.image)
    assert decoded.format == "dicom" and decoded.image.mode == "L"
    assert decoded.original_size == (96, 96)
    assert pixels.min() == 0 and pixels.max() == 255, "no VOI: the image's own range maps onto 0-255"
    expected = (stored - stored.min()) / (stored.max() - stored.min()) * 255.0
    assert np.abs(pixels - expected).max() <= 0.5 + 1e-9


def test_bit_depths_agree_with_each_other() -> None:
    twelve = _pixels(dicom_bytes(xray_array("same", bits=12), bits_stored=12))
    sixteen = _pixels(dicom_bytes(xray_array("same", bits=16), bits_stored=16))
    assert np.abs(twelve - sixteen).max() <= 1


@pytest.mark.parametrize(("bits", "window"), [(12, None), (12, (1800.0, 2400.0)), (16, None), (16, (30000.0, 40000.0))])
def test_monochrome1_is_inverted_to_its_monochrome2_twin(bits: int, window: tuple[float, float] | None) -> None:
    top = 2**bits - 1
    stored = xray_array("twin", bits=bits)
    m2 = dicom_bytes(stored, bits_stored=bits, window=window)
    # The mirror of window [c - 0.5 -/+ (w - 1) / 2] under x -> top - x has center top + 1 - c.
    mirrored = (top + 1 - window[0], window[1]) if window else None
    m1 = dicom_bytes(top - stored, bits_stored=bits, photometric="MONOCHROME1", window=mirrored)
    assert np.array_equal(_pixels(m1), _pixels(m2))


def test_monochrome1_gives_the_same_prediction_as_its_twin(predictor: Predictor) -> None:
    stored = xray_array("predict", bits=12)
    m2 = predictor.predict(dicom_bytes(stored, bits_stored=12))
    m1 = predictor.predict(dicom_bytes(4095 - stored, bits_stored=12, photometric="MONOCHROME1"))
    assert m1.label == m2.label
    assert m1.probability == pytest.approx(m2.probability, abs=1e-6)
    assert m1.format == "dicom"


def test_window_maps_its_own_range_not_the_image_range() -> None:
    """Pixels all in the upper half of a window stay in the upper half of the gray scale."""
    stored = np.tile(np.linspace(2048, 2559, 96), (96, 1)).astype(np.uint16)
    windowed = _pixels(dicom_bytes(stored, bits_stored=12, window=(2048.0, 1024.0)))
    assert 120 <= windowed.min() <= 136, "the window center is mid-gray"
    assert windowed.max() == 255
    unwindowed = _pixels(dicom_bytes(stored, bits_stored=12))
    assert unwindowed.min() == 0, "without a window the image's own range is stretched"


def test_window_clips_values_outside_it() -> None:
    stored = np.tile(np.linspace(0, 4095, 96), (96, 1)).astype(np.uint16)
    pixels = _pixels(dicom_bytes(stored, bits_stored=12, window=(2000.0, 400.0)))
    assert (pixels[:, stored[0] < 1700] == 0).all()
    assert (pixels[:, stored[0] > 2300] == 255).all()
    inside = pixels[0, (stored[0] > 1850) & (stored[0] < 2150)]
    assert (np.diff(inside) >= 0).all() and 0 < inside.min() < inside.max() < 255


def test_modality_lut_rescale_is_applied_before_the_window() -> None:
    """A window given in rescaled units (e.g. after intercept -1024) must be applied to rescaled values."""
    stored = np.tile(np.linspace(0, 4095, 96), (96, 1)).astype(np.uint16)
    shifted = _pixels(dicom_bytes(stored, bits_stored=12, rescale=(1.0, -1024.0), window=(976.0, 400.0)))
    plain = _pixels(dicom_bytes(stored, bits_stored=12, window=(2000.0, 400.0)))
    assert np.array_equal(shifted, plain)


def test_header_fields_are_returned(predictor: Predictor) -> None:
    data = dicom_bytes(xray_array(), ViewPosition="AP", PatientAge="004Y", PatientSex="F")
    prediction = predictor.predict(data)
    assert prediction.metadata["Modality"] == "DX"
    assert prediction.metadata["ViewPosition"] == "AP"
    assert prediction.metadata["PatientAge"] == "004Y"


@pytest.mark.parametrize(
    ("kwargs", "code"),
    [
        ({"photometric": "RGB"}, "unsupported_photometric"),
        ({"with_pixels": False}, "dicom_no_pixel_data"),
        ({"modality": "CT"}, "unsupported_modality"),
        ({"modality": "MR"}, "unsupported_modality"),
    ],
)
def test_unusable_dicoms_are_refused_with_a_clear_code(kwargs: dict, code: str) -> None:
    stored = xray_array("bad", bits=8)
    pixels = np.stack([stored] * 3, axis=-1) if kwargs.get("photometric") == "RGB" else stored
    with pytest.raises(DicomError) as err:
        read_image(dicom_bytes(pixels, bits_stored=8, **kwargs))
    assert err.value.code == code
    assert err.value.http_status == 422
    assert len(err.value.message) > 30


def test_missing_modality_and_cr_are_accepted() -> None:
    assert read_image(dicom_bytes(xray_array(), modality=None)).format == "dicom"
    assert read_image(dicom_bytes(xray_array(), modality="CR")).format == "dicom"


def test_rle_compressed_file_decodes_like_the_uncompressed_one() -> None:
    raw = dicom_bytes(xray_array("rle", bits=12), bits_stored=12)
    ds = pydicom.dcmread(io.BytesIO(raw))
    ds.compress(RLELossless)
    buffer = io.BytesIO()
    ds.save_as(buffer)
    assert np.array_equal(_pixels(buffer.getvalue()), _pixels(raw))


@pytest.mark.parametrize("syntax", ["1.2.840.10008.1.2.4.100", "1.2.840.10008.1.2.4.110", "1.2.840.10008.1.2.4.102"])
def test_transfer_syntax_pneumo_does_not_read_is_refused_by_name(syntax: str) -> None:
    """MPEG-2, JPEG XL, H.264: an honest unsupported_transfer_syntax, never a decoding attempt (issue 21)."""
    ds = pydicom.dcmread(io.BytesIO(dicom_bytes(xray_array(), bits_stored=12)))
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"
    ds.PixelData = encapsulate([b"\x00" * 64])
    ds["PixelData"].VR = "OB"
    buffer = io.BytesIO()
    ds.save_as(buffer)
    # Same length, so the file stays valid; pydicom cannot write a syntax it does not know (JPEG XL).
    data = buffer.getvalue().replace(b"1.2.840.10008.1.2.4.100", syntax.encode())
    with pytest.raises(DicomError, match=syntax) as err:
        read_image(data)
    assert err.value.code == "unsupported_transfer_syntax"
    assert "Export the image" in err.value.message


def test_truncated_pixel_data_is_a_clear_error() -> None:
    data = dicom_bytes(xray_array(bits=12), bits_stored=12)
    with pytest.raises(DicomError) as err:
        read_image(data[: len(data) - 5000])
    assert err.value.code in ("corrupt_image", "invalid_dicom")
