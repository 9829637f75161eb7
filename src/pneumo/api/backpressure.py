"""Backpressure and deadlines for the API: a bound on concurrent analyses, on the requests waiting for one,
on how long they wait, and on how long a client waits for its answer.

Each request may need up to the decoding budget (~300 MB, ``docs/reliability.md``) plus its
uploaded bytes; N worst-case requests at once need N times that. :class:`Backpressure` lets
``workers`` requests decode and predict at once (a slot taken in a worker thread of its own
pool), lets ``queue`` more wait, and refuses the rest at once with :class:`ServerBusyError` (503
with ``Retry-After``), so memory stays bounded by ``workers`` whatever the load. A request that
waited ``queue_timeout`` seconds for a slot is refused the same way, and a client waits at most
``deadline`` seconds for its answer (503 ``deadline_exceeded``): no request stalls the API
behind another. The work itself is stopped by the decoder's own deadline, not here: a thread
cannot be interrupted, so its slot stays taken until it returns, which keeps the memory bound
true. Starlette has no such limiter (uvicorn's ``--limit-concurrency`` counts every connection,
health checks included, and answers a plain-text 503), hence this small class.
"""

from __future__ import annotations

import asyncio
import contextvars
import ctypes
import ctypes.util
import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import partial
from typing import TypeVar

from pneumo.core.errors import ServerBusyError

T = TypeVar("T")

#: Memory one request may need at worst: the decode budget (300 MB) plus its uploads and the model's activations.
REQUEST_MEMORY = 400 * 2**20


class DeadlineExceededError(ServerBusyError):
    """A request was not answered within the server's deadline (503 with ``Retry-After``): retry later."""

    code = "deadline_exceeded"


def default_workers(request_memory: int = REQUEST_MEMORY, processes: int = 1) -> int:
    """Concurrent requests one of ``processes`` server processes takes: its share of the cores, fewer when half
    the free memory would not hold them."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    share = max(1, cores // max(1, processes))
    try:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not Linux: cores only
        return share
    return max(1, min(share, int(free * 0.5 // (request_memory * max(1, processes)))))


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
    """``workers`` requests run at once, ``queue`` more wait; beyond that, or past a timeout, 503.

    Args:
        workers: requests decoded and predicted at the same time.
        queue: requests admitted to wait for a worker.
        queue_timeout: seconds a request may wait for a worker before it is refused (503 ``server_busy``).
        deadline: seconds a client waits for its answer, waiting included (503 ``deadline_exceeded``).
        on_change: called with the number of admitted requests whenever it changes (the metrics gauge).
    """

    def __init__(
        self,
        workers: int,
        queue: int,
        *,
        queue_timeout: float = 30.0,
        deadline: float = 60.0,
        on_change: Callable[[int], object] | None = None,
    ) -> None:
        if workers < 1 or queue < 0 or queue_timeout <= 0 or deadline <= 0:
            raise ValueError(
                f"workers must be >= 1, queue >= 0 and both timeouts > 0, got {workers}, {queue}, "
                f"{queue_timeout} and {deadline}."
            )
        self.workers, self.queue = workers, queue
        self.queue_timeout, self.deadline = queue_timeout, deadline
        self._on_change = on_change
        self._slots = threading.BoundedSemaphore(workers)
        self._lock = threading.Lock()
        self._admitted = 0
        self._mean_seconds = 0.5  # running mean of a slot's duration, for Retry-After
        # One thread per admitted request at most: waiting requests never starve the event loop's pool.
        self._pool = ThreadPoolExecutor(max_workers=workers + queue, thread_name_prefix="pneumo-request")

    @property
    def admitted(self) -> int:
        """Requests running or waiting now."""
        return self._admitted

    def retry_after(self) -> int:
        """Seconds after which a retry is likely to find room."""
        return max(1, math.ceil(self._mean_seconds * (self._admitted / self.workers)))

    def _change(self, delta: int) -> None:
        with self._lock:
            self._admitted += delta
            admitted = self._admitted
        if self._on_change is not None:
            self._on_change(admitted)

    def _admit(self) -> None:
        with self._lock:
            if self._admitted >= self.workers + self.queue:
                waits = self.retry_after()
                raise ServerBusyError(
                    f"The server is busy: {self._admitted} requests are being analysed or waiting, the most it "
                    f"takes at once. Retry in {waits} s.",
                    retry_after=waits,
                )
        self._change(+1)

    @contextmanager
    def admit(self) -> Iterator[None]:
        """Hold a place among the admitted requests (running or waiting), or raise :class:`ServerBusyError`."""
        self._admit()
        try:
            yield
        finally:
            self._change(-1)

    def _in_slot(self, func: Callable[[], T]) -> T:
        """Run ``func`` holding a slot (in a pool thread); refuse it if no slot frees within ``queue_timeout``."""
        try:
            if not self._slots.acquire(timeout=self.queue_timeout):
                waits = self.retry_after()
                raise ServerBusyError(
                    f"The server is busy: no analysis slot freed within {self.queue_timeout:g} s. Retry in {waits} s.",
                    retry_after=waits,
                )
            start = time.perf_counter()
            try:
                return func()
            finally:
                self._slots.release()
                self._mean_seconds = 0.9 * self._mean_seconds + 0.1 * (time.perf_counter() - start)
                _malloc_trim()
        finally:
            self._change(-1)  # when the work ends, not when the client stops waiting: memory stays bounded

    async def run(self, func: Callable[..., T], *args: object) -> T:
        """Admit, wait for a slot and run ``func(*args)`` in a worker thread; its result within ``deadline``.

        Raises:
            ServerBusyError: no room to wait, or no slot within ``queue_timeout`` (503 with Retry-After).
            DeadlineExceededError: the answer took longer than ``deadline``; the work goes on in its slot
                until the decoder's own deadline stops it.
        """
        self._admit()
        context = contextvars.copy_context()  # the request id reaches the worker thread's log lines
        try:
            future = asyncio.get_running_loop().run_in_executor(
                self._pool, context.run, self._in_slot, partial(func, *args)
            )
        except BaseException:
            self._change(-1)
            raise
        try:
            return await asyncio.wait_for(asyncio.shield(future), self.deadline)
        except TimeoutError:
            future.add_done_callback(lambda done: done.exception())  # retrieved: no "never retrieved" noise
            waits = self.retry_after()
            raise DeadlineExceededError(
                f"The request was not answered within the server's {self.deadline:g} s deadline (the server is busy "
                f"or the file is unusually costly to decode). Retry in {waits} s.",
                retry_after=waits,
            ) from None
