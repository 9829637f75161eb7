"""Where the bytes come from: files and uploads read within the size limit, and the format named by magic bytes.

The first step of the decoding line (:mod:`pneumo.core.decode`): nothing here parses an image.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from pneumo.core.decode.common import DEFAULT_LIMITS, Limits
from pneumo.core.errors import InputTooLargeError, InvalidImageError

#: File name extensions of the images pneumo looks for in folders (content is still checked by magic bytes).
IMAGE_EXTENSIONS = frozenset({".jpeg", ".jpg", ".png", ".dcm"})

#: The formats pneumo decodes: what radiographs are stored and exported as (docs/reliability.md,
#: "Formats"). :func:`sniff_format` also names BMP, WebP and GIF, so their refusal can say what they are.
ACCEPTED_FORMATS = frozenset({"jpeg", "png", "tiff", "dicom"})


def sniff_format(data: bytes) -> str | None:
    """Name the format from the file's first bytes (never from its extension), or ``None``."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if len(data) >= 132 and data[128:132] == b"DICM":
        return "dicom"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    if data[:2] == b"BM":
        return "bmp"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    return None


def read_bytes(source: str | Path | bytes, limits: Limits = DEFAULT_LIMITS) -> bytes:
    """Return the raw bytes of ``source``, refusing oversized files before reading them."""
    if isinstance(source, bytes | bytearray | memoryview):
        data = bytes(source)
    else:
        path = Path(source)
        _check_regular_file(path)
        try:
            size = path.stat().st_size
            if size > limits.max_bytes:
                raise InputTooLargeError(
                    f"{path.name} is {size / 2**20:.1f} MB, over the {limits.max_bytes / 2**20:.0f} MB limit.",
                    code="file_too_large",
                )
            with path.open("rb") as handle:  # read at most one byte past the limit, whatever stat said
                data = handle.read(limits.max_bytes + 1)
        except OSError as err:  # permission denied, removed meanwhile, I/O error
            raise InvalidImageError(
                f"{path} cannot be read ({err.strerror or err}); check that it exists and is readable.",
                code="unreadable_file",
            ) from err
    if len(data) > limits.max_bytes:
        raise InputTooLargeError(
            f"The upload is {len(data) / 2**20:.1f} MB, over the {limits.max_bytes / 2**20:.0f} MB limit.",
            code="file_too_large",
        )
    if not data:
        raise InvalidImageError("The file is empty (0 bytes).", code="empty_file")
    return data


def _check_regular_file(path: Path) -> None:
    """Refuse, with a row-worthy error, anything at ``path`` that is not a readable regular file.

    Never opens the path: a FIFO would block the batch forever and a device could stream
    without end. ``Path.is_file()`` raises on a name too long, so ``os.stat`` is asked directly.
    """
    try:
        info = path.stat()
    except FileNotFoundError as err:
        broken = path.is_symlink()
        raise InvalidImageError(
            f"{path} {'is a broken symbolic link (its target does not exist)' if broken else 'does not exist'}; "
            "pass the path of an image.",
            code="file_not_found",
        ) from err
    except OSError as err:  # name too long, permission denied on a parent folder, symlink loop
        raise InvalidImageError(
            f"{path} cannot be read ({err.strerror or err}); check the name and the permissions.",
            code="unreadable_file",
        ) from err
    if stat.S_ISREG(info.st_mode):
        return
    if stat.S_ISDIR(info.st_mode):
        if not os.access(path, os.R_OK | os.X_OK):
            raise InvalidImageError(
                f"{path} is a folder whose contents cannot be listed (permission denied); nothing in it was read.",
                code="unreadable_file",
            )
        raise InvalidImageError(f"{path} is a folder, not a file; pass the path of an image.", code="file_not_found")
    kind = "named pipe (FIFO)" if stat.S_ISFIFO(info.st_mode) else "socket" if stat.S_ISSOCK(info.st_mode) else "device"
    raise InvalidImageError(
        f"{path} is a {kind}, not a regular file; it was not opened. Pass the path of an image file.",
        code="unreadable_file",
    )
