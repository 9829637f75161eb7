"""Parse a DICOM dataset within bounds: capped inflation and a cap on the elements read.

``pydicom.dcmread`` trusts its input in two ways that cost memory and time out of proportion to
the file (issues 12, 21 and 22):

* a Deflated-transfer-syntax dataset is one zlib stream that pydicom inflates whole
  (``zlib.decompress``), so 1 MB on disk can become gigabytes; :func:`inflate_capped` inflates at
  most :func:`inflate_cap` bytes and refuses beyond (``inflated_too_large``);
* every data element becomes a Python object, so 18 MB of 8-byte empty elements took 7 s and
  580 MB; :class:`_CountingReader` counts the element and item headers pydicom reads and stops
  at ``Limits.max_elements`` (``too_many_elements``).

:func:`read_header` is the public entry for callers that need the header only (the DICOM node's
C-STORE and DICOMweb handlers); :func:`parse_dataset` is what :func:`~pneumo.core.decode.dicom.read_dicom`
uses. Both are pydicom's own reader (``dcmread``, ``read_dataset``) over a bounded stream.
"""

from __future__ import annotations

import io
import zlib
from typing import Any, BinaryIO, cast

from pneumo.core.decode.common import Limits, describe_error
from pneumo.core.errors import DicomError, InputTooLargeError, PneumoError

#: The (7FE0,0010) Pixel Data tag as it starts an element header, little- and big-endian.
_PIXEL_DATA_TAGS = (b"\xe0\x7f\x10\x00", b"\x7f\xe0\x00\x10")


class _CountingReader(io.BytesIO):
    """A byte stream that counts the 8-byte reads pydicom makes for each element and item header.

    pydicom reads every element header (tag, VR, length) and every sequence item header with one
    ``read(8)``; values are read with their own length, so a value of exactly 8 bytes counts too
    (the cap is reached at ``max_elements`` elements at most, at half that for a header made of
    8-byte values only: still ten times what a radiograph's header holds). It also notes whether a Pixel Data header was
    read, so a Pixel Data element that pydicom drops (undefined length, no delimiter) is not
    mistaken for a file without pixels.
    """

    def __init__(self, data: bytes | memoryview, max_reads: int) -> None:
        super().__init__(data)
        self.reads = 0
        self.max_reads = max_reads
        self.saw_pixel_data = False

    def read(self, size: int | None = -1, /) -> bytes:
        chunk = super().read(size)
        if size == 8:
            self.reads += 1
            if self.reads > self.max_reads:
                raise InputTooLargeError(
                    f"The DICOM file holds more than {self.max_reads:,} data elements or sequence items; a "
                    "radiograph's header has a few hundred, and each one costs parsing time and memory. The file is "
                    "damaged or built to stall the parser; export it again from the PACS.",
                    code="too_many_elements",
                )
            if chunk[:4] in _PIXEL_DATA_TAGS:
                self.saw_pixel_data = True
        return chunk


def _reader(data: bytes | memoryview, limits: Limits) -> _CountingReader:
    return _CountingReader(data, limits.max_elements)


def parse_dataset(data: bytes, limits: Limits, *, stop_before_pixels: bool = False) -> tuple[Any, bool]:
    """``pydicom.dcmread`` within the bounds; returns the dataset and whether a Pixel Data header was seen.

    A Deflated dataset is inflated by :func:`inflate_capped`; every other one is read by
    ``dcmread`` from a counting stream.
    """
    import pydicom
    from pydicom.filereader import _read_file_meta_info, read_preamble
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    stream = io.BytesIO(data)  # the file meta group only: dcmread would inflate a Deflated dataset whole
    read_preamble(stream, False)
    if _read_file_meta_info(stream).get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian:
        return inflate_capped(data, limits, stop_before_pixels=stop_before_pixels)
    reader = _reader(data, limits)
    return pydicom.dcmread(reader, stop_before_pixels=stop_before_pixels), reader.saw_pixel_data


def read_header(data: bytes, limits: Limits) -> Any:
    """The DICOM header (every element before Pixel Data) of ``data``, read within ``limits``; no pixel data.

    For callers that route or file an instance before decoding it (the DICOM node). Deflate goes
    through the capped inflater and the elements read are counted, so a 1 MB Deflated C-STORE
    costs at most :func:`inflate_cap` bytes, not the gigabytes plain ``dcmread`` inflates.

    Raises:
        InputTooLargeError: ``inflated_too_large`` or ``too_many_elements``.
        DicomError: ``corrupt_image`` when the header cannot be parsed.
    """
    try:
        return parse_dataset(data, limits, stop_before_pixels=True)[0]
    except (PneumoError, MemoryError):
        raise
    except Exception as err:  # pydicom raises many types for malformed files
        raise DicomError(f"The DICOM header cannot be parsed ({describe_error(err)}).", code="corrupt_image") from err


def inflate_cap(max_pixels: int) -> int:
    """Most bytes a Deflated DICOM dataset may inflate to: the largest allowed 16-bit image plus 4 MB of header."""
    return 2 * max_pixels + 4 * 2**20


def inflate_capped(data: bytes, limits: Limits, *, stop_before_pixels: bool = False) -> tuple[Any, bool]:
    """Parse a Deflated-Explicit-VR DICOM, inflating at most :func:`inflate_cap` bytes (pydicom inflates all).

    Returns the pydicom dataset with its file meta (its transfer syntax rewritten to the Explicit
    VR Little Endian the deflated stream holds) and whether a Pixel Data header was seen.

    Raises:
        InputTooLargeError: ``inflated_too_large`` when the stream inflates past the cap.
        DicomError: ``corrupt_image`` when the stream is not valid deflate data.
    """
    from pydicom.filereader import _read_file_meta_info, read_dataset, read_preamble
    from pydicom.uid import ExplicitVRLittleEndian

    stream = io.BytesIO(data)
    read_preamble(stream, False)
    meta = _read_file_meta_info(stream)
    cap = inflate_cap(limits.max_pixels)
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        inflated = inflater.decompress(memoryview(data)[stream.tell() :], cap + 1)
    except zlib.error as err:
        raise DicomError(
            "The DICOM file is Deflate-compressed but its data cannot be inflated; it is damaged.",
            code="corrupt_image",
        ) from err
    if len(inflated) > cap or inflater.unconsumed_tail:
        raise InputTooLargeError(
            f"The DICOM file is Deflate-compressed and inflates to more than {cap / 2**20:.0f} MB, more than the "
            f"largest allowed radiograph ({limits.max_pixels / 1e6:.0f} MP at 16 bits) needs; it was refused unread.",
            code="inflated_too_large",
        )
    reader = _reader(inflated, limits)
    del inflated
    stop = (lambda tag, vr, length: tag == 0x7FE00010) if stop_before_pixels else None
    ds = read_dataset(cast(BinaryIO, reader), False, True, stop_when=stop)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    ds.set_original_encoding(False, True, ds._character_set)
    return ds, reader.saw_pixel_data
