"""The hostile inputs of issue 22 (and the DICOM decoders of issue 21), made here from bytes: no file is checked in.

Each maker returns a file's bytes. They are small to store and cheap to make, and before the fixes
of issue 22 each one cost far more to decode than its size suggests (the second red-team round):

* a JPEG 2000 frame in a DICOM whose 4 x 4 code-blocks make OpenJPEG allocate a structure per
  16 pixels (+1.2 GB for a 4300 x 4300 film of 102 codestream bytes);
* a lossless RGBA WebP of 6000 x 6000 (1.4 KB, +515 MB);
* a DICOM of 1.5 million empty elements (18.5 MB, +580 MB and 7 s to parse);
* an RLE DICOM whose segment of repeat runs expands 64-fold (+1.3 GB in pydicom's own RLE decoder);
* a progressive JPEG whose last scan repeats 5,000 times (~551 KB; each truncated scan with a
  restart interval of one MCU makes libjpeg walk every block again), alone and inside a DICOM;
* a TIFF of 100,000 IFDs (Pillow's frame count is quadratic in them).

``benchmarks/hostile_decode.py`` measures each one's peak memory and CPU time; the tests in
``tests/core/test_hostile_decode.py`` check the answer each gets.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Callable

import numpy as np
from hostile_inputs import _dicom_parts, _image_module, deflated_dicom_bomb
from PIL import Image
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, JPEGBaseline8Bit, RLELossless

# ------------------------------------------------------------------------------------- JPEG 2000


def _segment(marker: bytes, body: bytes) -> bytes:
    return marker + struct.pack(">H", len(body) + 2) + body


def j2k_codestream(
    width: int, height: int, *, codeblock_exp: int = 4, levels: int = 5, bits: int = 16, tile: int | None = None
) -> bytes:
    """A valid JPEG 2000 codestream of a flat image whose every packet is empty (about 100 bytes at any size).

    ``codeblock_exp`` is the code-block side as a power of two minus 2 (0 -> 4 x 4, 4 -> 64 x 64, the
    usual); ``tile`` the tile side (default: one tile). Only tile 0 has data: the decoder fills the rest.
    """
    tile_w, tile_h = (tile, tile) if tile else (width, height)
    siz = struct.pack(">HIIIIIIIIH", 0, width, height, 0, 0, tile_w, tile_h, 0, 0, 1) + bytes([bits - 1, 1, 1])
    cod = bytes([0, 0]) + struct.pack(">H", 1) + bytes([0, levels, codeblock_exp, codeblock_exp, 0, 1])
    qcd = bytes([0x20]) + bytes([(bits + 1) << 3] * (3 * levels + 1))  # reversible: one exponent per subband
    packets = b"\x00" * (levels + 1)  # one empty packet per resolution (one layer, one precinct)
    tile_part_length = 12 + 2 + len(packets)
    tile_part = _segment(b"\xff\x90", struct.pack(">HIBB", 0, tile_part_length, 0, 1)) + b"\xff\x93" + packets
    main = _segment(b"\xff\x51", siz) + _segment(b"\xff\x52", cod) + _segment(b"\xff\x5c", qcd)
    return b"\xff\x4f" + main + tile_part + b"\xff\xd9"


def encapsulated_dicom(frame: bytes, syntax: str, rows: int, cols: int, bits: int) -> bytes:
    """A single-frame DX DICOM holding ``frame`` (a compressed codestream) under transfer syntax ``syntax``."""
    meta, ds = _dicom_parts(syntax)
    _image_module(ds, rows, cols, bits)
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR = "OB"
    ds.file_meta = meta
    out = DicomBytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def j2k_dicom_small_codeblocks(side: int = 4300, codeblock_exp: int = 0) -> bytes:
    """A 16-bit ``side`` x ``side`` JPEG 2000 DICOM with 4 x 4 code-blocks (~1.2 M of them): ~800 bytes."""
    return encapsulated_dicom(j2k_codestream(side, side, codeblock_exp=codeblock_exp), JPEG2000Lossless, side, side, 16)


def j2k_dicom_film(side: int = 4300) -> bytes:
    """A 16-bit ``side`` x ``side`` JPEG 2000 DICOM with the usual 64 x 64 code-blocks: a legitimate film's cost."""
    return encapsulated_dicom(j2k_codestream(side, side, codeblock_exp=4), JPEG2000Lossless, side, side, 16)


# ---------------------------------------------------------------------------------------- WebP


def webp_rgba_lossless(side: int = 6000) -> bytes:
    """A flat lossless RGBA WebP (1-2 KB at 6000 x 6000)."""
    buffer = io.BytesIO()
    Image.new("RGBA", (side, side), (120, 120, 120, 200)).save(buffer, format="WEBP", lossless=True)
    return buffer.getvalue()


# --------------------------------------------------------------------------------------- DICOM


def dicom_element_flood(count: int = 1_500_000, side: int = 256) -> bytes:
    """A valid small DX DICOM with ``count`` empty private LO elements (8 bytes each) before its pixel data."""
    meta, ds = _dicom_parts(ExplicitVRLittleEndian)
    _image_module(ds, side, side, 8)
    ds.file_meta = meta
    head = DicomBytesIO()
    ds.save_as(head, enforce_file_format=True)
    # (gggg,eeee) LO, length 0: groups 0x0029, 0x002B, ... (odd, private, after the image module
    # group 0x0028 and before the pixel data's 0x7FE0), elements 0x1000-0xFFFF in each.
    per_group = 0xF000
    index = np.arange(count)
    records = np.zeros(count, dtype=[("group", "<u2"), ("element", "<u2"), ("vr", "S2"), ("length", "<u2")])
    records["group"] = 0x0029 + 2 * (index // per_group)
    records["element"] = 0x1000 + index % per_group
    records["vr"] = b"LO"
    pixels = np.full((side, side), 90, np.uint8).tobytes()
    pixel_element = struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, len(pixels)) + pixels
    return head.getvalue() + records.tobytes() + pixel_element


def rle_dicom_bomb(side: int = 512, megabytes: int = 19) -> bytes:
    """An 8-bit RLE DICOM whose single segment is ``megabytes`` of 2-byte runs, each expanding to 128 bytes (64x)."""
    header = struct.pack("<16I", 1, 64, *([0] * 14))
    segment = b"\x81\x00" * (megabytes * 2**20 // 2)
    return encapsulated_dicom(header + segment, RLELossless, side, side, 8)


def native_dicom_film(rows: int = 4300, cols: int = 4300) -> bytes:
    """A 16-bit uncompressed DX film of ``rows`` x ``cols`` (37 MB at 4300 x 4300): what a DR detector writes."""
    meta, ds = _dicom_parts(ExplicitVRLittleEndian)
    _image_module(ds, rows, cols, 16)
    ds.BitsStored, ds.HighBit = 14, 13
    y, x = np.mgrid[0:rows, 0:cols]
    ds.PixelData = ((x + y) * 16383 // (rows + cols)).astype(np.uint16).tobytes()
    ds.file_meta = meta
    out = DicomBytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


# ---------------------------------------------------------------------------------------- JPEG


def progressive_jpeg(side: int = 4000, repeats: int = 5000, keep: int = 100) -> bytes:
    """A progressive gray JPEG with a restart interval of one MCU whose last scan (cut to ``keep`` bytes) repeats.

    Each repeated scan runs out of data at once; at every restart boundary libjpeg resets its
    out-of-data flag and walks on, so every scan costs a pass over all the image's blocks.
    """
    y, x = np.mgrid[0:side, 0:side]
    buffer = io.BytesIO()
    Image.fromarray(((x + y) * 255 // (2 * side)).astype(np.uint8)).save(
        buffer, format="JPEG", progressive=True, quality=90
    )
    data = buffer.getvalue()
    first = data.index(b"\xff\xda")
    data = data[:first] + b"\xff\xdd\x00\x04\x00\x01" + data[first:]  # DRI: a restart marker every MCU
    last = data.rindex(b"\xff\xda")
    header = struct.unpack(">H", data[last + 2 : last + 4])[0]
    scan = data[last : last + 2 + header + keep]
    return data[:-2] + scan * repeats + b"\xff\xd9"


def progressive_jpeg_dicom(side: int = 4000, repeats: int = 5000) -> bytes:
    """The same progressive JPEG inside a JPEG-baseline DICOM (pydicom hands it to Pillow, which accepts it)."""
    return encapsulated_dicom(progressive_jpeg(side, repeats), JPEGBaseline8Bit, side, side, 8)


# ---------------------------------------------------------------------------------------- TIFF


def tiff_ifd_chain(ifds: int = 100_000, side: int = 64) -> bytes:
    """A little-endian TIFF of ``ifds`` valid pages that all share one ``side`` x ``side`` 8-bit strip."""
    strip_at = 8
    first_ifd = strip_at + side * side
    entries = [  # (tag, type, count, value): SHORT = 3, LONG = 4
        (256, 3, 1, side),
        (257, 3, 1, side),
        (258, 3, 1, 8),
        (259, 3, 1, 1),
        (262, 3, 1, 1),
        (273, 4, 1, strip_at),
        (277, 3, 1, 1),
        (278, 3, 1, side),
        (279, 4, 1, side * side),
    ]
    ifd_size = 2 + 12 * len(entries) + 4
    body = b"".join(struct.pack("<HHII", *entry) for entry in entries)
    parts = [b"II*\x00" + struct.pack("<I", first_ifd), bytes(range(64)) * (side * side // 64)]
    for index in range(ifds):
        following = first_ifd + (index + 1) * ifd_size if index + 1 < ifds else 0
        parts.append(struct.pack("<H", len(entries)) + body + struct.pack("<I", following))
    return b"".join(parts)


#: name -> (maker, the error code read_image must answer after the fix, or None when the input must decode)
HOSTILE_22: dict[str, tuple[Callable[[], bytes], str | None]] = {
    "j2k_dicom_4x4_codeblocks": (j2k_dicom_small_codeblocks, "too_many_codeblocks"),
    "webp_rgba_lossless_6000": (webp_rgba_lossless, "unsupported_format"),
    "dicom_1.5m_empty_elements": (dicom_element_flood, "too_many_elements"),
    "rle_dicom_64x_segment": (rle_dicom_bomb, None),
    "progressive_jpeg_5000_scans": (progressive_jpeg, "too_many_scans"),
    "progressive_jpeg_dicom_5000_scans": (progressive_jpeg_dicom, "too_many_scans"),
    "tiff_100k_ifds": (tiff_ifd_chain, "multi_frame"),
    "deflated_dicom_1gb_header": (deflated_dicom_bomb, "inflated_too_large"),
    "dr_film_native_4300x4300_16bit": (native_dicom_film, None),
    "j2k_dicom_film_4300x4300": (j2k_dicom_film, None),
}
