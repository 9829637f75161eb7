"""Backpressure for the API: a bound on concurrent decodes/inferences and on the requests waiting for one.

Each request may need up to the decoding budget (~300 MB, ``docs/reliability.md``) plus its
uploaded bytes; N worst-case requests at once need N times that. :class:`Backpressure` lets
``workers`` requests decode and predict at once (a semaphore taken in the worker thread), lets
``queue`` more wait, and refuses the rest at once with :class:`ServerBusyError` (503 with
``Retry-After``), so memory stays bounded by ``workers`` whatever the load. Starlette has no
such limiter (uvicorn's ``--limit-concurrency`` counts every connection, health checks
included, and answers a plain-text 503), hence this small class.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from pneumo.core.errors import ServerBusyError

#: Memory one request may need at worst: the decode budget (300 MB) plus its uploads and the model's activations.
REQUEST_MEMORY = 400 * 2**20


def default_workers(request_memory: int = REQUEST_MEMORY) -> int:
    """Concurrent requests this machine takes: one per core, fewer when half the free memory would not hold them."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not Linux: cores only
        return max(1, cores)
    return max(1, min(cores, int(free * 0.5 // request_memory)))


def _malloc_trim() -> None:
    """Hand freed heap memory back to the OS (glibc ``malloc_trim``), a no-op elsewhere.

    A decode frees its buffers, but glibc keeps freed blocks under its mmap threshold (which
    grows to 32 MB) in per-thread arenas, so after a few worst-case inputs on different worker
    threads the RSS stays near the peak: measured +880 MB over a 2,000-request load test without
    this, for memory no longer in use. Neither Python nor Starlette exposes it, hence ctypes.
    """
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


_libc_name = ctypes.util.find_library("c")
try:
    _LIBC: ctypes.CDLL | None = ctypes.CDLL(_libc_name) if _libc_name else None
    if _LIBC is not None and not hasattr(_LIBC, "malloc_trim"):  # musl, macOS
        _LIBC = None
except OSError:
    _LIBC = None


class Backpressure:
    """``workers`` requests run at once, ``queue`` more wait; beyond that :meth:`admit` raises 503.

    Args:
        workers: requests decoded and predicted at the same time.
        queue: requests admitted to wait for a worker.
    """

    def __init__(self, workers: int, queue: int) -> None:
        if workers < 1 or queue < 0:
            raise ValueError(f"workers must be >= 1 and queue >= 0, got {workers} and {queue}.")
        self.workers, self.queue = workers, queue
        self._slots = threading.BoundedSemaphore(workers)
        self._lock = threading.Lock()
        self._admitted = 0
        self._mean_seconds = 0.5  # running mean of a slot's duration, for Retry-After

    @property
    def admitted(self) -> int:
        """Requests running or waiting now."""
        return self._admitted

    @contextmanager
    def admit(self) -> Iterator[None]:
        """Admit a request (running or waiting) or refuse it with :class:`ServerBusyError` at once."""
        with self._lock:
            if self._admitted >= self.workers + self.queue:
                waits = math.ceil(self._mean_seconds * (self._admitted / self.workers))
                raise ServerBusyError(
                    f"The server is busy: {self._admitted} requests are being analysed or waiting, the most it "
                    f"takes at once. Retry in {max(1, waits)} s.",
                    retry_after=max(1, waits),
                )
            self._admitted += 1
        try:
            yield
        finally:
            with self._lock:
                self._admitted -= 1

    @contextmanager
    def slot(self) -> Iterator[None]:
        """Hold one of the ``workers`` slots (blocking: call it in a worker thread, not on the event loop)."""
        with self._slots:
            start = time.perf_counter()
            try:
                yield
            finally:
                self._mean_seconds = 0.9 * self._mean_seconds + 0.1 * (time.perf_counter() - start)
                _malloc_trim()
