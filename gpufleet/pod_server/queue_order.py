"""What a device does next with its queue: a pure function over the queue's state.

A device serves the queued work of its current group, batched up to its sequence limit, before
it switches: switching costs a weight copy (or a load), and a FIFO queue that alternates two
groups would switch on every request. Two bounds keep this fair:

- ``max_wait_s``: once another group's oldest request has waited this long, the current group
  takes no new work; the device drains and switches to the group waiting longest.
- ``min_residency_s``: a group that just became current is not evicted for a waiting group
  before this, so two busy groups do not ping-pong.

With no work queued for the current group, the device switches to the group waiting longest
as soon as its running work has drained, or, with ``linger_s``, once that group has waited
so long: the current group's next request may arrive meanwhile and be served without a switch
back (fewer switches, for a wait of at most ``linger_s``; bench/results/routing_quality.json
has the curve).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


@dataclass(frozen=True)
class GroupQueue:
    group: str
    waiting: int  # requests queued for the group
    oldest_at: float  # enqueue time of its oldest request (same clock as QueueState.now)
    head_weight: int = 1  # sequences the oldest request needs (n > 1 takes n)


@dataclass(frozen=True)
class QueueState:
    current_group: str | None
    running: int  # sequences (and embedding requests) running on the device
    capacity: int  # the most that may run at once
    queues: tuple[GroupQueue, ...]  # groups with queued work, any order
    now: float
    current_since: float | None = None  # when the current group became current


@dataclass(frozen=True)
class QueuePolicy:
    max_wait_s: float = 5.0
    min_residency_s: float = 2.0
    linger_s: float = 0.5  # SWITCH_LINGER_S


class Action(StrEnum):
    ADMIT = "admit"  # start queued work of the current group
    DRAIN = "drain"  # take no new work; wait for running work to finish, then switch
    SWITCH = "switch"  # make ``group`` current now (nothing is running)
    WAIT = "wait"  # nothing to do until something changes


@dataclass(frozen=True)
class Next:
    action: Action
    group: str | None = None  # ADMIT: the current group; DRAIN/SWITCH: the group to switch to
    reason: str = ""


def next_action(state: QueueState, policy: QueuePolicy) -> Next:
    if not state.queues:
        return Next(Action.WAIT, reason="queue empty")
    mine = next((q for q in state.queues if q.group == state.current_group), None)
    others = sorted((q for q in state.queues if q.group != state.current_group), key=lambda q: q.oldest_at)
    if mine is None:
        target = others[0]
        lingering = state.current_group is not None and state.now - target.oldest_at < policy.linger_s
        if state.running == 0 and lingering:
            return Next(Action.WAIT, reason=f"lingering on {state.current_group}")
        if state.running == 0:
            return Next(Action.SWITCH, target.group, "no work for the current group")
        return Next(Action.DRAIN, target.group, "no work for the current group; draining")
    if others:
        oldest = others[0]
        waited = state.now - oldest.oldest_at
        resident_for = state.now - state.current_since if state.current_since is not None else float("inf")
        if waited >= policy.max_wait_s and resident_for >= policy.min_residency_s:
            if state.running == 0:
                return Next(Action.SWITCH, oldest.group, f"{oldest.group} waited {waited:.2f}s")
            return Next(Action.DRAIN, oldest.group, f"{oldest.group} waited {waited:.2f}s; draining")
    if state.running + mine.head_weight <= state.capacity or state.running == 0:
        return Next(Action.ADMIT, mine.group, "current group has work")
    return Next(Action.WAIT, reason="batch full")


def switch_deadline(state: QueueState, policy: QueuePolicy) -> float | None:
    """When ``next_action`` could next change its mind without any event (the starvation bound)."""
    others = [q.oldest_at for q in state.queues if q.group != state.current_group]
    if not others or state.current_group is None:
        return None
    if not any(q.group == state.current_group for q in state.queues):
        return min(others) + policy.linger_s if policy.linger_s > 0 else None
    at = min(others) + policy.max_wait_s
    if state.current_since is not None:
        at = max(at, state.current_since + policy.min_residency_s)
    return at
