"""A pod's devices as routing sees them: its record's documents and reports, with this router's own
traffic, turned into the pure policy's ``DeviceState``s (pure: everything comes in as arguments).

Load per device is what the router has in flight there plus what the pod last reported beyond
that (other routers' traffic), dropped once stale. Residency comes from the status document;
the groups waiting on each device from the queue document, overlaid with the groups the router
sent there that wait for a switch (``Tickets.waiting``). A switch time the pod measured
(``last_switch_unix``, its wall clock) is moved to the router's clock through the document's
own timestamp.
"""

from __future__ import annotations

from gpufleet.router.registry import PodRecord
from gpufleet.router.reports import Freshness
from gpufleet.router.tickets import Tickets
from gpufleet.routing.policy import DeviceState


def device_states(
    rec: PodRecord,
    now: float,
    freshness: Freshness,
    tickets: Tickets,
    *,
    usable: bool = True,
    only: str | None = None,
) -> list[DeviceState]:
    """``rec``'s devices (or only the one named ``only``); ``usable`` False marks them unhealthy
    (a pod a retry must avoid)."""
    doc = rec.status
    if doc is None or rec.status_at is None:
        return []
    healthy = usable and rec.routable
    fresh = freshness.fresh(rec.contact_at, now)
    load_fresh = freshness.fresh(rec.load_at, now)
    groups_fresh = freshness.fresh(rec.groups_at, now)
    groups = frozenset(doc.groups) if doc.groups else None
    node = doc.node or rec.node
    states = []
    for d in doc.devices:
        if only is not None and d.device != only:
            continue
        key = f"{rec.name}/{d.device}"
        waiting_groups = rec.waiting_groups.get(d.device, frozenset()) if groups_fresh else frozenset()
        sent = tickets.waiting(key, d.switching_to or d.current_group, now)
        if sent is not None:
            waiting_groups = waiting_groups | {sent}
        last_switch = rec.status_at - (doc.timestamp - d.last_switch_unix) if d.last_switch_unix is not None else None
        states.append(
            DeviceState(
                pod=rec.name,
                device=d.device,
                node=node,
                current_group=d.current_group,
                cached_groups=frozenset(d.cached_groups),
                failed_groups=frozenset(d.failed_groups),
                healthy=healthy and d.healthy,
                workers=d.workers,
                queue_limit=d.queue_limit,
                load=tickets.inflight.get(key, 0) + (rec.others.get(d.device, 0) if load_fresh else 0),
                waiting=rec.waiting.get(d.device, 0) if load_fresh else 0,
                waiting_groups=waiting_groups,
                switching_to=d.switching_to,
                switch_s_from_cache=d.switch_seconds_from_cache,
                switch_s_from_disk=d.switch_seconds_from_disk,
                last_switch_at=last_switch,
                fresh=fresh,
                last_used_at=tickets.last_used.get(key),
                uuid=d.uuid,
                groups=groups,
            )
        )
    return states
