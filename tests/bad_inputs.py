"""Factories of good and bad image files, shared by test_io.py and test_fuzz.py.

Each bad-input class a user can send is one entry of :data:`BAD_INPUTS` with the error class and
stable code pneumo must answer with; docs/reliability.md lists the same table.
"""

from __future__ import annotations

import functools
import io
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image

from pneumo.core.errors import DicomError, InputTooLargeError, InvalidImageError, PneumoError, UnsupportedFormatError


def xray_like(size: tuple[int, int] = (96, 96), seed: int = 0) -> Image.Image:
    """A small grayscale picture with structure (gradient, two dark ellipses, noise)."""
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    image = 40 + 150 * (x / w) + np.random.default_rng(seed).normal(0, 10, (h, w))
    for cx in (0.3, 0.7):
        image[((x / w - cx) / 0.15) ** 2 + ((y / h - 0.5) / 0.3) ** 2 < 1] -= 30
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8), mode="L")


def encode(image: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


@functools.lru_cache(maxsize=8)
def png_with_size(width: int, height: int, real_pixels: bool = False) -> bytes:
    """A grayscale PNG whose header claims ``width`` x ``height``.

    With ``real_pixels`` the IDAT really holds that many (zero) pixels, compressed ~1000:1 like a
    true decompression bomb (streamed, so building it needs no memory); otherwise it holds a
    few bytes only (a lying header).
    """
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    compressor = zlib.compressobj(6)
    if real_pixels:
        rows = b"\x00" * ((width + 1) * 256)  # filter byte + pixels, 256 rows at a time
        parts = [compressor.compress(rows[: (width + 1) * min(256, height - y)]) for y in range(0, height, 256)]
        body = b"".join(parts) + compressor.flush()
    else:
        body = compressor.compress(b"\x00" * 64) + compressor.flush()
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", body) + _chunk(b"IEND", b"")


def set_png_size(data: bytes, width: int, height: int) -> bytes:
    """A PNG with its IHDR width/height replaced (and the CRC fixed, so only the size is wrong)."""
    ihdr = struct.pack(">II", width, height) + data[24:29]
    return data[:8] + _chunk(b"IHDR", ihdr) + data[33:]


def set_jpeg_size(data: bytes, width: int, height: int) -> bytes:
    """A baseline JPEG with its SOF0 frame size replaced (values are 16-bit: at most 65535)."""
    at = data.index(b"\xff\xc0")
    return data[: at + 5] + struct.pack(">HH", height, width) + data[at + 9 :]


def exif_rotated_jpeg(orientation: int) -> tuple[bytes, Image.Image]:
    """A 128 x 80 JPEG with an EXIF Orientation tag, and the stored (un-rotated) picture."""
    image = Image.new("L", (128, 80), 30)
    image.paste(230, (0, 0, 32, 20))  # a bright marker in the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(image, "JPEG", exif=exif.tobytes(), quality=95), image


def dicom_xray() -> bytes:
    """A 72 x 64, 12-bit MONOCHROME2 Digital X-Ray DICOM with a window (pydicom only: no model imports)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=["pneumo-fuzz"])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    pixels = np.asarray(xray_like((72, 64)), dtype=np.uint16) * 16
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.WindowCenter, ds.WindowWidth = 2000, 3000
    ds.PixelData = pixels.tobytes()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _dicom_bad_transfer_syntax() -> bytes:
    """A DICOM whose TransferSyntaxUID is not a transfer syntax (found by atheris: ValueError in pydicom)."""
    data = dicom_xray()
    assert data.count(b"1.2.840.10008.1.2.1\x00") == 1
    return data.replace(b"1.2.840.10008.1.2.1\x00", b"1.2.840.1000\xbe.1.2.1\x00")


@dataclass(frozen=True)
class BadInput:
    """One class of bad input, how to make one, and what pneumo must answer."""

    name: str
    make: Callable[[], bytes]
    error: type[PneumoError]
    code: str


def _truncated(fmt: str) -> Callable[[], bytes]:
    def make() -> bytes:
        data = encode(xray_like((256, 256)), fmt)
        return data[: len(data) // 2]

    return make


def _bad_crc() -> bytes:
    data = bytearray(encode(xray_like(), "PNG"))
    data[20] ^= 0xFF  # inside IHDR: its CRC no longer matches
    return bytes(data)


def _tiff_second_page_without_size() -> bytes:
    """Two-page TIFF whose second page lost its width/height tags (found by atheris: TypeError in n_frames)."""
    data = bytearray(encode(xray_like(), "TIFF", save_all=True, append_images=[xray_like(seed=1)]))
    first = struct.unpack("<I", data[4:8])[0]
    count = struct.unpack("<H", data[first : first + 2])[0]
    second = struct.unpack("<I", data[first + 2 + 12 * count : first + 6 + 12 * count])[0]
    for entry in range(struct.unpack("<H", data[second : second + 2])[0]):
        at = second + 2 + 12 * entry
        if struct.unpack("<H", data[at : at + 2])[0] in (256, 257):  # ImageWidth, ImageLength
            data[at : at + 2] = struct.pack("<H", 0x7FFF)
    return bytes(data)


BAD_INPUTS: list[BadInput] = [
    BadInput("empty file", lambda: b"", InvalidImageError, "empty_file"),
    BadInput("plain text", lambda: b"patient: 12\nfindings: none\n" * 10, UnsupportedFormatError, "unsupported_format"),
    BadInput(
        "PDF report",
        lambda: b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n" + b"0" * 300,
        UnsupportedFormatError,
        "unsupported_format",
    ),
    BadInput("ZIP archive", lambda: b"PK\x03\x04" + b"\x00" * 200, UnsupportedFormatError, "unsupported_format"),
    BadInput(
        "HTML page",
        lambda: b"<!doctype html><html><body>x-ray</body></html>",
        UnsupportedFormatError,
        "unsupported_format",
    ),
    BadInput(
        "GIF (not a radiograph format)",
        lambda: encode(xray_like(), "GIF"),
        UnsupportedFormatError,
        "unsupported_format",
    ),
    BadInput("JPEG magic bytes only", lambda: b"\xff\xd8\xff", InvalidImageError, "corrupt_image"),
    BadInput("PNG signature only", lambda: b"\x89PNG\r\n\x1a\n", InvalidImageError, "corrupt_image"),
    BadInput("PNG with a broken header CRC", _bad_crc, InvalidImageError, "corrupt_image"),
    BadInput("truncated JPEG", _truncated("JPEG"), InvalidImageError, "truncated_image"),
    BadInput("truncated PNG", _truncated("PNG"), InvalidImageError, "truncated_image"),
    BadInput(
        "PNG bomb header, 100k x 100k", lambda: png_with_size(100_000, 100_000), InputTooLargeError, "too_many_pixels"
    ),
    BadInput(
        "real PNG bomb, 7000 x 7000 zeros in 50 KB",
        lambda: png_with_size(7000, 7000, real_pixels=True),
        InputTooLargeError,
        "too_many_pixels",
    ),
    BadInput(
        "JPEG bomb header, 60000 x 60000",
        lambda: set_jpeg_size(encode(xray_like(), "JPEG"), 60000, 60000),
        InputTooLargeError,
        "too_many_pixels",
    ),
    BadInput(
        "image under 64 px on a side", lambda: encode(xray_like((200, 40)), "PNG"), InvalidImageError, "image_too_small"
    ),
    BadInput(
        "aspect ratio over 4:1", lambda: encode(xray_like((600, 120)), "PNG"), InvalidImageError, "bad_aspect_ratio"
    ),
    BadInput(
        "animated PNG (2 frames)",
        lambda: encode(xray_like(), "PNG", save_all=True, append_images=[xray_like(seed=1)]),
        InvalidImageError,
        "multi_frame",
    ),
    BadInput(
        "multi-page TIFF",
        lambda: encode(xray_like(), "TIFF", save_all=True, append_images=[xray_like(seed=1)]),
        InvalidImageError,
        "multi_frame",
    ),
    BadInput("DICOM with a malformed transfer syntax UID", _dicom_bad_transfer_syntax, DicomError, "corrupt_image"),
    # A second page is refused from the first page's link, before its damage is read (issue 22: Pillow's
    # page count walks every page, 100k pages took 52 s); before, this was corrupt_image.
    BadInput("TIFF with a damaged second page", _tiff_second_page_without_size, InvalidImageError, "multi_frame"),
    # Formats without clinical use are refused whole (docs/reliability.md, "Formats").
    BadInput(
        "WebP (not a radiograph format)",
        lambda: encode(xray_like(), "WEBP"),
        UnsupportedFormatError,
        "unsupported_format",
    ),
    BadInput(
        "BMP (not a radiograph format)",
        lambda: encode(xray_like(), "BMP"),
        UnsupportedFormatError,
        "unsupported_format",
    ),
    BadInput(
        "TIFF with JPEG compression",
        lambda: encode(xray_like().convert("RGB"), "TIFF", compression="jpeg"),
        UnsupportedFormatError,
        "unsupported_format",
    ),
]
