"""DICOM codecs (issue 21 item 4), honest error codes (issue 22 item 9), header reading within bounds (21 item 5).

Before: 12-bit JPEG Extended was ``corrupt_image``, JPEG Lossless SV1 and JPEG-LS were
``unsupported_transfer_syntax`` (no decoder installed), a 3520 x 4280 16-bit film was
``file_too_large``; native Pixel Data of undefined length was ``dicom_no_pixel_data`` (or decoded
shifted by an item header), an empty VOI LUT Sequence made every pixel one gray (then
``not_a_chest_xray``); the DICOM node read headers with plain ``dcmread``.
"""

from __future__ import annotations

import io
import struct

import numpy as np
import pydicom
import pytest
from app_helpers import dicom_bytes, xray_array
from codec_inputs import film, j2k_dicom, lossless_jpeg_dicom, native_dicom, pydicom_test_file
from hostile_decode_inputs import dicom_element_flood
from hostile_inputs import deflated_dicom_bomb
from pydicom.sequence import Sequence
from pydicom.uid import DeflatedExplicitVRLittleEndian

from pneumo.core.decode import DEFAULT_LIMITS, Limits, read_image
from pneumo.core.decode.dicom import read_header
from pneumo.core.errors import DicomError, InputTooLargeError

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:pydicom")


def _gray(data: bytes, **kwargs: object) -> np.ndarray:
    return np.asarray(read_image(data, **kwargs).image)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------- codecs


@pytest.mark.parametrize("bits", [12, 16])
@pytest.mark.parametrize("codec", ["jpeg_lossless_sv1", "jpeg2000"])
def test_lossless_codecs_decode_exactly_like_the_uncompressed_film(codec: str, bits: int) -> None:
    pixels = film(256, 200, bits)
    data = lossless_jpeg_dicom(pixels, bits) if codec == "jpeg_lossless_sv1" else j2k_dicom(pixels, bits)
    assert np.array_equal(_gray(data), _gray(native_dicom(pixels, bits)))


def test_12_bit_jpeg_extended_decodes() -> None:
    """pydicom's own 12-bit JPEG Extended test file (Pillow reads 8-bit JPEG only; libjpeg reads 12-bit)."""
    data = pydicom_test_file("JPGExtended.dcm")
    assert pydicom.dcmread(io.BytesIO(data)).file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.51"
    decoded = read_image(data)
    assert decoded.original_size == (256, 1024)
    pixels = np.asarray(decoded.image)
    assert pixels.min() == 0 and pixels.max() == 255 and pixels.std() > 20


def test_jpeg_ls_lossless_decodes_exactly_like_its_uncompressed_twin() -> None:
    """pydicom ships the same MR slice uncompressed and JPEG-LS lossless: both must give the same bytes."""
    assert np.array_equal(
        _gray(pydicom_test_file("MR_small_jpeg_ls_lossless.dcm")), _gray(pydicom_test_file("MR_small.dcm"))
    )


def test_full_size_dr_film_is_read() -> None:
    """A 3520 x 4280 16-bit DR film is 28.7 MB: refused against the 20 MB limit before (issue 21)."""
    pixels = film(4280, 3520, 14)
    data = native_dicom(pixels, 14)
    assert len(data) > 28 * 10**6
    decoded = read_image(data, draft_size=224)
    assert decoded.original_size == (3520, 4280)


@pytest.mark.parametrize("signed", [False, True])
def test_reduced_j2k_draft_is_the_full_decode_scaled_down(signed: bool) -> None:
    """A JPEG 2000 draft is its wavelet's low-resolution level: the full film, box-averaged, within a gray level."""
    pixels = film(1024, 768, 12).astype(np.int32) - (2048 if signed else 0)
    data = j2k_dicom(pixels, 12, signed=signed)
    full, draft = read_image(data).image, read_image(data, draft_size=180).image
    assert draft.size == (192, 256)  # 1/4: the smallest level whose shorter side is still >= 180
    expected = np.asarray(full.resize(draft.size, reducing_gap=None, resample=4), dtype=float)  # 4: BOX
    assert np.abs(np.asarray(draft, dtype=float) - expected).mean() < 1.5


def test_a_damaged_rle_segment_that_panics_the_rust_decoder_is_corrupt_image() -> None:
    """Found by benchmarks/fuzz_decode.py: one byte of the fuzz RLE seed makes pylibjpeg-rle panic (index out of
    bounds); pyo3's PanicException is a BaseException, so it escaped every ``except Exception``."""
    from fuzz_strategies import seeds

    (seed,) = [s for s in seeds() if b"1.2.840.10008.1.2.5\x00" in s]
    damaged = bytearray(seed)
    assert damaged[620 + 9171] == 0x00  # the byte the fuzzer changed (the seed is deterministic)
    damaged[620 + 9171] = 0x33  # the frame starts at 620; 9171 is in the last segment's final run
    with pytest.raises(DicomError, match="cannot be decoded") as caught:
        read_image(bytes(damaged))
    assert caught.value.code == "corrupt_image"


# ------------------------------------------------------------------------- honest codes (22 item 9)


def _pixel_data_at(raw: bytes) -> tuple[int, bytes]:
    at = raw.index(b"\xe0\x7f\x10\x00")
    length = struct.unpack("<I", raw[at + 8 : at + 12])[0]
    return at, raw[at + 12 : at + 12 + length]


@pytest.mark.parametrize("ending", ["no delimiter", "an item and a delimiter"])
def test_native_pixel_data_of_undefined_length_is_corrupt_not_missing(ending: str) -> None:
    raw = dicom_bytes(xray_array("u", bits=12), bits_stored=12)
    at, pixels = _pixel_data_at(raw)
    head = raw[:at] + b"\xe0\x7f\x10\x00OW\x00\x00\xff\xff\xff\xff"
    if ending == "no delimiter":
        data = head + pixels
    else:  # before: decoded, shifted by the 8 bytes of the item header
        data = head + b"\xfe\xff\x00\xe0" + struct.pack("<I", len(pixels)) + pixels + b"\xfe\xff\xdd\xe0" + bytes(4)
    with pytest.raises(DicomError, match="undefined length") as caught:
        read_image(data)
    assert caught.value.code == "corrupt_image"
    assert caught.value.http_status == 422


def test_empty_voi_lut_sequence_is_ignored() -> None:
    raw = dicom_bytes(xray_array("voi", bits=12), bits_stored=12)
    ds = pydicom.dcmread(io.BytesIO(raw))
    ds.VOILUTSequence = Sequence([])
    buffer = io.BytesIO()
    ds.save_as(buffer)
    shown = _gray(buffer.getvalue())
    assert shown.std() > 20  # before: one gray everywhere
    assert np.array_equal(shown, _gray(raw))


# ----------------------------------------------------------------------------------- read_header


def test_read_header_returns_the_header_without_pixels() -> None:
    raw = dicom_bytes(xray_array(), PatientAge="004Y", ViewPosition="PA")
    ds = read_header(raw, DEFAULT_LIMITS)
    assert ds.PatientAge == "004Y" and ds.ViewPosition == "PA" and ds.Modality == "DX"
    assert "PixelData" not in ds
    assert ds.file_meta.TransferSyntaxUID == pydicom.dcmread(io.BytesIO(raw)).file_meta.TransferSyntaxUID


def test_read_header_of_a_deflated_dataset() -> None:
    ds = pydicom.dcmread(io.BytesIO(dicom_bytes(xray_array(), PatientAge="007Y")))
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    header = read_header(buffer.getvalue(), DEFAULT_LIMITS)
    assert header.PatientAge == "007Y" and "PixelData" not in header


def test_read_header_refuses_a_deflate_bomb_inflating_at_most_the_cap() -> None:
    """1 MB on disk, 1 GB inflated: plain dcmread added 2.2 GB in the DICOM node (issue 21 item 5)."""
    with pytest.raises(InputTooLargeError, match="inflates to more than") as caught:
        read_header(deflated_dicom_bomb(inflated=300 * 2**20), DEFAULT_LIMITS)
    assert caught.value.code == "inflated_too_large"


def test_read_header_counts_elements() -> None:
    with pytest.raises(InputTooLargeError, match="data elements") as caught:
        read_header(dicom_element_flood(20_000), Limits(max_elements=10_000))
    assert caught.value.code == "too_many_elements"
    assert read_header(dicom_element_flood(5_000), Limits(max_elements=10_000)).Modality == "DX"


def test_read_header_of_something_else_is_a_typed_error() -> None:
    with pytest.raises(DicomError, match="cannot be parsed") as caught:
        read_header(b"patient: 12\n" * 20, DEFAULT_LIMITS)
    assert caught.value.code == "corrupt_image"
