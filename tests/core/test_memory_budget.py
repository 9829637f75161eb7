"""The decoding memory budget (issue 12, F1-F3): hostile inputs cost at most 300 MB, measured in a child process.

Peak memory is a budget, not a timing: each input is decoded in a fresh interpreter whose
high-water mark is reset just before ``read_image``. Before the fix these inputs took
0.5-2.1 GB (``benchmarks/memory_budget.py`` keeps the numbers).
"""

from __future__ import annotations

import io
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from app_helpers import dicom_bytes, xray_array
from hostile_inputs import HOSTILE, deflated_dicom_bomb, lying_jpeg_dicom, measure_decode
from PIL import Image
from pydicom.uid import DeflatedExplicitVRLittleEndian, JPEGBaseline8Bit

from pneumo.core.decode import read_image
from pneumo.core.errors import PneumoError

#: Peak extra memory of one decode, for any input under the default limits (docs/reliability.md).
BUDGET_MB = 300


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_input_stays_within_the_memory_budget(name: str, tmp_path: Path) -> None:
    maker, code = HOSTILE[name]
    result = measure_decode(maker(), tmp_path)
    assert result.get("error") is None, result
    assert result["code"] == code
    assert 0 < result["peak_extra_mb"] <= BUDGET_MB, result


def test_deflated_dicom_is_refused_without_inflating_it() -> None:
    with pytest.raises(PneumoError) as caught:
        read_image(deflated_dicom_bomb(inflated=200 * 2**20))
    assert caught.value.code == "inflated_too_large"
    assert "inflates to more than" in caught.value.message


def _deflated(raw: bytes) -> bytes:
    """The uncompressed DICOM ``raw`` rewritten with the Deflated transfer syntax (pydicom deflates on save)."""
    ds = pydicom.dcmread(io.BytesIO(raw))
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def test_a_small_deflated_dicom_decodes_like_its_uncompressed_twin() -> None:
    raw = dicom_bytes(xray_array("deflate", bits=12), bits_stored=12, PatientAge="003Y")
    deflated = _deflated(raw)
    assert len(deflated) < len(raw)
    plain, inflated = read_image(raw), read_image(deflated)
    assert np.array_equal(np.asarray(plain.image), np.asarray(inflated.image))
    assert inflated.metadata["PatientAge"] == "003Y"


def test_damaged_deflate_stream_is_corrupt_image() -> None:
    deflated = bytearray(_deflated(dicom_bytes(xray_array("damaged", bits=12), bits_stored=12)))
    deflated[-200:] = b"\xff" * 200
    with pytest.raises(PneumoError) as caught:
        read_image(bytes(deflated))
    assert caught.value.code in ("corrupt_image", "truncated_image")


def test_jpeg_frame_larger_than_the_header_is_refused_before_decoding() -> None:
    with pytest.raises(PneumoError) as caught:
        read_image(lying_jpeg_dicom(rows=300, cols=200, frame_side=2000))
    assert caught.value.code == "corrupt_image"
    message = caught.value.message
    assert "200 x 300" in message and "2000 x 2000" in message
    assert "numpy" not in message and "shape" not in message  # words, not library internals (F2)


def test_jpeg_frame_that_matches_the_header_decodes() -> None:
    pixels = xray_array("jpeg", bits=8).astype(np.uint8)
    data = lying_jpeg_dicom(rows=pixels.shape[0], cols=pixels.shape[1], frame=Image.fromarray(pixels))
    assert pydicom.dcmread(io.BytesIO(data)).file_meta.TransferSyntaxUID == JPEGBaseline8Bit
    decoded = read_image(data)
    assert decoded.image.size == (pixels.shape[1], pixels.shape[0])
    assert np.abs(np.asarray(decoded.image, dtype=float) - pixels).mean() < 40  # lossy, min-max stretched


@pytest.mark.parametrize("mode", ["I;16", "F", "I"])
def test_deep_images_are_windowed_exactly_as_the_whole_array_formula(mode: str) -> None:
    """Banding changes nothing: the result equals round(255 (x - lo) / (hi - lo)) on the whole image."""
    rng = np.random.default_rng(1)
    if mode == "I;16":
        pixels = rng.integers(200, 4000, (1500, 900)).astype(np.uint16)
        image = Image.fromarray(pixels)
    elif mode == "F":
        pixels = rng.normal(5.0, 2.0, (1500, 900)).astype(np.float32)
        pixels[3, 3], pixels[4, 4] = np.nan, np.inf
        image = Image.fromarray(pixels, mode="F")
    else:
        pixels = rng.integers(-5000, 70000, (1500, 900)).astype(np.int32)
        image = Image.fromarray(pixels, mode="I")
    buffer = io.BytesIO()
    image.save(buffer, format="TIFF")
    values = np.nan_to_num(pixels.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = min(values.min(), 0.0), max(values.max(), 0.0)
    expected = np.round((values - lo) / (hi - lo) * 255.0).astype(np.uint8)
    assert np.array_equal(np.asarray(read_image(buffer.getvalue()).image), expected)


def test_exif_rotation_still_applies_after_the_gray_conversion() -> None:
    pixels = np.zeros((100, 200), np.uint8)
    pixels[:, :20] = 255  # a bright left edge
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", exif=exif.tobytes(), quality=95)
    upright = np.asarray(read_image(buffer.getvalue()).image)
    assert upright.shape == (200, 100)
    assert upright[:20].mean() > 200 and upright[-20:].mean() < 50  # the bright edge is now on top


def test_deflate_cap_is_enforced_on_the_stream_not_on_the_file_size() -> None:
    """A stream just over the cap is refused, although its file is tiny."""
    from pneumo.core.decode import Limits
    from pneumo.core.decode.dicom import inflate_cap

    limits = Limits(max_pixels=1_000_000)
    bomb = deflated_dicom_bomb(inflated=inflate_cap(limits.max_pixels) + 1)
    assert len(bomb) < 100_000
    # The stream really inflates past the cap (issue 20 found the old check here always true).
    from pydicom.filereader import _read_file_meta_info, read_preamble

    stream = io.BytesIO(bomb)
    read_preamble(stream, False)
    _read_file_meta_info(stream)
    cap = inflate_cap(limits.max_pixels)
    assert len(zlib.decompressobj(-zlib.MAX_WBITS).decompress(bomb[stream.tell() :], cap + 1)) == cap + 1
    with pytest.raises(PneumoError) as caught:
        read_image(bomb, limits)
    assert caught.value.code == "inflated_too_large"
