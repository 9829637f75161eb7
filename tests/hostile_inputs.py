"""The hostile inputs of issue 12, made here (no file is checked in), and a child-process memory probe.

Used by ``tests/core/test_memory_budget.py`` and ``benchmarks/memory_budget.py``. Each maker returns
the file's bytes; the big ones take a second or two and up to ~200 MB in the *calling* process,
never in the probe that measures decoding.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian, DigitalXRayImageStorageForPresentation, JPEGBaseline8Bit

GB = 2**30


def _dicom_parts(transfer_syntax: str) -> tuple[FileMetaDataset, Dataset]:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    meta.MediaStorageSOPInstanceUID = "1.2.3.4.5"
    meta.TransferSyntaxUID = transfer_syntax
    ds = Dataset()
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    return meta, ds


def _image_module(ds: Dataset, rows: int, cols: int, bits: int) -> None:
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0


def deflated_dicom_bomb(inflated: int = GB, side: int = 512) -> bytes:
    """A Deflated-transfer-syntax DICOM (~1 MB per GB) whose private OB element inflates to ``inflated`` bytes.

    The deflate stream is written in 16 MB chunks, so making it never holds the inflated bytes.
    """
    meta, head = _dicom_parts(DeflatedExplicitVRLittleEndian)
    tail = Dataset()
    tail.PatientAge = "004Y"
    _image_module(tail, side, side, 8)
    tail.PixelData = np.full((side, side), 100, np.uint8).tobytes()

    def explicit(ds: Dataset) -> bytes:
        buffer = DicomBytesIO()
        buffer.is_little_endian, buffer.is_implicit_VR = True, False
        write_dataset(buffer, ds)
        return buffer.getvalue()

    # (0009,0010) private creator, then (0009,1000) OB of ``inflated`` zeros: header written by hand
    # because pydicom would need the value in memory.
    creator = Dataset()
    creator.add_new(0x00090010, "LO", "HOSTILE")
    private_header = b"\x09\x00\x00\x10OB\x00\x00" + int(inflated).to_bytes(4, "little")
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    parts = [deflater.compress(explicit(head) + explicit(creator) + private_header)]
    chunk = bytes(16 * 2**20)
    left = inflated
    while left:
        parts.append(deflater.compress(chunk[: min(left, len(chunk))]))
        left -= min(left, len(chunk))
    parts += [deflater.compress(explicit(tail)), deflater.flush()]
    out = DicomBytesIO()
    out.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(out, meta)
    return out.getvalue() + b"".join(parts)


def lying_jpeg_dicom(
    rows: int = 1000, cols: int = 800, frame_side: int = 13000, frame: Image.Image | None = None
) -> bytes:
    """A JPEG-baseline DICOM declaring ``rows x cols`` whose real JPEG frame is ``frame`` (default: flat, square)."""
    buffer = io.BytesIO()
    (frame or Image.new("L", (frame_side, frame_side), 128)).save(buffer, format="JPEG", quality=50)
    meta, ds = _dicom_parts(JPEGBaseline8Bit)
    _image_module(ds, rows, cols, 8)
    ds.PixelData = encapsulate([buffer.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.file_meta = meta
    out = DicomBytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def flat_png16(side: int = 6000) -> bytes:
    """A flat 16-bit grayscale PNG (~70 KB for 6000 x 6000): 36 MP, just under the pixel limit."""
    buffer = io.BytesIO()
    Image.fromarray(np.full((side, side), 1000, np.uint16)).save(buffer, format="PNG")
    return buffer.getvalue()


def float_tiff(side: int = 6000) -> bytes:
    """A deflate-compressed 32-bit float TIFF of two flat halves (~0.2 MB for 6000 x 6000)."""
    pixels = np.full((side, side), 0.25, np.float32)
    pixels[side // 2 :] = 0.75
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="F").save(buffer, format="TIFF", compression="tiff_adobe_deflate")
    return buffer.getvalue()


def rgba_png(side: int = 6000) -> bytes:
    """An RGBA PNG with a gradient alpha (transparent areas become black): 4 bytes a pixel in Pillow."""
    alpha = np.broadcast_to(np.linspace(0, 255, side).astype(np.uint8), (side, side))
    pixels = np.dstack([np.full((side, side), 200, np.uint8)] * 3 + [alpha])
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="RGBA").save(buffer, format="PNG")
    return buffer.getvalue()


#: name -> (maker, the error code expected, or None when the input must decode)
HOSTILE: dict[str, tuple[Callable[[], bytes], str | None]] = {
    "deflated_dicom_1gb": (deflated_dicom_bomb, "inflated_too_large"),
    "dicom_jpeg_frame_13000": (lying_jpeg_dicom, "corrupt_image"),
    "flat_png16_6000": (flat_png16, None),
    "float_tiff_6000": (float_tiff, None),
    "rgba_png_6000": (rgba_png, None),
}

_PROBE = r"""
import json, resource, sys
from pathlib import Path
try:
    from pneumo.core.errors import PneumoError
    from pneumo.core.decode import read_image
except ImportError:  # the flat layout of earlier releases (benchmarks/memory_budget.py --before-src)
    from pneumo.errors import PneumoError
    from pneumo.io import read_image

def rss_kb(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    return 0

data = Path(sys.argv[1]).read_bytes()
try:
    read_image(Path(sys.argv[2]).read_bytes())  # warm-up: imports and decoder plugins are not the input's cost
except PneumoError:
    pass
try:  # reset the high-water mark (Linux >= 4.0), so VmHWM is the peak of what follows
    Path("/proc/self/clear_refs").write_text("5")
    reset = True
except OSError:
    reset = False
before = rss_kb("VmRSS:")
code = None
try:
    decoded = read_image(data)
except PneumoError as err:
    code = err.code
peak = rss_kb("VmHWM:") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"peak_extra_mb": round((peak - before) / 1024, 1), "code": code}))
"""


def measure_decode(data: bytes, workdir: Path, env: dict[str, str] | None = None) -> dict:
    """Decode ``data`` with ``read_image`` in a fresh child; its peak memory above the input held in memory.

    Returns ``{"peak_extra_mb", "code"}`` (``code`` None when the input decoded).
    """
    target, warm = workdir / "input.bin", workdir / "warm.png"
    target.write_bytes(data)
    Image.new("L", (128, 128), 90).save(warm)
    result = subprocess.run(
        [sys.executable, "-c", _PROBE, str(target), str(warm)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env or os.environ.copy(),
        check=False,
    )
    if result.returncode != 0:
        return {"peak_extra_mb": None, "code": None, "error": result.stderr.strip().splitlines()[-1:]}
    return json.loads(result.stdout.strip().splitlines()[-1])
