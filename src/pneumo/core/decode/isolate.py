"""Decoding under a deadline that can really stop the work: a small pool of killable worker processes.

A thread cannot be interrupted in the middle of a C decoder, so a decode that stalls (a codec
walking a hostile structure nobody bounded yet) would hold its request and a core for as long as
it likes. :class:`DecodePool` hands the bytes to a reusable worker process
(:mod:`pneumo.core.decode.worker`) and watches it: past ``Limits.decode_cpu_seconds`` of its CPU
time (read from ``/proc``; wall-clock time is not the measure, so a busy server does not refuse
good films) or ``Limits.decode_wall_seconds`` of wall time, the worker is killed and the caller
gets a 422 ``decode_timeout``; a worker that dies (a codec crash, its memory cap) gives
``decoder_crashed``. A fresh worker replaces a killed one on the next request.

Only the formats whose decoding is not bounded cheaply in-process go to a worker:
:data:`ISOLATED_FORMATS` is DICOM (pydicom's parser and five codec families) and TIFF (libtiff's
codecs). JPEG and PNG are bounded before decoding (scans, chunks, pixels; see
:mod:`~pneumo.core.decode.codestreams`) and decode in-process, so the common upload pays no
hand-over: measured on the 14 full-resolution films, a worker adds a few ms per JPEG (bytes out,
pixels back) on decodes of 10-30 ms (``benchmarks/hostile_decode.py``, docs/reliability.md).

Why processes of our own (``subprocess`` + a socket) rather than ``multiprocessing``: no
``fork`` of a process that runs ONNX Runtime threads, no re-import of the caller's ``__main__``
(a Streamlit or uvicorn entry point), and no pickles from a process that parses hostile bytes.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from multiprocessing.connection import Connection
from pathlib import Path

from PIL import Image

from pneumo.core import errors
from pneumo.core.decode.common import DEFAULT_LIMITS, DecodedImage, Limits
from pneumo.core.errors import DecodeAbortedError, PneumoError

log = logging.getLogger(__name__)

#: Formats decoded in a worker (see the module docstring); the rest are bounded in-process.
ISOLATED_FORMATS = frozenset({"dicom", "tiff"})

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_POLL_S = 0.05


class _Worker:
    """One worker process and its socket."""

    def __init__(self, memory_mb: int, start_timeout: float) -> None:
        parent, child = socket.socketpair()
        src = str(Path(__file__).resolve().parents[3])  # the folder holding this pneumo package
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))}
        env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "pneumo.core.decode.worker", str(child.fileno()), str(memory_mb)],
            pass_fds=(child.fileno(),),
            stdin=subprocess.DEVNULL,
            env=env,
        )
        child.close()
        self.conn = Connection(parent.detach())
        if not self.conn.poll(start_timeout):
            self.kill()
            raise DecodeAbortedError("The image decoder could not be started; try again.", code="decoder_crashed")
        json.loads(self.conn.recv_bytes())  # {"ready": true}

    def cpu_seconds(self) -> float | None:
        """User + system CPU seconds of the worker so far, or None where ``/proc`` cannot tell."""
        try:
            fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / _TICKS
        except (OSError, IndexError, ValueError):
            return None

    def rss_mb(self) -> float:
        try:
            status = Path(f"/proc/{self.process.pid}/status").read_text()
            return next(int(line.split()[1]) / 1024 for line in status.splitlines() if line.startswith("VmRSS"))
        except (OSError, StopIteration):
            return 0.0

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self.conn.close()


class DecodePool:
    """Decode inputs in up to ``workers`` reusable worker processes, each decode under a CPU and wall deadline.

    Args:
        workers: most decodes at once (callers beyond wait for a worker; the API bounds them anyway).
        memory_mb: address space a worker may add above its warm size before a decode fails in it.
        recycle_mb: a worker whose resident memory grew past this after a decode is replaced,
            so the memory a large film took is given back to the system.
        idle_seconds: a worker idle this long is stopped (its ~70 MB given back); the next
            isolated decode starts a fresh one (under a second).
        start_timeout: seconds a new worker may take to import its decoders.
    """

    def __init__(
        self,
        workers: int = 2,
        *,
        memory_mb: int = 1536,
        recycle_mb: int = 400,
        idle_seconds: float = 300.0,
        start_timeout: float = 60.0,
    ) -> None:
        self.memory_mb, self.recycle_mb, self.start_timeout = memory_mb, recycle_mb, start_timeout
        self.idle_seconds = idle_seconds
        self._slots = threading.BoundedSemaphore(max(1, workers))
        self._idle: list[tuple[float, _Worker]] = []  # (when it went idle, worker)
        self._lock = threading.Lock()
        self._closed = False
        self._pid = os.getpid()
        self._reaper: threading.Thread | None = None

    def isolates(self, fmt: str) -> bool:
        """Whether ``fmt`` (a :func:`~pneumo.core.decode.sniff_format` name) is decoded in a worker."""
        return fmt in ISOLATED_FORMATS

    def read_image(
        self, source: str | Path | bytes, limits: Limits = DEFAULT_LIMITS, *, draft_size: int | None = None
    ) -> DecodedImage:
        """:func:`pneumo.core.decode.read_image` through this pool (isolated formats in a worker)."""
        from pneumo.core.decode import read_image

        return read_image(source, limits, draft_size=draft_size, pool=self)

    def decode(self, data: bytes, limits: Limits, draft_size: int | None) -> DecodedImage:
        """Decode ``data`` in a worker; a typed error when it fails, stalls past the deadline or kills the worker."""
        with self._slots:
            worker = self._take()
            try:
                decoded = self._run(worker, data, limits, draft_size)
            except BaseException:
                worker.kill()
                raise
            self._give_back(worker)
            return decoded

    def close(self) -> None:
        """Stop every idle worker (busy ones stop when their decode ends)."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for _, worker in idle:
            worker.kill()

    @property
    def idle_workers(self) -> int:
        """Workers started and waiting for a decode."""
        with self._lock:
            return len(self._idle)

    # ------------------------------------------------------------------------------ internals

    def _take(self) -> _Worker:
        with self._lock:
            if os.getpid() != self._pid:  # a forked child: the workers and sockets are its parent's
                self._idle, self._pid, self._reaper = [], os.getpid(), None
            while self._idle:
                _, worker = self._idle.pop()
                if worker.process.poll() is None:
                    return worker
                worker.kill()
        return _Worker(self.memory_mb, self.start_timeout)

    def _give_back(self, worker: _Worker) -> None:
        if worker.rss_mb() > self.recycle_mb:
            worker.kill()
            return
        with self._lock:
            if not self._closed:
                self._idle.append((time.monotonic(), worker))
                if self._reaper is None:
                    self._reaper = threading.Thread(target=self._reap, name="pneumo-decode-reaper", daemon=True)
                    self._reaper.start()
                return
        worker.kill()

    def _reap(self) -> None:
        """Stop workers idle past ``idle_seconds``, checking a few times per period; ends with the pool."""
        while not self._closed:
            time.sleep(max(0.05, self.idle_seconds / 4))
            now = time.monotonic()
            with self._lock:
                stale = [worker for since, worker in self._idle if now - since > self.idle_seconds]
                self._idle = [(since, worker) for since, worker in self._idle if now - since <= self.idle_seconds]
            for worker in stale:
                worker.kill()

    def _run(self, worker: _Worker, data: bytes, limits: Limits, draft_size: int | None) -> DecodedImage:
        cpu_start = worker.cpu_seconds()
        wall_start = time.monotonic()
        try:
            worker.conn.send_bytes(json.dumps({"limits": asdict(limits), "draft_size": draft_size}).encode())
            worker.conn.send_bytes(data)
        except OSError as err:  # the worker died receiving (its memory cap, or killed meanwhile)
            raise DecodeAbortedError(
                "The image decoder stopped while receiving this file; try again.", code="decoder_crashed"
            ) from err
        while not worker.conn.poll(_POLL_S):
            if worker.process.poll() is not None:
                raise DecodeAbortedError(
                    "The image decoder stopped on this file (it crashed or ran out of its memory); the file is "
                    "damaged or built to break decoders. Export the image again.",
                    code="decoder_crashed",
                )
            cpu_now = worker.cpu_seconds()
            cpu = cpu_now - cpu_start if cpu_now is not None and cpu_start is not None else None
            wall = time.monotonic() - wall_start
            if (cpu is not None and cpu > limits.decode_cpu_seconds) or wall > limits.decode_wall_seconds:
                log.warning("Decode stopped after %.1f s CPU, %.1f s wall (%d bytes)", cpu or -1.0, wall, len(data))
                raise DecodeAbortedError(
                    f"Decoding the image took more than {limits.decode_cpu_seconds:g} s of CPU time and was stopped; "
                    "a radiograph decodes in well under a second, so the file is damaged or built to stall the "
                    "decoder. Export the image again.",
                    code="decode_timeout",
                )
        try:
            header = json.loads(worker.conn.recv_bytes())
            if not header.get("ok"):
                raise _rebuild_error(header)
            pixels = worker.conn.recv_bytes()
        except (EOFError, OSError, ValueError) as err:
            raise DecodeAbortedError(
                "The image decoder stopped on this file; the file is damaged. Export the image again.",
                code="decoder_crashed",
            ) from err
        image = Image.frombytes("L", tuple(header["size"]), pixels)
        return DecodedImage(image, header["format"], tuple(header["original_size"]), dict(header["metadata"]))


def _rebuild_error(header: dict) -> PneumoError:
    """The typed error a worker reported, as the same class (a known ``pneumo.core.errors`` one) and code."""
    cls = getattr(errors, str(header.get("class")), None)
    if not (isinstance(cls, type) and issubclass(cls, PneumoError)) or cls is errors.ServerBusyError:
        cls = errors.InvalidImageError
    return cls(str(header.get("message", "")), code=str(header.get("code", "invalid_image")))


_default: DecodePool | None = None
_default_lock = threading.Lock()


def default_pool() -> DecodePool:
    """The process-wide pool (``min(2, CPUs)`` workers, started on first use) the Predictor decodes through."""
    global _default
    with _default_lock:
        if _default is None:
            _default = DecodePool(workers=min(2, os.cpu_count() or 1))
            atexit.register(_default.close)
        return _default
