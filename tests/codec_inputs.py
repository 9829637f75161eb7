"""Legitimate compressed DICOM films, made in the tests: one per codec family pneumo reads (issue 21).

* JPEG 2000: pylibjpeg-openjpeg's encoder (a base dependency);
* JPEG Lossless SV1: :func:`lossless_jpeg_sv1`, a minimal encoder written here from ITU-T T.81
  (Annex H: predictor 1, one Huffman table, no restart) because no installed library writes it;
* 12-bit JPEG Extended and JPEG-LS: the files pydicom ships for its own tests (written by real
  encoders), relabelled as DX.
"""

from __future__ import annotations

import io
import struct
from pathlib import Path

import numpy as np
import pydicom
from hostile_decode_inputs import encapsulated_dicom
from hostile_inputs import _dicom_parts, _image_module
from pydicom.filebase import DicomBytesIO
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, JPEGLosslessSV1


def film(rows: int = 256, cols: int = 200, bits: int = 12, seed: int = 0) -> np.ndarray:
    """A smooth film-like gradient with noise, using ``bits`` bits (unsigned)."""
    y, x = np.mgrid[0:rows, 0:cols]
    values = (x / cols + y / rows) / 2 * (2**bits - 1)
    values += np.random.default_rng(seed).normal(0, 2 ** (bits - 8), (rows, cols))
    return np.clip(np.round(values), 0, 2**bits - 1).astype(np.uint16)


def native_dicom(pixels: np.ndarray, bits: int, signed: bool = False) -> bytes:
    """An uncompressed DX DICOM of ``pixels`` (16 bits allocated, ``bits`` stored)."""
    meta, ds = _dicom_parts(ExplicitVRLittleEndian)
    _image_module(ds, *pixels.shape, 16)
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits - 1, int(signed)
    ds.PixelData = pixels.astype(np.int16 if signed else np.uint16).tobytes()
    ds.file_meta = meta
    out = DicomBytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def j2k_dicom(pixels: np.ndarray, bits: int, signed: bool = False) -> bytes:
    """A JPEG 2000 lossless DX DICOM of ``pixels`` (OpenJPEG, 5 decomposition levels, 64 x 64 code-blocks)."""
    import openjpeg

    codestream = openjpeg.encode(pixels.astype(np.int16 if signed else np.uint16), bits_stored=bits, use_mct=False)
    data = encapsulated_dicom(bytes(codestream), JPEG2000Lossless, *pixels.shape, 16)
    ds = pydicom.dcmread(io.BytesIO(data))
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits - 1, int(signed)
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def lossless_jpeg_sv1(pixels: np.ndarray, precision: int) -> bytes:
    """A JPEG Lossless (Process 14, selection value 1) codestream of a 2-D unsigned array."""
    rows, cols = pixels.shape
    x = pixels.astype(np.int64)
    predicted = np.empty_like(x)
    predicted[0, 0] = 1 << (precision - 1)
    predicted[0, 1:] = x[0, :-1]  # first row: the left neighbour
    predicted[1:, 0] = x[:-1, 0]  # first column: the one above
    predicted[1:, 1:] = x[1:, :-1]  # selection value 1: the left neighbour
    diff = (x - predicted + 32768) % 65536 - 32768
    bits = []
    for value in diff.ravel().tolist():
        size = 16 if value == -32768 else abs(value).bit_length()
        bits.append(format(size, "05b"))  # 17 symbols, every code 5 bits long: code = symbol
        if 0 < size < 16:
            bits.append(format(value if value > 0 else value + (1 << size) - 1, f"0{size}b"))
    stream = "".join(bits)
    stream += "1" * (-len(stream) % 8)
    entropy = int(stream, 2).to_bytes(len(stream) // 8, "big").replace(b"\xff", b"\xff\x00")
    sof = struct.pack(">HBHHBBBB", 11, precision, rows, cols, 1, 1, 0x11, 0)
    dht = struct.pack(">HB", 36, 0) + bytes([0, 0, 0, 0, 17] + [0] * 11) + bytes(range(17))
    sos = struct.pack(">HBBBBBB", 8, 1, 1, 0x00, 1, 0, 0)
    return b"\xff\xd8\xff\xc3" + sof + b"\xff\xc4" + dht + b"\xff\xda" + sos + entropy + b"\xff\xd9"


def lossless_jpeg_dicom(pixels: np.ndarray, bits: int) -> bytes:
    data = encapsulated_dicom(lossless_jpeg_sv1(pixels, bits), JPEGLosslessSV1, *pixels.shape, 16)
    ds = pydicom.dcmread(io.BytesIO(data))
    ds.BitsStored, ds.HighBit = bits, bits - 1
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def pydicom_test_file(name: str) -> bytes:
    """One of the files pydicom ships for its tests, relabelled as a DX radiograph (pixel data untouched)."""
    path = Path(pydicom.__file__).parent / "data" / "test_files" / name
    ds = pydicom.dcmread(path)
    ds.Modality = "DX"
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()
