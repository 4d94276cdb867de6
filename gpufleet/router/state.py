"""What the router knows about its fleet, and the one entry point of its routing decisions.

``FleetState`` puts together parts with one job each:

- ``registry``: which pods there are, what they are called, which models they serve;
- ``reports``: what each pod reported (status, load and queue documents) and how fresh each
  figure is; which pods are due a poll;
- ``tickets``: this router's own traffic (in-flight requests, groups it sent that wait for a
  switch, the service time learned from answers);
- ``devices``: a pod's ``DeviceState``s made from all that (pure);
- ``fleet_index``: the kept index of every device, brought up to date in one place before each
  decision;
- ``catalog``: the groups the ModelGroup resources declare (Kubernetes), served by a pod or not.

Inputs arrive from the edges (discovery, status and queue polls, proxied responses) through the
methods below; each hands them to its part and notes which pods changed (``FleetIndex.touch``).
``decide`` is the one way to a decision: it owns the rule for when the kept index may answer.
Every method takes its time from the injected clock (monotonic seconds), so tests drive time by hand.
``on_change`` is called whenever which devices may serve which group may have changed (a pod came,
went, became ready or not, was ejected or re-admitted; the resources' models changed): requests held
until a device serves their group wait on it instead of polling.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from gpufleet.api.device_report import QueueDocument
from gpufleet.api.load_report import LoadReport
from gpufleet.api.pod_status import PodStatus
from gpufleet.router import reports, tenancy
from gpufleet.router.catalog import Catalog
from gpufleet.router.devices import device_states
from gpufleet.router.ejection import EjectionPolicy
from gpufleet.router.fleet_index import RESYNC_BATCH, FleetIndex
from gpufleet.router.registry import PodRecord, Registry
from gpufleet.router.reports import Freshness
from gpufleet.router.tickets import Ticket, Tickets
from gpufleet.routing import leases
from gpufleet.routing.index import DeviceIndex
from gpufleet.routing.policy import Costs, Decision, DeviceState, RouteRequest, Snapshot, choose_device

Clock = Callable[[], float]
Policy = Callable[[RouteRequest, Snapshot], Decision]

__all__ = ["Clock", "EjectionPolicy", "FleetState", "PodRecord", "Policy", "Ticket"]


class FleetState:
    def __init__(
        self,
        *,
        clock: Clock = time.monotonic,
        stale_after_s: float = 10.0,
        ejection: EjectionPolicy | None = None,
        costs: Costs | None = None,
        expectation_ttl_s: float | None = None,
    ) -> None:
        self.clock = clock
        self.costs = costs or Costs()
        self.freshness = Freshness(stale_after_s)
        self.registry = Registry(
            ejection or EjectionPolicy(),
            on_unindex=self._unindexed,
            on_upsert=self._upserted,
        )
        self.tickets = Tickets(clock, expectation_ttl_s if expectation_ttl_s is not None else max(30.0, stale_after_s))
        self.kept = FleetIndex(self.registry, self.freshness, self._states, clock)
        # Discovery's news go straight to the registry; it tells the index what changed.
        self.upsert = self.registry.upsert
        self.remove = self.registry.remove
        self.replace_all = self.registry.replace_all
        self.on_eject: Callable[[str, bool], None] = lambda pod, ejected: None
        self.on_change: Callable[[], None] = lambda: None  # see the module docstring
        self.leases: leases.LeaseView = leases.NoLeases()  # the router's lease store, set by the app
        self.catalog = Catalog()

    def _upserted(self, rec: PodRecord) -> None:
        self.kept.touch(rec)
        self.on_change()

    def _unindexed(self, rec: PodRecord) -> None:
        self.kept.drop(rec)
        self.on_change()

    # --- what the parts hold, as the rest of the router reads it -------------------------------------

    @property
    def pods(self) -> dict[str, PodRecord]:
        return self.registry.pods

    @property
    def by_name(self) -> dict[str, PodRecord]:
        return self.registry.by_name

    @property
    def models(self) -> dict[str, str]:
        return self.registry.models

    @property
    def local_models(self) -> dict[str, str]:
        return self.registry.local_models

    @property
    def inflight(self) -> dict[str, int]:
        return self.tickets.inflight

    @property
    def group_inflight(self) -> dict[str, int]:
        return self.tickets.group_inflight

    @property
    def sequence(self) -> int:
        return self.tickets.sequence

    @property
    def index(self) -> DeviceIndex:
        return self.kept.index

    @property
    def service_s(self) -> float | None:
        return self.tickets.service.seconds

    def costs_now(self) -> Costs:
        return self.tickets.service.costs(self.costs)

    # --- what pods report ---------------------------------------------------------------------------

    def observe_status(self, pod_id: str, doc: PodStatus, *, contact: bool = True) -> None:
        """A status document arrived (a poll, or a Kubernetes annotation when ``contact`` is False)."""
        rec = self.pods.get(pod_id)
        if rec is None:
            return
        if rec.tenant:
            doc = tenancy.qualify_status(doc, rec.tenant)
        now = self.clock()
        renamed = rec.status is None or rec.status.pod != doc.pod or rec.status.models != doc.models
        old_base = rec.base_name
        reports.note_status(rec, doc, now, contact=contact)
        if renamed:
            self.registry.status_changed(rec, old_base)
        if contact:
            self._contact(rec, now)
        for d in doc.devices:  # the document may have caught up with what we expected
            self.tickets.confirm(f"{rec.name}/{d.device}", d.switching_to or d.current_group)
        self.kept.touch(rec)
        self.on_change()

    def observe_model_groups(self, kind: str, namespace: str, payload: Any) -> None:
        """A ModelGroup watch event, or a namespace's fresh list (``Catalog.apply``)."""
        if self.catalog.apply(kind, namespace, payload):
            self.registry.set_known(self.catalog.models())
            self.on_change()

    def observe_load(self, pod: str, report: LoadReport) -> None:
        """A pod's answer carried its load (``endpoint-load-metrics``): as good as a queue poll for the counts."""
        rec = self.by_name.get(pod)
        if rec is None:
            return
        now = self.clock()
        rec.contact_at = now
        self.kept.touch(rec, reports.note_load(rec, report, now, self.inflight))

    def observe_queue(self, pod_id: str, doc: QueueDocument) -> None:
        """A queue document arrived (a poll): the counts, and which groups wait on each device."""
        rec = self.pods.get(pod_id)
        if rec is None:
            return
        now = self.clock()
        reports.note_queue(rec, doc, now, self.inflight)
        for device, groups in rec.waiting_groups.items():
            self.tickets.settle(f"{rec.name}/{device}", groups, now)
        self._contact(rec, now)
        self.kept.touch(rec)

    def observe_failure(self, pod_id: str, error: str) -> None:
        """A poll of the pod failed (refused, timed out, bad answer). Not counted before the pod's first
        answer: a pod still starting (scaled up from zero, say) is no outlier, and ejecting it would
        keep it out of rotation for a cool-down after it is up. Failed requests count from the start."""
        rec = self.pods.get(pod_id)
        if rec is None:
            return
        if rec.contact_at is None:
            rec.outlier.last_error = error
            return
        if rec.outlier.failure(self.clock(), error):
            self._ejected(rec)

    def due_status(self, idle_poll_s: float) -> list[PodRecord]:
        """Pods whose status document should be fetched now: none yet, announced newer, or idle too long."""
        return reports.due_status(self.pods.values(), self.clock(), idle_poll_s)

    def due_queue(self, idle_poll_s: float) -> list[PodRecord]:
        """Pods whose load nothing has reported for ``idle_poll_s`` (answers report it otherwise)."""
        return reports.due_queue(self.pods.values(), self.clock(), idle_poll_s)

    def _contact(self, rec: PodRecord, now: float) -> None:
        rec.contact_at = now
        if rec.outlier.success(now):
            self.on_eject(rec.name, False)
            self.on_change()
        self.kept.touch(rec, ())  # fresh again, or back in rotation: its time flags say so

    # --- proxied requests ---------------------------------------------------------------------------

    def begin(self, pod: str, device: str, group: str, *, idle: bool = False, weight: int = 1) -> Ticket:
        ticket = self.tickets.begin(pod, device, group, idle=idle, weight=weight)
        self.kept.touch_key(ticket.key)
        return ticket

    def expect(self, pod: str, device: str, group: str) -> None:
        """The router just sent ``group`` to a device that did not hold it: assume the switch."""
        key = f"{pod}/{device}"
        self.tickets.expect(key, group)
        self.kept.touch_key(key)

    def served(self, ticket: Ticket, device: str | None, switched: bool) -> None:
        """The pod answered: it names the device that served, and whether it switched groups."""
        before = ticket.key
        changed = self.tickets.served(ticket, device, switched)
        if changed is not None:
            self.kept.touch_key(before)
            self.kept.touch_key(changed)
        rec = self.by_name.get(ticket.pod)
        if rec is not None:
            self._contact(rec, self.clock())

    def finish(self, ticket: Ticket, *, ok: bool = False) -> None:
        """Release the ticket; ``ok`` answers from an idle device that switched nothing teach the
        service time."""
        if self.tickets.finish(ticket, ok=ok):
            self.kept.touch_key(ticket.key)

    def failed(self, pod: str, error: str) -> bool:
        """A request to ``pod`` failed before its first byte; True when that ejects it."""
        rec = self.by_name.get(pod)
        if rec is None:
            return False
        ejected = rec.outlier.failure(self.clock(), error)
        if ejected:
            self._ejected(rec)
        return ejected

    def _ejected(self, rec: PodRecord) -> None:
        # Whatever comes back after an ejection (a restarted process, say) must show a fresh
        # status document, ready, before it is routed to again. In Kubernetes the Pod's own
        # readiness already says that.
        rec.confirmed = rec.annotated
        self.on_eject(rec.name, True)
        self.kept.touch(rec)
        self.on_change()

    # --- decisions ----------------------------------------------------------------------------------

    def decide(
        self, request: RouteRequest, policy: Policy = choose_device, exclude: frozenset[str] = frozenset()
    ) -> Decision:
        """``policy`` over the whole fleet, less the pods in ``exclude`` (a retry's). The kept index
        answers as ``choose_device`` over a full snapshot would, from a bounded candidate set, when it
        holds what that snapshot would: for ``choose_device``, nothing excluded, and no lease in play
        (neither the request's nor the fleet's: the index knows no leases). Otherwise the policy
        runs over a full snapshot."""
        if policy is choose_device and not exclude and request.lease is None and not self.held_devices():
            now = self.clock()
            self.resync(now=now)
            return self.index.choose(request, now, self.costs_now())
        return policy(request, self.snapshot(exclude))

    def resync(self, budget: int = RESYNC_BATCH, *, now: float | None = None) -> None:
        """Bring the kept index up to date (``FleetIndex.refresh``)."""
        now = self.clock() if now is None else now
        self.kept.refresh(now, self.tickets.expired(now), budget)

    def _states(self, rec: PodRecord, now: float, only: str | None = None) -> list[DeviceState]:
        return device_states(rec, now, self.freshness, self.tickets, only=only)

    def snapshot(self, exclude: frozenset[str] = frozenset()) -> Snapshot:
        now = self.clock()
        states = [
            d
            for rec in self.pods.values()
            for d in device_states(rec, now, self.freshness, self.tickets, usable=rec.name not in exclude)
        ]
        snap = Snapshot(tuple(states), now=now, costs=self.costs_now())
        return leases.with_leases(snap, self.leases.all(), self.leases.now())

    def held_devices(self) -> dict[str, leases.Lease]:
        """Device key -> the live lease holding it."""
        return leases.held_devices(self.leases.all(), self.leases.now())

    def pod_has_lease(self, pod: str) -> bool:
        prefix = f"{pod}/"
        return any(key.startswith(prefix) for key in self.held_devices())

    # --- views --------------------------------------------------------------------------------------

    def routable(self, rec: PodRecord) -> bool:
        return rec.routable

    @property
    def ready(self) -> bool:
        return any(r.routable for r in self.pods.values())

    def pod_state(self, rec: PodRecord) -> str:
        return self.freshness.state(rec, self.clock())

    def describe(self) -> dict[str, Any]:
        """The router's view of its fleet, for ``/api/fleet`` and for debugging."""
        now = self.clock()
        snap = {d.key: d for d in self.snapshot().devices}
        pods = {}
        for rec in self.pods.values():
            pods[rec.name] = {
                "id": rec.id,
                "url": rec.url,
                "node": (rec.status.node if rec.status else None) or rec.node,
                "state": self.pod_state(rec),
                "status_from": "kubernetes" if rec.annotated else ("poll" if rec.status else None),
                "ready": rec.ready,
                "ejected": not rec.outlier.admitted,
                "ejected_for_s": round(rec.outlier.ejected_until - now, 3) if rec.outlier.ejected_until else None,
                "consecutive_failures": rec.outlier.failures,
                "last_error": rec.outlier.last_error,
                "last_contact_s_ago": round(now - rec.contact_at, 3) if rec.contact_at is not None else None,
                "devices": {
                    d.device: {
                        "current_group": d.current_group,
                        "switching_to": d.switching_to,
                        "cached_groups": sorted(d.cached_groups),
                        "failed_groups": sorted(d.failed_groups),
                        "healthy": d.healthy,
                        "fresh": d.fresh,
                        "load": d.load,
                        "router_inflight": self.inflight.get(d.key, 0),
                        "capacity": d.capacity,
                        "uuid": d.uuid,
                        "leased_by": d.leased_by,
                    }
                    for key, d in snap.items()
                    if d.pod == rec.name
                },
            }
        return {
            "ready": self.ready,
            "pods": pods,
            "models": dict(sorted(self.models.items())),
            "service_s": round(self.service_s, 4) if self.service_s is not None else None,
        }
