"""The hostile inputs of issue 22: each refused (or decoded) with bounded work, from its structure, before decoding.

Each input is made from bytes in ``tests/hostile_decode_inputs.py``. Before the fixes every one of
them decoded (no error code) at a cost of 0.5-1.3 GB or 8-50 s of CPU (``benchmarks/hostile_decode.py``
keeps the before/after figures, measured against the previous main): so every ``code`` assertion
below failed then. Peak memory and CPU are measured by the benchmark, not asserted here, except in
the address-space-capped child (the pattern of ``test_memory_budget.py``).
"""

from __future__ import annotations

import io
import struct
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import run_with_helpers
from hostile_decode_inputs import (
    dicom_element_flood,
    j2k_codestream,
    j2k_dicom_film,
    j2k_dicom_small_codeblocks,
    progressive_jpeg,
    progressive_jpeg_dicom,
    tiff_ifd_chain,
    webp_rgba_lossless,
)
from PIL import Image

from pneumo.core.decode import DEFAULT_LIMITS, Limits, read_image
from pneumo.core.decode.codestreams import check_j2k, jpeg_scan_count
from pneumo.core.errors import InputTooLargeError, PneumoError, UnsupportedFormatError

# ------------------------------------------------------------------------------ refused from structure


@pytest.mark.parametrize(
    ("make", "code", "status"),
    [
        (lambda: progressive_jpeg(1000, 200), "too_many_scans", 413),
        (lambda: progressive_jpeg_dicom(1000, 200), "too_many_scans", 413),
        (lambda: j2k_dicom_small_codeblocks(4300), "too_many_codeblocks", 413),
        (lambda: dicom_element_flood(300_000), "too_many_elements", 413),
        (lambda: tiff_ifd_chain(100_000), "multi_frame", 400),
        (lambda: webp_rgba_lossless(6000), "unsupported_format", 415),
    ],
    ids=["progressive_jpeg", "progressive_jpeg_dicom", "j2k_4x4_codeblocks", "dicom_elements", "tiff_ifds", "webp"],
)
def test_hostile_input_is_refused_with_its_code(make, code: str, status: int) -> None:
    with pytest.raises(PneumoError) as caught:
        read_image(make())
    assert caught.value.code == code
    assert caught.value.http_status == status
    assert "0x" not in caught.value.message and len(caught.value.message) > 40


def test_scan_limit_is_the_limits_field() -> None:
    data = progressive_jpeg(256, 10)  # 6 scans of the encoder + 10 repeats
    assert jpeg_scan_count(data, 100) == 16
    assert read_image(data, Limits(max_scans=16)).original_size == (256, 256)
    with pytest.raises(InputTooLargeError, match="at least 16 JPEG scans, over the limit of 15") as caught:
        read_image(data, Limits(max_scans=15))
    assert caught.value.code == "too_many_scans"


def test_scans_of_a_thumbnail_or_a_second_image_are_not_counted() -> None:
    """Only the first image's scans count: an EXIF thumbnail and an MPO's later frames are skipped."""
    buffer = io.BytesIO()
    Image.new("L", (300, 300), 90).save(buffer, format="JPEG", progressive=True)
    progressive = buffer.getvalue()
    assert progressive.count(b"\xff\xda") == 6
    five_images = progressive * 5  # MPO-like: images one after the other
    assert jpeg_scan_count(five_images, 8) == 6
    thumb = b"\xff\xe1" + struct.pack(">H", 2 + len(progressive) * 2) + progressive * 2  # an APP1 holding 12 scans
    assert jpeg_scan_count(progressive[:2] + thumb + progressive[2:], 8) == 6
    assert read_image(five_images, Limits(max_scans=8)).original_size == (300, 300)


def test_real_progressive_films_pass() -> None:
    rgb = Image.merge("RGB", [Image.linear_gradient("L").resize((600, 500))] * 3)
    buffer = io.BytesIO()
    rgb.save(buffer, format="JPEG", progressive=True, quality=92)
    assert read_image(buffer.getvalue()).original_size == (600, 500)


def test_png_of_many_chunks_is_refused_before_pillow_reads_them() -> None:
    """1.5 M empty chunks took Pillow 4 s and 190 MB; refused at Limits.max_elements chunks."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    buffer = io.BytesIO()
    Image.new("L", (128, 128), 90).save(buffer, format="PNG")
    png = buffer.getvalue()
    flood = png[:33] + chunk(b"abCd", b"") * (DEFAULT_LIMITS.max_elements + 1) + png[33:]
    with pytest.raises(InputTooLargeError, match="PNG chunks") as caught:
        read_image(flood)
    assert caught.value.code == "too_many_chunks"
    assert read_image(png[:33] + chunk(b"abCd", b"") * 100 + png[33:]).original_size == (128, 128)


@pytest.mark.parametrize(("tile", "code"), [(32, "too_many_tiles"), (None, None)])
def test_j2k_tiles_are_bounded(tile: int | None, code: str | None) -> None:
    stream = j2k_codestream(4300, 4300, tile=tile)
    if code is None:
        assert check_j2k(stream, DEFAULT_LIMITS) == 5  # decomposition levels: what a reduced decode may drop
        return
    with pytest.raises(InputTooLargeError) as caught:
        check_j2k(stream, DEFAULT_LIMITS)
    assert caught.value.code == code


def test_small_codeblocks_declared_in_a_tile_part_header_are_found() -> None:
    """A COD in a tile-part header overrides the main header's; the count uses the worst one."""
    stream = j2k_codestream(4300, 4300, codeblock_exp=4)
    cod = b"\xff\x52" + struct.pack(">H", 12) + bytes([0, 0, 0, 1, 0, 5, 0, 0, 0, 1])  # 4 x 4 code-blocks
    sot = stream.index(b"\xff\x90")
    length = int.from_bytes(stream[sot + 6 : sot + 10], "big") + len(cod)
    patched = stream[: sot + 6] + length.to_bytes(4, "big") + stream[sot + 10 : sot + 12] + cod + stream[sot + 12 :]
    with pytest.raises(InputTooLargeError) as caught:
        check_j2k(patched, DEFAULT_LIMITS)
    assert caught.value.code == "too_many_codeblocks"


def test_formats_refused_whole_cost_nothing() -> None:
    with pytest.raises(UnsupportedFormatError, match="WebP"):
        read_image(webp_rgba_lossless(512))


# ------------------------------------------------------------------------------- decoded, bounded


def test_j2k_film_is_decoded_at_a_reduced_level_for_a_draft() -> None:
    decoded = read_image(j2k_dicom_film(4300), draft_size=224)
    assert decoded.original_size == (4300, 4300)
    assert decoded.image.size == (269, 269)  # 4300 / 16, the smallest level >= 224


def test_rle_and_a_full_size_film_decode_within_an_address_space_cap() -> None:
    """In a child that may grow by 300 MB only: the RLE bomb (1.3 GB in pydicom's RLE decoder before) decodes
    by pylibjpeg-rle, and a 4300 x 4300 16-bit DR film (refused as file_too_large before) decodes in full."""
    script = textwrap.dedent(
        """
        import resource, sys
        sys.path.insert(0, sys.argv[1])
        from hostile_decode_inputs import rle_dicom_bomb, native_dicom_film
        from bad_inputs import encode, xray_like
        from pneumo.core.decode import read_image
        inputs = [rle_dicom_bomb(), native_dicom_film(4300, 4300)]
        from app_helpers import dicom_bytes, xray_array
        read_image(dicom_bytes(xray_array(), bits_stored=12))  # warm up imports and codec plugins
        with open("/proc/self/status") as f:
            vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize"))
        resource.setrlimit(resource.RLIMIT_AS, (vm + 300 * 2**20, resource.RLIM_INFINITY))
        print(",".join(str(read_image(data).image.size) for data in inputs))
        """
    )
    if not Path("/proc/self/status").exists():
        pytest.skip("needs /proc to measure the address space")
    done = run_with_helpers(script, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "(512, 512),(4300, 4300)"


def test_rle_bomb_decodes_to_its_declared_size() -> None:
    from hostile_decode_inputs import rle_dicom_bomb

    decoded = read_image(rle_dicom_bomb(side=256, megabytes=2))
    assert decoded.image.size == (256, 256)
    assert np.asarray(decoded.image).max() == 0  # every run repeats a zero byte
