"""Backpressure and deadlines for the API: a bound on concurrent analyses, on the requests waiting for one,
on how long they wait, and on how long a client waits for its answer.

Each request may need up to the decoding budget (~300 MB, ``docs/reliability.md``) plus its
uploaded bytes; N worst-case requests at once need N times that. :class:`Backpressure` lets
``workers`` requests decode and predict at once (a slot taken in a worker thread of its own
pool), lets ``queue`` more wait, and refuses the rest at once with :class:`ServerBusyError` (503
with ``Retry-After``), so memory stays bounded by ``workers`` whatever the load; one API key may
hold at most half of those places. A request that
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
import itertools
import math
import os
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import partial
from typing import TypeVar

from pneumo.core.errors import ServerBusyError

T = TypeVar("T")

#: Memory one request may need at worst: the decode budget (300 MB) plus its uploads and the model's activations.
REQUEST_MEMORY = 400 * 2**20
#: A client whose requests hold a slot this many times longer than the typical request is "expensive".
EXPENSIVE_FACTOR = 4.0
#: Share of the slot time expensive clients get while ordinary clients are being served.
EXPENSIVE_SHARE = 0.1
_TAU = 30.0  # seconds: the time constant of that share (the burst it allows is EXPENSIVE_SHARE x workers x _TAU)


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


class FairSlots:
    """The ``workers`` analysis slots, handed to the waiting request of the cheapest client first.

    A client (an API key, else an address) is known by the mean time its requests held a slot.
    When a slot frees, the waiting request whose client is cheapest gets it (ties: first come).
    Clients whose requests cost over :data:`EXPENSIVE_FACTOR` times the typical request (decode
    bombs, 36-megapixel floats) hold at most ``workers - 1`` slots together, so one slot always
    stays for ordinary requests, and, while ordinary clients are being served, get at most
    :data:`EXPENSIVE_SHARE` of the slot time (a running share with a 30 s time constant); when no
    one else is being served, the share does not apply (the slot cap does). Measured: with 2
    clients sending decode bombs in a loop, first come first served left the others 23% of their
    goodput (``benchmarks/hostile_load.py``; ``docs/reliability.md`` has the figures with this policy).
    """

    def __init__(self, workers: int, memory: int = 10_000) -> None:
        self.workers = workers
        self._free = workers
        self._cond = threading.Condition()
        self._waiting: list[tuple[int, str]] = []
        self._tickets = itertools.count()
        self._cost: OrderedDict[str, float] = OrderedDict()  # seconds per request (running mean), by client
        self._typical = 0.2  # running mean over every request
        self._expensive_running = 0
        self._memory = memory
        self._expensive_time = 0.0  # slot seconds of expensive requests, decaying with time constant _TAU
        self._stamp = time.monotonic()
        self._ordinary_seen = -math.inf  # when an ordinary request last ended

    def _decayed(self) -> float:
        now = time.monotonic()
        self._expensive_time *= math.exp(-(now - self._stamp) / _TAU)
        self._stamp = now
        return self._expensive_time

    def _expensive_blocked(self, client: str) -> bool:
        """Whether an expensive request must wait now (slot cap, or its share of time while others are served).

        It starts when the time it is expected to take still fits in the share, so that a long
        request does not overshoot it; or when the share is nearly unused (a request longer than
        the whole share still runs, now and then).
        """
        if self.workers > 1 and self._expensive_running >= self.workers - 1:
            return True
        if time.monotonic() - self._ordinary_seen >= 10.0:  # nobody else to protect
            return False
        allowance, used = EXPENSIVE_SHARE * self.workers * _TAU, self._decayed()
        return used + self.cost(client) > allowance and used > 0.1 * allowance

    def cost(self, client: str) -> float:
        return self._cost.get(client, self._typical)

    def _expensive(self, client: str) -> bool:
        return self.cost(client) > EXPENSIVE_FACTOR * self._typical

    def _may_start(self, ticket: tuple[int, str]) -> bool:
        if self._free == 0:
            return False
        if self._expensive(ticket[1]) and self._expensive_blocked(ticket[1]):
            return False
        eligible = [
            waiting
            for waiting in self._waiting
            if not (self._expensive(waiting[1]) and self._expensive_blocked(waiting[1]))
        ]
        return min(eligible, key=lambda waiting: (self.cost(waiting[1]), waiting[0])) == ticket

    def acquire(self, client: str, timeout: float) -> bool | None:
        """Wait for a slot; whether the holder counts as expensive (pass it to :meth:`release`), None on timeout."""
        ends = time.monotonic() + timeout
        with self._cond:
            ticket = (next(self._tickets), client)
            self._waiting.append(ticket)
            while not self._may_start(ticket):
                left = ends - time.monotonic()
                if left <= 0:
                    self._waiting.remove(ticket)
                    self._cond.notify_all()
                    return None
                self._cond.wait(min(left, 1.0))  # the time share frees up with time, not only on release
            self._waiting.remove(ticket)
            self._free -= 1
            expensive = self._expensive(client)
            self._expensive_running += expensive
            return expensive

    def release(self, client: str, expensive: bool, seconds: float) -> None:
        with self._cond:
            self._free += 1
            self._expensive_running -= expensive
            if expensive:
                self._decayed()
                self._expensive_time += seconds
            else:
                self._ordinary_seen = time.monotonic()
            self._cost[client] = 0.7 * self._cost.get(client, seconds) + 0.3 * seconds
            self._cost.move_to_end(client)
            if len(self._cost) > self._memory:
                self._cost.popitem(last=False)
            self._typical = 0.95 * self._typical + 0.05 * seconds
            self._cond.notify_all()


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
        self._slots = FairSlots(workers)
        self._lock = threading.Lock()
        self._admitted = 0
        self._by_client: Counter[str] = Counter()
        #: Requests one API key may have admitted at once (half the places, at least 2).
        self.per_client = max(2, (workers + queue) // 2)
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

    def _change(self, delta: int, client: str = "") -> None:
        with self._lock:
            self._admitted += delta
            self._by_client[client] += delta
            if self._by_client[client] <= 0:
                del self._by_client[client]
            admitted = self._admitted
        if self._on_change is not None:
            self._on_change(admitted)

    def _admit(self, client: str = "") -> None:
        with self._lock:
            waits = self.retry_after()
            if self._admitted >= self.workers + self.queue:
                raise ServerBusyError(
                    f"The server is busy: {self._admitted} requests are being analysed or waiting, the most it "
                    f"takes at once. Retry in {waits} s.",
                    retry_after=waits,
                )
            # One API key may hold half the places; addresses are not capped (a proxy or NAT shares one).
            if client.startswith("key:") and self._by_client[client] >= self.per_client:
                raise ServerBusyError(
                    f"The server is busy: this API key has {self._by_client[client]} requests being analysed or "
                    f"waiting, the most one key may have at once. Retry in {waits} s.",
                    retry_after=waits,
                )
        self._change(+1, client)

    @contextmanager
    def admit(self, client: str = "") -> Iterator[None]:
        """Hold a place among the admitted requests (running or waiting), or raise :class:`ServerBusyError`."""
        self._admit(client)
        try:
            yield
        finally:
            self._change(-1, client)

    def _in_slot(self, func: Callable[[], T], client: str) -> T:
        """Run ``func`` holding a slot (in a pool thread); refuse it if no slot frees within ``queue_timeout``."""
        try:
            expensive = self._slots.acquire(client, self.queue_timeout)
            if expensive is None:
                waits = self.retry_after()
                raise ServerBusyError(
                    f"The server is busy: no analysis slot freed within {self.queue_timeout:g} s. Retry in {waits} s.",
                    retry_after=waits,
                )
            start = time.perf_counter()
            try:
                return func()
            finally:
                seconds = time.perf_counter() - start
                self._slots.release(client, expensive, seconds)
                self._mean_seconds = 0.9 * self._mean_seconds + 0.1 * seconds
                _malloc_trim()
        finally:
            self._change(-1, client)  # when the work ends, not when the client stops waiting: memory stays bounded

    async def run(self, func: Callable[..., T], *args: object, client: str = "") -> T:
        """Admit, wait for a slot and run ``func(*args)`` in a worker thread; its result within ``deadline``.

        ``client`` (an API key's name, else an address) decides the order in which waiting
        requests get a slot (:class:`FairSlots`).

        Raises:
            ServerBusyError: no room to wait, or no slot within ``queue_timeout`` (503 with Retry-After).
            DeadlineExceededError: the answer took longer than ``deadline``; the work goes on in its slot
                until the decoder's own deadline stops it.
        """
        self._admit(client)
        context = contextvars.copy_context()  # the request id reaches the worker thread's log lines
        try:
            future = asyncio.get_running_loop().run_in_executor(
                self._pool, context.run, self._in_slot, partial(func, *args), client
            )
        except BaseException:
            self._change(-1, client)
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
