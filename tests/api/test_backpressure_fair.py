"""Fair analysis slots (:class:`pneumo.api.backpressure.FairSlots`): cheap clients first, expensive ones capped.

Before: slots went first come, first served; two clients sending decode bombs in a loop left the
others 23% of their goodput (``benchmarks/hostile_load.py``). Driven with real threads and events.
"""

from __future__ import annotations

import threading

from pneumo.api.backpressure import FairSlots


def _teach(slots: FairSlots, client: str, seconds: float, times: int = 5) -> None:
    """Give ``client`` a history of requests that held a slot ``seconds`` each."""
    for _ in range(times):
        expensive = slots.acquire(client, 1.0)
        assert expensive is not None
        slots.release(client, expensive, seconds)


def _waiter(slots: FairSlots, client: str, order: list[str], timeout: float = 10.0) -> threading.Thread:
    def wait() -> None:
        if slots.acquire(client, timeout) is not None:
            order.append(client)

    thread = threading.Thread(target=wait)
    thread.start()
    return thread


def _until_waiting(slots: FairSlots, count: int) -> None:
    import time

    deadline = time.monotonic() + 10
    while len(slots._waiting) < count and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(slots._waiting) == count


def test_a_freed_slot_goes_to_the_cheapest_waiting_client() -> None:
    slots = FairSlots(1)
    _teach(slots, "bomber", 3.0, times=1)
    _teach(slots, "ward", 0.05)
    held = slots.acquire("ward", 1.0)
    assert held is False
    order: list[str] = []
    first = _waiter(slots, "bomber", order, timeout=0.5)  # came first
    _until_waiting(slots, 1)
    second = _waiter(slots, "ward", order)
    _until_waiting(slots, 2)
    slots.release("ward", held, 0.05)
    second.join(timeout=10)
    first.join(timeout=10)
    assert order == ["ward"], "the cheap client passes the expensive one that came first"


def test_expensive_clients_never_hold_every_slot() -> None:
    slots = FairSlots(2)
    _teach(slots, "bomber", 3.0, times=1)
    _teach(slots, "bomber-2", 3.0, times=1)
    assert slots.acquire("bomber", 1.0) is True
    assert slots.acquire("bomber-2", 0.3) is None, "the last free slot stays for ordinary clients"
    assert slots.acquire("ward", 0.3) is False


def test_expensive_clients_get_a_small_share_of_time_while_others_are_served() -> None:
    slots = FairSlots(2)  # the share: 10% of 2 slots over a 30 s time constant, 6 s
    _teach(slots, "bomber", 3.0, times=2)  # unknown at first (counted ordinary), then 3 s of expensive work
    assert slots.acquire("bomber", 0.3) is True, "within the share, the expensive client is served"
    slots.release("bomber", True, 3.0)
    _teach(slots, "ward", 0.05)  # now ordinary clients are being served
    assert slots.acquire("bomber", 0.3) is None, "over its share while others are served: it waits"
    assert slots.acquire("ward", 0.3) is False
