"""This router's own traffic: what it has in flight on each device and of each group, the groups it
sent to devices that did not hold them, and the service time learned from the answers (fleet-wide,
and per group for the demand document).

Every proxied request holds a ``Ticket`` from ``begin`` to ``finish``: its weight (its choices)
counts in its device's load until then. A group sent to a device that does not hold it is
*expected* there: it waits for a switch until the pod's documents say otherwise (``confirm``,
``settle``) or the expectation expires, so the next request of that group can join it instead of
making another device switch. The device, not the router, decides when it switches. Keys are
``pod/device``; time comes from the clock passed in.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from gpufleet.routing.service_time import ServiceTime

QUEUE_CATCH_UP_S = 1.0  # a queue document this much younger than a send has seen it


@dataclass
class Expectation:
    group: str
    since: float


@dataclass
class Ticket:
    """One proxied request's claim on a device's load; ``Tickets.finish`` releases it."""

    pod: str
    key: str
    group: str
    started_at: float = 0.0
    switched: bool = False  # the pod switched groups for it: its time is not service time
    device: str = ""  # the device the router chose (the pod may report another in x-served-by-device)
    idle: bool = False  # nothing was queued ahead of it: its duration is pure service time
    done: bool = False
    weight: int = 1  # sequences it takes on the device (its choices, n)


class Tickets:
    def __init__(self, clock: Callable[[], float], expectation_ttl_s: float) -> None:
        self.clock = clock
        self.expectation_ttl_s = expectation_ttl_s
        self.inflight: dict[str, int] = {}  # "pod/device" -> requests this router has there
        self.group_inflight: dict[str, int] = {}  # group -> sequences this router has at pods
        self.last_used: dict[str, float] = {}
        self.sequence = 0
        self.service = ServiceTime()  # a request's time on an idle device, learned from answers
        self.group_service: dict[str, ServiceTime] = {}  # the same, per group
        self.expected: dict[str, Expectation] = {}
        self._expiries: list[tuple[float, str]] = []  # (when an expectation ends, device key)

    def begin(self, pod: str, device: str, group: str, *, idle: bool = False, weight: int = 1) -> Ticket:
        key = f"{pod}/{device}"
        self.inflight[key] = self.inflight.get(key, 0) + weight
        self.group_inflight[group] = self.group_inflight.get(group, 0) + weight
        now = self.last_used[key] = self.clock()
        self.sequence += 1
        return Ticket(pod, key, group, started_at=now, idle=idle, device=device, weight=weight)

    def served(self, ticket: Ticket, device: str | None, switched: bool) -> str | None:
        """The pod answered: it names the device that served, and whether it switched groups for it.
        The key whose figures that changed, if any."""
        if not device:
            return None
        key = f"{ticket.pod}/{device}"
        moved = key != ticket.key and not ticket.done
        if moved:
            self.inflight[ticket.key] = max(0, self.inflight.get(ticket.key, 0) - ticket.weight)
            self.inflight[key] = self.inflight.get(key, 0) + ticket.weight
            ticket.key = key
        if switched:
            ticket.switched = True
            self.expect(key, ticket.group)
        return key if moved or switched else None

    def finish(self, ticket: Ticket, *, ok: bool = False) -> bool:
        """Release the ticket (True the first time); ``ok`` answers from an idle device that switched
        nothing teach the service time."""
        if ticket.done:
            return False
        ticket.done = True
        self.inflight[ticket.key] = max(0, self.inflight.get(ticket.key, 0) - ticket.weight)
        left = self.group_inflight.get(ticket.group, 0) - ticket.weight
        if left > 0:
            self.group_inflight[ticket.group] = left
        else:
            self.group_inflight.pop(ticket.group, None)  # groups come and go: keep only those with traffic
        if ok and ticket.idle and not ticket.switched:
            seconds = self.clock() - ticket.started_at
            self.service.observe(seconds)
            self.group_service.setdefault(ticket.group, ServiceTime()).observe(seconds)
        return True

    # --- expectations -----------------------------------------------------------------------------

    def expect(self, key: str, group: str) -> None:
        now = self.clock()
        self.expected[key] = Expectation(group, now)
        heapq.heappush(self._expiries, (now + self.expectation_ttl_s, key))

    def waiting(self, key: str, resident: str | None, now: float) -> str | None:
        """The group this router sent to ``key`` that waits there for a switch, if any."""
        exp = self.expected.get(key)
        if exp is None or now - exp.since >= self.expectation_ttl_s or resident == exp.group:
            return None
        return exp.group

    def confirm(self, key: str, resident: str | None) -> None:
        """A status document shows ``resident`` on ``key``: an expectation of it has come true."""
        exp = self.expected.get(key)
        if exp is not None and resident == exp.group:
            del self.expected[key]

    def settle(self, key: str, waiting_groups: Iterable[str], now: float) -> None:
        """A queue document taken well after the send that no longer lists the group: it was served (or left)."""
        exp = self.expected.get(key)
        if exp is not None and now - exp.since > QUEUE_CATCH_UP_S and exp.group not in waiting_groups:
            del self.expected[key]

    def expired(self, now: float) -> list[str]:
        """Keys whose expectation has run out since last asked (their devices changed with time)."""
        keys = []
        while self._expiries and self._expiries[0][0] <= now:
            keys.append(heapq.heappop(self._expiries)[1])
        return keys
