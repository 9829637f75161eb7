"""Hypothesis strategies for fuzzing bytes -> pneumo.core.decode.read_image -> preprocess, and the property checked.

Shared by tests/core/test_fuzz.py (a short, deterministic run) and benchmarks/fuzz_decode.py (the long run).
Random bytes alone rarely get past a decoder's first check, so most strategies start from *valid*
files of every format pneumo reads and damage them: flipped and overwritten bytes, cuts, inserted
junk, and header fields (PNG IHDR, JPEG SOF) set to random sizes with the checksum fixed, so the
decoder believes them.
"""

from __future__ import annotations

import functools
import struct
import zlib

import numpy as np
from bad_inputs import dicom_xray, encode, set_jpeg_size, xray_like
from hypothesis import strategies as st
from PIL import Image

from pneumo.core.decode import Limits, read_image
from pneumo.core.errors import PneumoError

#: Small caps keep every example cheap; the checks are the same at any cap.
FUZZ_LIMITS = Limits(max_bytes=1 * 2**20, max_pixels=2_000_000, min_side=64, max_aspect_ratio=4.0)
MODEL_SIDE = 64  # the preprocess input size used in the property

MAGICS = [
    b"\xff\xd8\xff",
    b"\x89PNG\r\n\x1a\n",
    b"II*\x00",
    b"MM\x00*",
    b"BM",
    b"RIFF\x00\x00\x00\x00WEBP",
    b"\x00" * 128 + b"DICM",
]


@functools.lru_cache(maxsize=1)
def seeds() -> list[bytes]:
    """Valid files of every format and flavour read_image handles."""
    gray = xray_like((72, 64))
    rgb = Image.merge("RGB", [gray, xray_like((72, 64), seed=1), gray])
    rgba = rgb.convert("RGBA")
    deep = Image.fromarray(np.asarray(gray, dtype=np.uint16) * 200)
    exif = Image.Exif()
    exif[0x0112] = 6
    return [
        encode(gray, "PNG"),
        encode(rgba, "PNG"),
        encode(rgb.quantize(16), "PNG"),
        encode(deep, "PNG"),
        encode(gray, "PNG", save_all=True, append_images=[gray]),
        encode(gray, "JPEG", quality=80),
        encode(rgb, "JPEG", progressive=True),
        encode(rgb, "JPEG", exif=exif.tobytes()),
        encode(rgb.convert("CMYK"), "JPEG"),
        encode(rgb, "MPO", save_all=True, append_images=[rgb]),
        encode(gray, "TIFF"),
        encode(rgb, "TIFF", compression="tiff_deflate"),
        encode(Image.fromarray(np.asarray(gray, dtype=np.float32)), "TIFF"),
        encode(deep, "TIFF", compression="tiff_lzw"),
        dicom_xray(),
        *_compressed_dicoms(np.asarray(gray, dtype=np.uint16) * 16),
    ]


def _compressed_dicoms(pixels: np.ndarray) -> list[bytes]:
    """The 12-bit fuzz DICOM re-encoded as JPEG 2000 (pylibjpeg-openjpeg) and RLE (pydicom), for the codec paths."""
    import io

    import pydicom
    from pydicom.uid import JPEG2000Lossless, RLELossless

    out = []
    for syntax in (JPEG2000Lossless, RLELossless):
        ds = pydicom.dcmread(io.BytesIO(dicom_xray()))
        ds.compress(syntax, pixels, encoding_plugin="pylibjpeg" if syntax == JPEG2000Lossless else "pydicom")
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        out.append(buffer.getvalue())
    return out


def _set_png_ihdr(data: bytes, width: int, height: int) -> bytes:
    if data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
        return data
    body = struct.pack(">II", width, height) + data[24:29]
    return data[:8] + data[8:12] + b"IHDR" + body + struct.pack(">I", zlib.crc32(b"IHDR" + body)) + data[33:]


def _set_size(data: bytes, width: int, height: int) -> bytes:
    if data[:3] == b"\xff\xd8\xff" and b"\xff\xc0" in data:
        return set_jpeg_size(data, min(width, 65535), min(height, 65535))
    return _set_png_ihdr(data, width, height)


@st.composite
def mutated_files(draw: st.DrawFn) -> bytes:
    """A valid seed file with 1-6 random edits (flip, overwrite, cut, insert, delete, resize header)."""
    data = bytearray(draw(st.sampled_from(seeds())))
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["flip", "set", "cut", "insert", "delete", "size"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            data[at] = draw(st.sampled_from([0x00, 0xFF, 0x7F, 0x80, draw(st.integers(0, 255))]))
        elif op == "cut":
            del data[at:]
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=64))
        elif op == "delete":
            del data[at : at + draw(st.integers(1, 64))]
        elif op == "size":
            data = bytearray(_set_size(bytes(data), *draw(size_pairs())))
    return bytes(data)


def size_pairs() -> st.SearchStrategy[tuple[int, int]]:
    """Image sizes a header may claim: zero, tiny, plausible, huge, the 31-bit maximum."""
    side = st.one_of(
        st.sampled_from([0, 1, 63, 64, 65, 2**15 - 1, 2**16 - 1, 2**16, 2**31 - 1]),
        st.integers(0, 70_000),
    )
    return st.tuples(side, side)


@st.composite
def header_sizes(draw: st.DrawFn) -> bytes:
    """A valid PNG or JPEG seed whose header claims a random size (the checksum fixed)."""
    seed = draw(st.sampled_from([s for s in seeds() if s[:3] == b"\xff\xd8\xff" or s[:4] == b"\x89PNG"]))
    return _set_size(seed, *draw(size_pairs()))


def magic_prefixed() -> st.SearchStrategy[bytes]:
    """Random bytes behind a real format signature, so they reach the format's own parser."""
    return st.builds(lambda magic, rest: magic + rest, st.sampled_from(MAGICS), st.binary(max_size=2048))


def any_input() -> st.SearchStrategy[bytes]:
    return st.one_of(st.binary(max_size=1024), magic_prefixed(), mutated_files(), header_sizes())


def decode_and_preprocess(data: bytes, limits: Limits = FUZZ_LIMITS, *, preprocess_too: bool = True) -> str:
    """The property: a finite (3, S, S) model input, or a PneumoError. Returns "ok" or the error code.

    Any other exception propagates and fails the caller. ``preprocess_too=False`` stops after
    decoding (the memory-capped child then needs no torch).
    """
    try:
        decoded = read_image(data, limits, draft_size=MODEL_SIDE)
    except PneumoError as err:
        assert err.code and err.message, "typed errors carry a code and a message"
        return err.code
    w, h = decoded.image.size
    assert decoded.image.mode == "L" and min(w, h) >= 1
    assert decoded.original_size[0] * decoded.original_size[1] <= limits.max_pixels
    if preprocess_too:
        from pneumo.core.preprocess import PreprocessConfig, preprocess

        tensor = preprocess(decoded.image, PreprocessConfig(MODEL_SIDE))
        assert tuple(tensor.shape) == (3, MODEL_SIDE, MODEL_SIDE)
        assert bool(np.isfinite(tensor).all())
    return "ok"
