"""The decode worker process: ``python -m pneumo.core.decode.worker FD MEMORY_MB``.

Started and fed by :class:`pneumo.core.decode.isolate.DecodePool` over the socket ``FD``; decodes
one input at a time with :func:`pneumo.core.decode.read_image` and answers. Messages are JSON
headers plus raw bytes, never pickles: the worker parses hostile data, so nothing it sends back
may execute in the parent. Its address space is capped at its warm size plus ``MEMORY_MB``, core
dumps are off, and it exits when the parent closes the socket (or dies).
"""

from __future__ import annotations

import json
import resource
import sys
from dataclasses import asdict
from multiprocessing.connection import Connection
from pathlib import Path

from pneumo.core.decode import Limits, read_image
from pneumo.core.errors import PneumoError


def encode_error(err: PneumoError) -> bytes:
    """The JSON answer for a typed error (its class name, code and message)."""
    return json.dumps({"ok": False, "class": type(err).__name__, "code": err.code, "message": err.message}).encode()


def _cap_address_space(extra_mb: int) -> None:
    status = Path("/proc/self/status")
    if extra_mb <= 0 or not status.exists():
        return
    size = next(int(line.split()[1]) * 1024 for line in status.read_text().splitlines() if line.startswith("VmSize"))
    resource.setrlimit(resource.RLIMIT_AS, (size + extra_mb * 2**20, resource.RLIM_INFINITY))


def serve(conn: Connection) -> None:
    """Answer decode requests until the parent closes the connection."""
    while True:
        try:
            request = json.loads(conn.recv_bytes())
            data = conn.recv_bytes()
        except (EOFError, OSError, MemoryError):  # the parent went away, or the input is over the memory cap
            return
        try:
            decoded = read_image(data, Limits(**request["limits"]), draft_size=request.get("draft_size"))
            image = decoded.image.convert("L")
            header = {
                "ok": True,
                "size": image.size,
                "format": decoded.format,
                "original_size": decoded.original_size,
                "metadata": decoded.metadata,
            }
            conn.send_bytes(json.dumps(header).encode())
            conn.send_bytes(image.tobytes())
        except PneumoError as err:
            conn.send_bytes(encode_error(err))
        except MemoryError:
            message = "Decoding the image needed more memory than one image may use; the file is damaged or built to."
            conn.send_bytes(
                json.dumps(
                    {"ok": False, "class": "InputTooLargeError", "code": "decode_out_of_memory", "message": message}
                ).encode()
            )
        del data


def _warm_up() -> None:
    """Import the decoders and run one decode before the memory cap: imports are no input's cost."""
    import io

    from PIL import Image
    from pydicom.pixels import get_decoder
    from pydicom.uid import JPEG2000Lossless

    import pneumo.core.decode.dicom  # noqa: F401

    get_decoder(JPEG2000Lossless).is_available  # noqa: B018  (loads pydicom's codec plugins)
    buffer = io.BytesIO()
    Image.new("L", (64, 64), 90).save(buffer, format="PNG")
    read_image(buffer.getvalue())


def main() -> None:
    fd, memory_mb = int(sys.argv[1]), int(sys.argv[2])
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    conn = Connection(fd)
    _warm_up()
    _cap_address_space(memory_mb)
    conn.send_bytes(json.dumps({"ready": True, "limits": asdict(Limits())}).encode())
    serve(conn)


if __name__ == "__main__":
    main()
