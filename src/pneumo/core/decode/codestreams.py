"""How much work a file asks for, read from its structure before any pixel is decoded.

The decoders pneumo relies on are linear in what a file *declares*, not in its size: libjpeg walks
every block once per progressive scan, OpenJPEG allocates a structure per code-block and per tile,
Pillow's PNG reader and TIFF frame count loop in Python over chunks and pages. A file of a few
hundred bytes can therefore declare minutes of work or gigabytes of bookkeeping (issue 22). The
walkers here read only marker and chunk headers (C-speed searches for the bulk of the bytes, a
Python step per structure) and refuse, with a 413 and a stable code, what no real film needs:

* :func:`check_jpeg_scans`: SOS markers of a JPEG or JPEG-LS codestream (``too_many_scans``);
* :func:`check_j2k`: tiles and code-blocks of a JPEG 2000 codestream (``too_many_tiles``,
  ``too_many_codeblocks``), and the decomposition levels a reduced decode may use;
* :func:`check_png_chunks`: PNG chunks (``too_many_chunks``);
* :func:`tiff_has_more_pages`: whether a TIFF's first page links to another one (Pillow's
  ``n_frames`` walks every page, quadratically).

No library offers these counts without decoding, so they are written here, each a few lines over
the formats' published marker layouts (ITU-T T.81 B.1, T.800 A, PNG 5.3, TIFF 6.0 section 2).
"""

from __future__ import annotations

import math
import re
import struct

from pneumo.core.decode.common import Limits
from pneumo.core.errors import InputTooLargeError

#: A marker inside entropy-coded JPEG data: 0xFF followed by neither 0x00 (a stuffed byte), a
#: restart marker (0xD0-0xD7) nor another 0xFF (fill). JPEG-LS stuffs bits instead (0xFF is then
#: followed by a byte under 0x80), which this never matches either.
_JPEG_MARKER = re.compile(rb"\xff[\xc0-\xcf\xd8-\xfe]")
_SOS = b"\xff\xda"


def _too_many(what: str, count: int, limit: int, code: str) -> InputTooLargeError:
    return InputTooLargeError(
        f"The file holds at least {count:,} {what}, over the limit of {limit:,}; no radiograph "
        "needs that many, and each one costs decoding work. The file is damaged or built to stall the decoder; "
        "export the image again.",
        code=code,
    )


def jpeg_scan_count(data: bytes | memoryview, stop_after: int) -> int:
    """Scans (SOS markers) of the first image of a JPEG codestream, counting at most to ``stop_after + 1``.

    Marker segments are skipped by their length, so a thumbnail inside EXIF or a second image of
    an MPO file is not counted; entropy-coded data is skipped by a regular-expression search.
    """
    data = bytes(data)
    if data.count(_SOS) <= stop_after:  # an upper bound, at memchr speed: real files stop here
        return data.count(_SOS)
    scans, pos, end = 0, 2, len(data)
    while pos + 4 <= end and scans <= stop_after:
        if data[pos] != 0xFF or data[pos + 1] == 0xFF:  # padding or fill bytes: find the next marker
            found = _JPEG_MARKER.search(data, pos + 1)
            if found is None:
                break
            pos = found.start()
            continue
        marker = data[pos + 1]
        if marker == 0xD9:  # EOI: the first image ends here
            break
        if 0xD0 <= marker <= 0xD8 or marker == 0x01:  # markers without a length
            pos += 2
            continue
        pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
        if marker == 0xDA:
            scans += 1
            found = _JPEG_MARKER.search(data, pos)  # the scan's entropy-coded data runs to the next marker
            if found is None:
                break
            pos = found.start()
    return scans


def check_jpeg_scans(data: bytes | memoryview, limits: Limits) -> None:
    """Refuse a JPEG (or JPEG-LS) codestream with more than ``limits.max_scans`` scans, before decoding it."""
    scans = jpeg_scan_count(data, limits.max_scans)
    if scans > limits.max_scans:
        raise _too_many("JPEG scans", scans, limits.max_scans, "too_many_scans")


def check_png_chunks(data: bytes, limits: Limits) -> None:
    """Refuse a PNG of more than ``limits.max_elements`` chunks (Pillow reads each in Python: 1.5 M take 4 s)."""
    pos, chunks, end = 8, 0, len(data)
    while pos + 8 <= end:
        length = int.from_bytes(data[pos : pos + 4], "big")
        chunks += 1
        if chunks > limits.max_elements:
            raise _too_many("PNG chunks", chunks, limits.max_elements, "too_many_chunks")
        if data[pos + 4 : pos + 8] == b"IEND":
            return
        pos += 12 + length


def tiff_has_more_pages(data: bytes) -> bool:
    """Whether the first IFD of a classic TIFF links to a next one (Pillow's ``n_frames`` would walk them all)."""
    order = "<" if data[:2] == b"II" else ">"
    try:
        (first,) = struct.unpack_from(f"{order}I", data, 4)
        (entries,) = struct.unpack_from(f"{order}H", data, first)
        (following,) = struct.unpack_from(f"{order}I", data, first + 2 + 12 * entries)
    except struct.error:  # offsets past the end: Pillow's own parser reports the damage
        return False
    return following != 0


# ------------------------------------------------------------------------------------- JPEG 2000


def _codestream(data: bytes) -> bytes:
    """The raw codestream of a J2K stream or a JP2 file (its ``jp2c`` box), else ``data`` as is."""
    if data[:2] == b"\xff\x4f":
        return data
    at = data.find(b"jp2c")
    return data[at + 4 :] if at >= 4 else data


def _coding_style(body: bytes, offset: int, scod: int) -> tuple[int, int, int, list[tuple[int, int]]]:
    """``(levels, xcb, ycb, precincts)`` from the SPcod/SPcoc bytes at ``offset`` (``scod``: the style byte)."""
    defined_precincts = scod & 1
    levels, xcb, ycb = body[offset], body[offset + 1] + 2, body[offset + 2] + 2
    precincts = [(15, 15)] * (levels + 1)
    if defined_precincts:
        raw = body[offset + 5 : offset + 5 + levels + 1]
        precincts = [(b & 0x0F, b >> 4) for b in raw] + precincts[len(raw) :]
    return levels, xcb, ycb, precincts


def _codeblocks_per_tile(width: int, height: int, style: tuple[int, int, int, list[tuple[int, int]]]) -> int:
    """Code-blocks of one component of a ``width`` x ``height`` tile, over every resolution and subband."""
    levels, xcb, ycb, precincts = style
    total = 0
    for resolution in range(levels + 1):  # 0 is the lowest (LL) resolution
        scale = 2 ** (levels - resolution)
        res_w, res_h = math.ceil(width / scale), math.ceil(height / scale)
        ppx, ppy = precincts[resolution]
        shrink = 1 if resolution else 0  # a subband is half its resolution's precinct
        block_w, block_h = 2 ** max(0, min(xcb, ppx - shrink)), 2 ** max(0, min(ycb, ppy - shrink))
        bands = [(res_w, res_h)] if resolution == 0 else [(math.ceil(res_w / 2), math.ceil(res_h / 2))] * 3
        total += sum(math.ceil(w / block_w) * math.ceil(h / block_h) for w, h in bands)
    return total


def check_j2k(data: bytes, limits: Limits) -> int:
    """Refuse a JPEG 2000 stream whose header declares too many tiles or code-blocks; return its fewest levels.

    Walks the main header (SIZ, COD, COC) and every tile-part header (which may override COD/COC)
    by their lengths, skipping tile data by the tile-part length (Psot). The count is an upper
    estimate over the worst coding style found. The returned decomposition level count bounds a
    reduced-resolution decode (0 when the header cannot be read: decode at full resolution).
    """
    stream = _codestream(data)
    pos, end = 2, len(stream)
    size: tuple[int, ...] | None = None
    styles: list[tuple[int, int, int, list[tuple[int, int]]]] = []
    tile_parts = 0
    while pos + 4 <= end:
        marker = stream[pos : pos + 2]
        if marker == b"\xff\xd9":
            break
        length = int.from_bytes(stream[pos + 2 : pos + 4], "big")
        body = stream[pos + 4 : pos + 2 + length]
        try:
            if marker == b"\xff\x51" and len(body) >= 36:  # SIZ
                size = struct.unpack_from(">IIIIIIIIH", body, 2)
            elif marker == b"\xff\x52" and len(body) >= 10:  # COD: Scod, SGcod (4 bytes), SPcod
                styles.append(_coding_style(body, 5, body[0]))
            elif marker == b"\xff\x53" and size is not None:  # COC: Ccoc (1 or 2 bytes), Scoc, SPcoc
                at = 3 if size[8] >= 257 else 2
                styles.append(_coding_style(body, at, body[at - 1]))
        except IndexError:  # a truncated segment: the decoder reports the damage
            pass
        if marker == b"\xff\x90":  # SOT: a tile-part; its length (Psot) covers header and data
            tile_parts += 1
            if tile_parts > limits.max_tiles:
                raise _too_many("JPEG 2000 tile-parts", tile_parts, limits.max_tiles, "too_many_tiles")
            psot = int.from_bytes(stream[pos + 6 : pos + 10], "big")
            header_end = stream.find(b"\xff\x93", pos)  # SOD: the tile-part header ends there
            if header_end < 0:
                break
            _scan_tile_header(stream[pos + 12 : header_end], styles, size)
            if psot == 0:  # the last tile-part runs to the end of the codestream
                break
            pos += psot
            continue
        pos += 2 + length
    if size is None or not styles:
        return 0
    width, height, x_off, y_off, tile_w, tile_h, tile_x, tile_y, components = size
    tiles = max(1, math.ceil((width - tile_x) / max(1, tile_w))) * max(1, math.ceil((height - tile_y) / max(1, tile_h)))
    if tiles > limits.max_tiles:
        raise _too_many("JPEG 2000 tiles", tiles, limits.max_tiles, "too_many_tiles")
    tile_w, tile_h = min(tile_w, width - x_off), min(tile_h, height - y_off)
    worst = max(_codeblocks_per_tile(max(1, tile_w), max(1, tile_h), style) for style in styles)
    codeblocks = tiles * worst * max(1, components)
    if codeblocks > limits.max_codeblocks:
        raise _too_many("JPEG 2000 code-blocks", codeblocks, limits.max_codeblocks, "too_many_codeblocks")
    return min(style[0] for style in styles)


def _scan_tile_header(
    header: bytes, styles: list[tuple[int, int, int, list[tuple[int, int]]]], size: tuple[int, ...] | None
) -> None:
    """Add the COD/COC coding styles of one tile-part header to ``styles``."""
    pos = 0
    while pos + 4 <= len(header):
        marker = header[pos : pos + 2]
        length = int.from_bytes(header[pos + 2 : pos + 4], "big")
        body = header[pos + 4 : pos + 2 + length]
        try:
            if marker == b"\xff\x52" and len(body) >= 10:
                styles.append(_coding_style(body, 5, body[0]))
            elif marker == b"\xff\x53" and size is not None:
                at = 3 if size[8] >= 257 else 2
                styles.append(_coding_style(body, at, body[at - 1]))
        except IndexError:
            pass
        if length < 2:
            return
        pos += 2 + length


def j2k_sample_format(data: bytes) -> tuple[int, int] | None:
    """``(precision, signed)`` of the first component from a JPEG 2000 SIZ segment, or None when unreadable."""
    stream = _codestream(data)
    if stream[2:4] != b"\xff\x51" or len(stream) < 45:
        return None
    ssiz = stream[42]  # SOC, SIZ marker and length, Rsiz, 8 sizes, Csiz: then Ssiz of component 0
    return (ssiz & 0x7F) + 1, ssiz >> 7
