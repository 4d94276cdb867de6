"""Requests held while their group scales from zero: bounded, woken by the fleet's changes, counted as demand.

A request for a group the router knows (from a pod's status, or from the ModelGroup resources) that
no device can take now because none serves the group (no pod reports it: scaled to zero) or none of
those is ready (its pods are starting) is neither refused nor dropped: it is held here up to
``SCALE_WAIT_SECONDS`` for a device, then routed as any other. The demand document counts what is
held, which is how the operator learns that a group at zero is wanted. Busy pods are not this case:
they queue requests themselves, or answer 429 when full, as before. Requests that name a device or
a lease are not held either: a pod that is down is an answer about that target.

Bounded: ``SCALE_WAIT_QUEUE`` sequences in all (a request with ``n`` choices counts ``n``); beyond it,
or at the deadline, 503 with ``Retry-After``. A held request looks again only when the fleet state
says which devices serve which group may have changed (``FleetState.on_change``), never on a timer,
and leaves at once when its client disconnects. A streaming client gets 200 and a comment line
(``: loading``) after ``SCALE_WAIT_COMMENT_SECONDS``, then another every ``COMMENT_EVERY_S``: proxies
between it and the router see bytes and keep the connection. From then on its answer is events
(``gpufleet.router.sse.CommittedStream``).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from starlette.types import Receive, Send

from gpufleet.api.errors import GpufleetError, Unavailable
from gpufleet.router.metrics import RouterMetrics
from gpufleet.router.sse import CommittedStream, comment
from gpufleet.routing.policy import Decision, Outcome

log = logging.getLogger(__name__)

# No device serves the group at all, or none of those is ready: what scaling up answers.
WAIT_OUTCOMES = frozenset({Outcome.NO_DEVICES, Outcome.GROUP_NOT_SERVED, Outcome.TARGET_DOWN})
COMMENT_EVERY_S = 5.0  # well under the idle timeouts of common proxies (nginx: 60 s)
RETRY_AFTER_S = 10.0  # a pod takes about this long to start at least; sooner only makes the client spin
LOADING = comment("loading")


def holds(decision: Decision, exclusive: str | None, lease: str | None) -> bool:
    """May a request refused with ``decision`` wait for its group to scale up?"""
    return decision.outcome in WAIT_OUTCOMES and exclusive is None and lease is None


@dataclass
class Held:
    group: str
    weight: int
    since: float


@dataclass
class WaitResult:
    send: Send  # where the answer goes now: a started stream's events, or the client's send as it was
    error: GpufleetError | None = None  # the answer to give instead of routing
    gone: bool = False  # the client left: answer nothing


class ScaleWait:
    """The held requests of one router; outcomes: served (a device may take it: it is routed now),
    timeout, full (refused at once), gone (its client left)."""

    def __init__(
        self, *, seconds: float, capacity: int, comment_after_s: float, metrics: RouterMetrics,
        comment_every_s: float = COMMENT_EVERY_S, clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.seconds = seconds
        self.capacity = capacity  # sequences, in all
        self.comment_after_s = comment_after_s
        self.comment_every_s = comment_every_s
        self.metrics = metrics
        self.clock = clock  # the event loop's timeouts run on real time: so must this
        self.total = 0
        self._held: dict[str, list[Held]] = {}
        self._changed = asyncio.Event()

    @property
    def enabled(self) -> bool:
        return self.seconds > 0

    def wake(self) -> None:
        """The fleet changed: every held request looks again (FleetState.on_change)."""
        if self.total:
            self._changed.set()
            self._changed = asyncio.Event()

    def demand(self) -> dict[str, tuple[int, float]]:
        """Group -> (sequences held, seconds the oldest has waited)."""
        now = self.clock()
        return {
            group: (sum(h.weight for h in held), now - min(h.since for h in held))
            for group, held in self._held.items()
        }

    async def hold(
        self, group: str, weight: int, *, stream: bool, blocked: Callable[[], bool], receive: Receive, send: Send,
        request_id: str,
    ) -> WaitResult:
        """Wait until ``blocked()`` is False (a device may take the request now), the deadline, or the
        client's disconnect."""
        start = self.clock()
        if self.total + weight > self.capacity:
            self._outcome("full", group, weight, 0.0, request_id, streamed=False)
            return WaitResult(send, Unavailable(
                f"no device serves group {group!r} yet and {self.total} sequences already wait for one (of "
                f"{self.capacity})", retry_after_s=RETRY_AFTER_S, code="scale_from_zero_queue_full",
            ))
        held = Held(group, weight, start)
        self._add(held)
        deadline = start + self.seconds
        next_comment = start + self.comment_after_s if stream else math.inf
        stream_out: CommittedStream | None = None
        gone = asyncio.ensure_future(_wait_disconnect(receive))
        result = WaitResult(send)
        outcome = "timeout"
        try:
            while True:
                if not blocked():
                    outcome = "served"
                    break
                now = self.clock()
                if now >= deadline:
                    result.error = Unavailable(
                        f"no device served group {group!r} within {self.seconds:g}s", retry_after_s=RETRY_AFTER_S,
                        code="scale_from_zero_timeout",
                    )
                    break
                if now >= next_comment:
                    if stream_out is None:
                        stream_out = result.send = CommittedStream(send)
                        await stream_out.start(LOADING)
                    else:
                        await send({"type": "http.response.body", "body": LOADING, "more_body": True})
                    next_comment = now + self.comment_every_s
                changed = asyncio.ensure_future(self._changed.wait())
                try:
                    await asyncio.wait({changed, gone}, timeout=min(deadline, next_comment) - now,
                                       return_when=asyncio.FIRST_COMPLETED)
                finally:
                    changed.cancel()
                if gone.done():
                    outcome, result.gone = "gone", True
                    break
        finally:
            gone.cancel()
            self._remove(held)
        self._outcome(outcome, group, weight, self.clock() - start, request_id, streamed=stream_out is not None)
        return result

    def _add(self, held: Held) -> None:
        self._held.setdefault(held.group, []).append(held)
        self.total += held.weight
        self._gauge(held.group)

    def _remove(self, held: Held) -> None:
        group = self._held.get(held.group, [])
        group.remove(held)
        if not group:
            del self._held[held.group]
        self.total -= held.weight
        self._gauge(held.group)

    def _gauge(self, group: str) -> None:
        self.metrics.scale_waiting.labels(group).set(sum(h.weight for h in self._held.get(group, [])))

    def _outcome(
        self, outcome: str, group: str, weight: int, seconds: float, request_id: str, *, streamed: bool
    ) -> None:
        self.metrics.scale_wait_done(outcome, seconds)
        level = logging.INFO if outcome in ("served", "gone") else logging.WARNING
        log.log(level, "scale-from-zero wait ended", extra={
            "request_id": request_id, "group": group, "outcome": outcome, "waited_s": round(seconds, 3),
            "sequences": weight, "streamed": streamed, "held_now": self.total,
        })


async def _wait_disconnect(receive: Receive) -> None:
    # The body has been read: the next message can only be the disconnect.
    while (await receive())["type"] != "http.disconnect":
        pass
