"""Before answering 404 for a model no pod has reported, ask the pods once.

A group added to a pool is served by its pods seconds before their status reaches the router
by the usual paths (the Lease watch, answers' status versions, idle polls): a client that saw
the model in ``/v1/models`` (fanned out to the pods) must not then be told it does not exist.
One status fetch of every pod, shared by every request that asks meanwhile, and at most one
per ``min_interval_s``, so a client repeating an unknown name cannot make the router poll in a
loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

Clock = Callable[[], float]


class ModelRefresh:
    def __init__(self, fetch: Callable[[], Awaitable[None]], clock: Clock, min_interval_s: float = 1.0) -> None:
        self._fetch = fetch
        self._clock = clock
        self._min_interval_s = min_interval_s
        self._last: float | None = None
        self._running: asyncio.Task[None] | None = None
        self.fetches = 0

    async def __call__(self) -> None:
        """Return once the pods' statuses are as fresh as one fetch within the interval makes them."""
        if self._running is None:
            now = self._clock()
            if self._last is not None and now - self._last < self._min_interval_s:
                return
            self._last = now
            self.fetches += 1
            self._running = asyncio.ensure_future(self._fetch())
            self._running.add_done_callback(self._done)
        await asyncio.shield(self._running)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._running = None
        if not task.cancelled():
            task.exception()  # a failed fetch is the pods' to report (polling logs it); read it here
