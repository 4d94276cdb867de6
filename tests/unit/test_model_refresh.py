"""ModelRefresh: one shared fetch at a time, at most one per interval."""

from __future__ import annotations

import asyncio

import pytest

from gpufleet.router.model_refresh import ModelRefresh

pytestmark = pytest.mark.unit


async def test_concurrent_callers_share_one_fetch_and_the_interval_bounds_the_next() -> None:
    now = [100.0]
    gate = asyncio.Event()
    calls = []

    async def fetch() -> None:
        calls.append(now[0])
        await gate.wait()

    refresh = ModelRefresh(fetch, lambda: now[0], min_interval_s=1.0)
    waiters = [asyncio.ensure_future(refresh()) for _ in range(3)]
    for _ in range(10):  # let the callers and the fetch they started run to their first wait
        await asyncio.sleep(0)
    assert calls == [100.0] and not any(w.done() for w in waiters)  # all wait for the one fetch
    gate.set()
    await asyncio.gather(*waiters)
    now[0] = 100.5
    await refresh()  # within the interval: nothing fetched, nothing waited for
    assert calls == [100.0]
    now[0] = 101.5
    await refresh()
    assert calls == [100.0, 101.5]


async def test_a_failed_fetch_is_raised_to_its_callers_and_the_next_one_can_run() -> None:
    now = [0.0]

    async def fetch() -> None:
        raise OSError("unreachable")

    refresh = ModelRefresh(fetch, lambda: now[0], min_interval_s=1.0)
    with pytest.raises(OSError):
        await refresh()
    now[0] = 2.0
    with pytest.raises(OSError):
        await refresh()
    assert refresh.fetches == 2
