"""What the router knows about its fleet, and the routing snapshot made from it.

Inputs arrive from the edges (discovery, status and queue polls, proxied responses);
``snapshot()`` turns them into the pure policy's ``Snapshot``. Every method takes its
time from the injected clock (monotonic seconds), so tests drive time by hand.

Load per device is what the router has in flight there plus what the pod reported
beyond that at its last queue poll (other routers' traffic), dropped once stale. The time
a request holds a worker, which turns queue length into seconds, is learned from answers
of requests that found their device idle.
Residency comes from the pods' status documents; the groups waiting on each device from their
queue documents, overlaid with the router's own sends: a group sent to a device that does not
hold it waits there for a switch until a document says otherwise, so the next request of that
group can join it instead of making another device switch. The device, not the router,
decides when it switches (``pod_server.queue_order``).
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from gpufleet.api.load_report import LoadReport
from gpufleet.api.pod_status import PodStatus
from gpufleet.router import tenancy
from gpufleet.router.ejection import Outlier
from gpufleet.routing import leases
from gpufleet.routing.index import DeviceIndex
from gpufleet.routing.policy import Costs, Decision, DeviceState, RouteRequest, Snapshot, choose_device
from gpufleet.routing.service_time import ServiceTime

Clock = Callable[[], float]
QUEUE_CATCH_UP_S = 1.0  # a queue document this much younger than a send has seen it
RESYNC_BATCH = 16  # pods a decision looks at for changes that time alone made


@dataclass(frozen=True)
class EjectionPolicy:
    threshold: int = 3
    cooldown_s: float = 10.0
    cooldown_max_s: float = 120.0

    def new(self) -> Outlier:
        return Outlier(self.threshold, self.cooldown_s, self.cooldown_max_s)


@dataclass
class PodRecord:
    """One pod server as discovered, with the latest figures it gave."""

    id: str  # discovery key: the URL (static) or namespace/name (kubernetes)
    url: str | None
    outlier: Outlier
    hint_name: str | None = None  # Kubernetes' Pod name, before any status document
    node: str | None = None
    discovered_ready: bool = True  # Kubernetes readiness; always True for static URLs
    status: PodStatus | None = None
    status_at: float | None = None  # clock time the document was observed
    contact_at: float | None = None  # last successful poll of this pod
    others: dict[str, int] = field(default_factory=dict)  # device -> load beyond ours at the last queue poll
    queue_doc: dict[str, Any] | None = None
    # device -> requests queued there, from the latest queue poll or load report (an answer carries
    # one; busy pods are never polled, so the queue document alone would go stale under load)
    waiting: dict[str, int] = field(default_factory=dict)
    queue_at: float | None = None
    annotated: bool = False  # its status comes from Kubernetes (the pod's status Lease)
    tenant: str | None = None  # its namespace: its group and model ids are qualified by it (router.tenancy)
    confirmed: bool = True  # False after an ejection until a new status document arrives
    status_due: bool = False  # an answer announced a newer status version than the document we hold
    indexed: set[str] = field(default_factory=set)  # its device keys in FleetState.index
    signature: tuple[object, ...] = ()  # its time-dependent flags when last indexed
    name: str = ""  # unique routing name, set by FleetState

    @property
    def base_name(self) -> str:
        if self.status is not None:
            return self.status.pod
        return self.hint_name or urlsplit(self.url or self.id).netloc or self.id

    @property
    def ready(self) -> bool:
        return (
            self.discovered_ready
            and self.confirmed
            and self.status is not None
            and self.status.ready
            and self.url is not None
        )


@dataclass
class _Expectation:
    group: str
    since: float


@dataclass
class Ticket:
    """One proxied request's claim on a device's load; ``FleetState.finish`` releases it."""

    pod: str
    key: str
    group: str
    started_at: float = 0.0
    switched: bool = False  # the pod switched groups for it: its time is not service time
    device: str = ""  # the device the router chose (the pod may report another in x-served-by-device)
    idle: bool = False  # nothing was queued ahead of it: its duration is pure service time
    done: bool = False


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
        self.stale_after_s = stale_after_s
        self.ejection = ejection or EjectionPolicy()
        self.costs = costs or Costs()
        self.expectation_ttl_s = expectation_ttl_s if expectation_ttl_s is not None else max(30.0, stale_after_s)
        self.pods: dict[str, PodRecord] = {}
        self.by_name: dict[str, PodRecord] = {}
        self._models: dict[str, str] | None = {}  # model id -> group, union of every pod's (None: rebuild)
        self._local_models: dict[str, str] = {}  # qualified model id (or its alias) -> the pod servers' id
        self.inflight: dict[str, int] = {}  # "pod/device" -> requests this router has there
        self.last_used: dict[str, float] = {}
        self.expected: dict[str, _Expectation] = {}
        self.sequence = 0
        self.service = ServiceTime()  # a request's time on an idle device, learned from answers
        self.index = DeviceIndex()  # every device as routing sees it, kept as it changes
        self._sweep: list[PodRecord] | None = None  # pods in the order resync() visits them
        self._base_counts: dict[str, int] = {}  # pods per base name, as _reindex last counted
        self._sweep_at = 0
        self._expiries: list[tuple[float, str]] = []  # (when an expectation ends, device key)
        self.on_eject: Callable[[str, bool], None] = lambda pod, ejected: None
        self.leases: leases.LeaseView = leases.NoLeases()  # the router's lease store, set by the app

    # --- discovery ----------------------------------------------------------------------------

    def upsert(
        self,
        pod_id: str,
        url: str | None,
        *,
        name: str | None = None,
        node: str | None = None,
        ready: bool = True,
        tenant: str | None = None,
    ) -> PodRecord:
        rec = self.pods.get(pod_id)
        if rec is None:
            rec = self.pods[pod_id] = PodRecord(
                pod_id, url, self.ejection.new(), hint_name=name, node=node, tenant=tenant
            )
        before = (rec.name, rec.base_name)
        rec.url, rec.hint_name, rec.node, rec.discovered_ready = url, name or rec.hint_name, node or rec.node, ready
        base = rec.base_name
        if before == (base, base) and self.by_name.get(base) is rec:
            pass  # the same name as before: nothing to rename
        elif not rec.name and self._base_counts.get(base, 0) == 0:
            # A new pod with a name of its own: registering 1,000 pods stays linear.
            rec.name = base
            self.by_name[base] = rec
            self._base_counts[base] = 1
            self._sweep = None
            self._models = None
        else:
            self._reindex()
        self._sync(rec)
        return rec

    def remove(self, pod_id: str) -> None:
        rec = self.pods.pop(pod_id, None)
        if rec is not None:
            self._unindex(rec)
            self._reindex()

    def replace_all(self, pod_ids: Iterable[str]) -> None:
        """Forget every pod not in ``pod_ids`` (a fresh list from discovery)."""
        keep = set(pod_ids)
        for gone in [p for p in self.pods if p not in keep]:
            self._unindex(self.pods.pop(gone))
        self._reindex()

    def _rename_alone(self, rec: PodRecord, old_base: str) -> bool:
        """Give ``rec`` its new base name without renaming the fleet, when neither name is shared
        (the first status of each of 1,000 pods stays linear); False when a full rename is needed."""
        new_base = rec.base_name
        if new_base == old_base:
            return rec.name == new_base or self._base_counts.get(new_base, 0) > 1
        if self._base_counts.get(old_base, 0) != 1 or self._base_counts.get(new_base, 0) != 0 or rec.name != old_base:
            return False
        self._unindex(rec)
        del self.by_name[old_base]
        del self._base_counts[old_base]
        rec.name = new_base
        rec.signature = ()
        self.by_name[new_base] = rec
        self._base_counts[new_base] = 1
        self._sweep = None
        return True

    def _reindex(self) -> None:
        self._sweep = None  # membership may have changed
        counts: dict[str, int] = {}
        for rec in self.pods.values():
            counts[rec.base_name] = counts.get(rec.base_name, 0) + 1
        self._base_counts = counts
        self.by_name = {}
        for rec in self.pods.values():
            base = rec.base_name
            name = base if counts[base] == 1 else f"{base}@{urlsplit(rec.url or rec.id).netloc or rec.id}"
            if name != rec.name:
                self._unindex(rec)  # its devices' keys change with it
                rec.name = name
                rec.signature = ()  # re-indexed at the next sync
            self.by_name[rec.name] = rec
        self._models = None  # rebuilt when next asked: registering 1,000 pods must not rebuild it 1,000 times

    @property
    def models(self) -> dict[str, str]:
        """Model id -> group, the union of every pod's (and namespace aliases)."""
        if self._models is None:
            self._build_models()
        assert self._models is not None
        return self._models

    @property
    def local_models(self) -> dict[str, str]:
        """What the pod servers call each qualified model id (they know only their namespace's ids)."""
        if self._models is None:
            self._build_models()
        return self._local_models

    def _build_models(self) -> None:
        models: dict[str, str] = {}
        for rec in self.pods.values():
            if rec.status is not None:
                for model, group in rec.status.models.items():
                    models.setdefault(model, group)
        local = {m: tenancy.local_id(m) for m in models if "/" in m}
        for alias, qualified in tenancy.aliases(models).items():
            if alias not in models:
                models[alias] = models[qualified]
                local[alias] = alias
        self._models, self._local_models = models, local

    # --- observations -------------------------------------------------------------------------

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
        rec.status, rec.status_at, rec.confirmed = doc, now, True
        rec.status_due = False
        rec.annotated = rec.annotated or not contact
        if renamed and not self._rename_alone(rec, old_base):
            self._reindex()
        elif renamed:
            self._models = None
        if contact:
            self._contact(rec, now)
        for d in doc.devices:
            key = f"{rec.name}/{d.device}"
            exp = self.expected.get(key)
            if exp is not None and (d.switching_to or d.current_group) == exp.group:
                del self.expected[key]  # the document has caught up with what we expected
        self._sync(rec)

    def observe_load(self, pod: str, report: LoadReport) -> None:
        """A pod's answer carried its load (``endpoint-load-metrics``): as good as a queue poll."""
        rec = self.by_name.get(pod)
        if rec is None:
            return
        now = self.clock()
        rec.others = {
            device: max(0, d.running + d.waiting - self.inflight.get(f"{rec.name}/{device}", 0))
            for device, d in report.devices.items()
        }
        rec.waiting = {device: d.waiting for device, d in report.devices.items()}
        rec.queue_at = rec.contact_at = now
        self._note_status_version(rec, report.status_version)
        self._sync(rec)

    @staticmethod
    def _note_status_version(rec: PodRecord, version: object) -> None:
        """A load report or queue document announcing a newer status makes the document due."""
        held = rec.status.status_version if rec.status is not None else None
        if isinstance(version, int) and held is not None and version > held:
            rec.status_due = True

    def due_status(self, idle_poll_s: float) -> list[PodRecord]:
        """Pods whose status document should be fetched now: none yet, announced newer, or idle too long."""
        now = self.clock()
        return [
            rec
            for rec in self.pods.values()
            if rec.url
            and (
                rec.status is None
                or rec.status_due
                or rec.status_at is None
                or now - rec.status_at >= idle_poll_s  # contact by queue polls and answers does not refresh it
                or self._probing(rec)
            )
        ]

    def due_queue(self, idle_poll_s: float) -> list[PodRecord]:
        """Pods whose load nothing has reported for ``idle_poll_s`` (answers report it otherwise)."""
        now = self.clock()
        return [
            rec
            for rec in self.pods.values()
            if rec.url
            and rec.status is not None
            and (rec.queue_at is None or now - rec.queue_at >= idle_poll_s or self._probing(rec))
        ]

    def _probing(self, rec: PodRecord) -> bool:
        """An ejected or unconfirmed pod is polled at every check, as before: a poll that succeeds
        is what brings it back, and no traffic goes there to tell."""
        return not rec.outlier.admitted or not rec.confirmed

    def observe_queue(self, pod_id: str, doc: dict[str, Any]) -> None:
        rec = self.pods.get(pod_id)
        if rec is None:
            return
        now = self.clock()
        others: dict[str, int] = {}
        queued: dict[str, int] = {}
        for device, q in (doc.get("devices") or {}).items():
            queued[device] = int(q.get("queue_size", 0))
            reported = queued[device] + int(q.get("busy_workers", 0))
            # What the pod holds beyond what this router sent there: other routers' traffic.
            others[device] = max(0, reported - self.inflight.get(f"{rec.name}/{device}", 0))
        rec.others, rec.waiting, rec.queue_doc, rec.queue_at = others, queued, doc, now
        self._note_status_version(rec, doc.get("status_version"))
        for device, q in (doc.get("devices") or {}).items():
            key = f"{rec.name}/{device}"
            exp = self.expected.get(key)
            # A queue taken well after we sent the group that no longer lists it: it was served (or left).
            waiting = q.get("waiting_groups") or ()
            if exp is not None and now - exp.since > QUEUE_CATCH_UP_S and exp.group not in waiting:
                del self.expected[key]
        self._contact(rec, now)
        self._sync(rec)

    def observe_failure(self, pod_id: str, error: str) -> None:
        """A poll of the pod failed (refused, timed out, bad answer)."""
        rec = self.pods.get(pod_id)
        if rec is not None and rec.outlier.failure(self.clock(), error):
            self._ejected(rec)

    def _contact(self, rec: PodRecord, now: float) -> None:
        rec.contact_at = now
        if rec.outlier.success(now):
            self.on_eject(rec.name, False)

    # --- proxied requests ---------------------------------------------------------------------

    def begin(self, pod: str, device: str, group: str, *, idle: bool = False) -> Ticket:
        key = f"{pod}/{device}"
        self.inflight[key] = self.inflight.get(key, 0) + 1
        now = self.last_used[key] = self.clock()
        self.sequence += 1
        self._sync_key(pod, device)
        return Ticket(pod, key, group, started_at=now, idle=idle, device=device)

    def expect(self, pod: str, device: str, group: str) -> None:
        """The router just sent ``group`` to a device that did not hold it: assume the switch."""
        self._expect(f"{pod}/{device}", group)
        self._sync_key(pod, device)

    def _expect(self, key: str, group: str) -> None:
        now = self.clock()
        self.expected[key] = _Expectation(group, now)
        heapq.heappush(self._expiries, (now + self.expectation_ttl_s, key))

    def served(self, ticket: Ticket, device: str | None, switched: bool) -> None:
        """The pod answered: it names the device that served, and whether it switched groups."""
        if device:
            key = f"{ticket.pod}/{device}"
            if key != ticket.key and not ticket.done:
                self.inflight[ticket.key] = max(0, self.inflight.get(ticket.key, 0) - 1)
                self.inflight[key] = self.inflight.get(key, 0) + 1
                ticket.key = key
            if switched:
                ticket.switched = True
                self._expect(key, ticket.group)
        rec = self.by_name.get(ticket.pod)
        if rec is not None and rec.outlier.success(self.clock()):
            self.on_eject(rec.name, False)
        if rec is not None:
            self._sync(rec)

    def finish(self, ticket: Ticket, *, ok: bool = False) -> None:
        """Release the ticket; ``ok`` answers from an idle device that switched nothing teach the
        service time."""
        if ticket.done:
            return
        ticket.done = True
        self.inflight[ticket.key] = max(0, self.inflight.get(ticket.key, 0) - 1)
        if ok and ticket.idle and not ticket.switched:
            self.service.observe(self.clock() - ticket.started_at)
        pod, _, device = ticket.key.rpartition("/")
        self._sync_key(pod, device)

    @property
    def service_s(self) -> float | None:
        return self.service.seconds

    def costs_now(self) -> Costs:
        return self.service.costs(self.costs)

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
        self._sync(rec)

    # --- views ---------------------------------------------------------------------------------

    def routable(self, rec: PodRecord) -> bool:
        return rec.ready and rec.outlier.admitted

    @property
    def ready(self) -> bool:
        return any(self.routable(r) for r in self.pods.values())

    def snapshot(self, exclude: frozenset[str] = frozenset()) -> Snapshot:
        now = self.clock()
        states = [d for rec in self.pods.values() for d in self._device_states(rec, now, exclude)]
        snap = Snapshot(tuple(states), now=now, costs=self.costs_now())
        return leases.with_leases(snap, self.leases.all(), self.leases.now())

    def held_devices(self) -> dict[str, leases.Lease]:
        """Device key -> the live lease holding it."""
        return leases.held_devices(self.leases.all(), self.leases.now())

    def pod_has_lease(self, pod: str) -> bool:
        prefix = f"{pod}/"
        return any(key.startswith(prefix) for key in self.held_devices())

    def decide(self, request: RouteRequest) -> Decision:
        """``choose_device`` over the whole fleet: from the kept index (a bounded candidate set), or,
        while leases hold devices or the request carries one, over a full snapshot with them."""
        if request.lease is not None or self.held_devices():
            return choose_device(request, self.snapshot())
        self.resync()
        return self.index.choose(request, self.clock(), self.costs_now())

    # --- the index: the fleet's DeviceStates, kept as their inputs change ------------------------

    def _time_signature(self, rec: PodRecord, now: float) -> tuple[object, ...]:
        """What makes a pod's devices change with time alone (staleness, cool-downs); expectations
        expire on their own schedule (``_expiries``)."""
        return (
            self.routable(rec),
            rec.contact_at is not None and now - rec.contact_at < self.stale_after_s,
            rec.queue_at is not None and now - rec.queue_at < self.stale_after_s,
        )

    def _sync(self, rec: PodRecord, device: str | None = None) -> None:
        """Put ``rec``'s devices (or one of them) in the index as they are now."""
        now = self.clock()
        signature = self._time_signature(rec, now)
        if signature != rec.signature:
            device = None  # time changed the whole pod since it was last indexed
        rec.signature = signature
        states = self._device_states(rec, now, only=device)
        keys = {d.key for d in states}
        for d in states:
            self.index.put(d)
        if device is None:
            for gone in rec.indexed - keys:
                self.index.remove(gone)
            rec.indexed = keys
        else:
            rec.indexed |= keys

    def _sync_key(self, pod: str, device: str) -> None:
        rec = self.by_name.get(pod)
        if rec is not None:
            self._sync(rec, device)

    def _unindex(self, rec: PodRecord) -> None:
        for key in rec.indexed:
            self.index.remove(key)
        rec.indexed = set()

    def resync(self, budget: int = RESYNC_BATCH) -> None:
        """Re-index pods whose devices changed with time alone (staleness, cool-downs): ``budget`` of
        them per call, in turn, so a decision's cost does not grow with the fleet; those flags move
        over seconds, and every pod is looked at again within len(pods) / budget decisions."""
        now = self.clock()
        if self._sweep is None:
            self._sweep = list(self.pods.values())
        order = self._sweep
        for _ in range(min(budget, len(order))):
            rec = order[self._sweep_at % len(order)]
            self._sweep_at += 1
            if self.pods.get(rec.id) is rec and rec.signature != self._time_signature(rec, now):
                self._sync(rec)
        while self._expiries and self._expiries[0][0] <= now:
            _, key = heapq.heappop(self._expiries)
            pod, _, device = key.rpartition("/")
            self._sync_key(pod, device)

    def _device_states(
        self, rec: PodRecord, now: float, exclude: frozenset[str] = frozenset(), only: str | None = None
    ) -> list[DeviceState]:
        doc = rec.status
        if doc is None or rec.status_at is None:
            return []
        usable = self.routable(rec) and rec.name not in exclude
        fresh = rec.contact_at is not None and now - rec.contact_at < self.stale_after_s
        queue_fresh = rec.queue_at is not None and now - rec.queue_at < self.stale_after_s
        states = []
        for d in doc.devices:
            if only is not None and d.device != only:
                continue
            key = f"{rec.name}/{d.device}"
            mine = self.inflight.get(key, 0)
            others = rec.others.get(d.device, 0) if queue_fresh else 0
            last_switch = (
                rec.status_at - (doc.timestamp - d.last_switch_unix) if d.last_switch_unix is not None else None
            )
            queue = (rec.queue_doc or {}).get("devices", {}).get(d.device, {}) if queue_fresh else {}
            waiting_groups = set(queue.get("waiting_groups") or ())
            exp = self.expected.get(key)
            # We sent a group the device does not hold: it waits there for a switch until the
            # pod's documents say otherwise (the device, not the router, decides when it switches).
            live = exp is not None and now - exp.since < self.expectation_ttl_s
            if exp is not None and live and (d.switching_to or d.current_group) != exp.group:
                waiting_groups.add(exp.group)
            states.append(
                DeviceState(
                    pod=rec.name,
                    device=d.device,
                    node=doc.node or rec.node,
                    current_group=d.current_group,
                    cached_groups=frozenset(d.cached_groups),
                    failed_groups=frozenset(d.failed_groups),
                    healthy=usable and d.healthy,
                    workers=d.workers,
                    queue_limit=d.queue_limit,
                    load=mine + others,
                    waiting=rec.waiting.get(d.device, 0) if queue_fresh else 0,
                    waiting_groups=frozenset(waiting_groups),
                    switching_to=d.switching_to,
                    switch_s_from_cache=d.switch_seconds_from_cache,
                    switch_s_from_disk=d.switch_seconds_from_disk,
                    last_switch_at=last_switch,
                    fresh=fresh,
                    last_used_at=self.last_used.get(key),
                    uuid=d.uuid,
                    groups=frozenset(doc.groups) if doc.groups else None,
                )
            )
        return states

    def pod_state(self, rec: PodRecord) -> str:
        if not rec.outlier.admitted:
            return "ejected"
        if rec.status is None:
            return "unknown"
        if not rec.ready:
            return "not_ready"
        if rec.contact_at is None or self.clock() - rec.contact_at >= self.stale_after_s:
            return "stale"
        return "ready"

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
