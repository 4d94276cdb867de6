"""A discrete-event simulator of batched devices that serve model groups, one current group each.

Each simulated device behaves like the pod server's device after continuous batching
(``gpufleet.pod_server.scheduler`` around the engine):

- up to ``max_sequences`` requests of the current group decode at once, in one batch. A decode
  step of a batch of ``b`` sequences takes ``StepModel.step_s(b)`` seconds, interpolated from the
  aggregate tokens/s that ``bench.throughput`` measured at each concurrency, so every running
  request advances one token per step: processor sharing with a batch-dependent speed;
- a bounded queue; what the device does next with it is ``queue_order.next_action``, the pod's
  own pure rule, called as is: serve the current group's queued work (batched) before switching,
  bounded by ``max_wait_s`` and ``min_residency_s``; switch only once running work has drained;
- a switch makes a group current from the CPU cache when it is there, else from disk
  (``SwitchCosts``, from ``bench.switch_cost``). The cache is the pod's own ``HostCache``, used
  as ``DeviceResidency`` uses it: ``cache_limit_models`` host copies, the current group's
  included (parking it keeps its copy), least recently used groups current nowhere out first.
  Each simulated device is a pod of its own, as under ``gpufleet up`` or one pod per GPU.

Requests are routed by a policy at their arrival instant. What the policy sees is the router's
view (``gpufleet.router.state``): ``load`` is every request in flight on the device (queued or
running), and with ``expect_switches`` a request sent to a device that does not hold its group
makes the router expect that switch until the device's state catches up (``FleetState.expect``).

A run may also be given a ``control``, called every ``control_interval_s`` of simulated time, that
changes the fleet while it serves (``bench.autoscale`` drives the autoscaling rules with it):

- ``add_device(startup_s)``: a new pod's device, billed from now, that takes work only once it
  is ready ``startup_s`` later, empty (or holding ``group``: a dedicated pod loads its one model
  while it starts) and, with ``serves``, only for those groups (a replica of one model);
- ``remove_device(index)``: the device drains: it takes no new request, serves what it has
  running and queued, then stops (``SimDevice.stopped_at``);
- ``prefer(index, group)``: the device's placement (``gpufleet.pod_server.placing``): once per
  change it queues a zero-weight job for ``group``, which makes it current in its turn, behind
  real work, never interrupting a batch; demand may switch the device away afterwards.

With a control, policies are offered only the devices that take work (ready, not draining, and
serving the request's group), and answer with a ``SimDevice.index``; a request that finds none
is held, as the router holds one while a pod comes up (scale from zero), and routed as soon as
a device is ready; its wait counts in its latency.
"""

from __future__ import annotations

import bisect
import heapq
import math
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal, Protocol

from bench.trace import Request
from gpufleet.pod_server.host_cache import HostCache
from gpufleet.pod_server.queue_order import Action, GroupQueue, QueuePolicy, QueueState, next_action, switch_deadline

Source = Literal["cache", "disk"]

# Event kinds, in the order they are handled at equal times: finished work frees capacity
# before a request that arrives at the same instant is routed.
_SWITCH_DONE, _PREFETCH_DONE, _TICK, _ARRIVAL = 0, 1, 2, 3
# With a control: a started device becomes ready, then the control looks (after the arrivals of that instant).
_READY, _CONTROL = 4, 5
_EPS = 1e-9


@dataclass(frozen=True)
class SwitchCosts:
    """Seconds to make a group current: a fixed part plus a part per GB of its weights."""

    disk_fixed_s: float = 0.2
    disk_s_per_gb: float = 1.0
    cache_fixed_s: float = 0.01
    cache_s_per_gb: float = 0.05
    engine_s: float = 0.0  # every switch also stops one batching engine and starts another
    origin: str = "default"  # where the figures came from

    def seconds(self, source: Source, gb: float) -> float:
        if source == "cache":
            return self.cache_fixed_s + self.cache_s_per_gb * gb + self.engine_s
        return self.load_s(gb) + self.engine_s

    def load_s(self, gb: float) -> float:
        """Weights from storage into host memory: a disk switch without the engine, or a prefetch."""
        return self.disk_fixed_s + self.disk_s_per_gb * gb


@dataclass(frozen=True)
class StepModel:
    """Seconds per decode step by batch size, from aggregate tokens/s measured at concurrencies.

    Between measured points tokens/s is interpolated linearly; beyond the last point it stays
    flat (the device is saturated: a bigger batch only makes each step longer).
    """

    points: tuple[tuple[int, float], ...] = ((1, 170.0), (8, 923.0), (32, 1690.0), (64, 1724.0))
    prefill_tokens: float = 1.0  # a request's prompt costs about one step's time before its first token
    origin: str = "default"

    def tokens_per_s(self, batch: int) -> float:
        xs = [p[0] for p in self.points]
        if batch <= xs[0]:
            return self.points[0][1] * batch / xs[0]
        if batch >= xs[-1]:
            return self.points[-1][1]
        i = bisect.bisect_left(xs, batch)
        (x0, y0), (x1, y1) = self.points[i - 1], self.points[i]
        return y0 + (y1 - y0) * (batch - x0) / (x1 - x0)

    def step_s(self, batch: int) -> float:
        return max(1, batch) / self.tokens_per_s(max(1, batch))

    def service_s(self, tokens: float, batch: int = 1) -> float:
        """Time one request of ``tokens`` takes in a batch of ``batch`` that stays that size."""
        return (tokens + self.prefill_tokens) * self.step_s(batch)


@dataclass(frozen=True)
class SimConfig:
    n_devices: int = 4
    max_sequences: int = 64  # MAX_SEQUENCES_PER_DEVICE
    queue_limit: int = 256  # MAX_QUEUE_PER_DEVICE
    cache_limit_models: int = 4  # MAX_CPU_CACHED_MODELS
    models_per_group: int = 1
    group_gb: float = 1.0
    costs: SwitchCosts = field(default_factory=SwitchCosts)
    steps: StepModel = field(default_factory=StepModel)
    queue_policy: QueuePolicy = field(default_factory=QueuePolicy)  # SWITCH_MAX_WAIT_S, SWITCH_MIN_RESIDENCY_S
    initial_group: str | None = "g00"  # pod servers preload their default group on every device
    prefetch: bool = True  # PREFETCH: groups queued behind the current one load into the CPU cache meanwhile
    # The router's FleetState.expect overlay as a switch in progress. Off: the router sees the group
    # it sent among the device's waiting groups, which the simulator knows exactly.
    expect_switches: bool = False
    expectation_ttl_s: float = 30.0


class SimDevice:
    """State of one device; policies read it, only the simulator changes it."""

    def __init__(self, index: int, cfg: SimConfig) -> None:
        self.index = index
        self.name = f"dev{index}"
        self.max_sequences = cfg.max_sequences
        self.queue_limit = cfg.queue_limit
        self.models_per_group = cfg.models_per_group
        self.expect = cfg.expect_switches
        self.expectation_ttl_s = cfg.expectation_ttl_s
        self.expected: tuple[str, float] | None = None  # (group, since): a switch the router expects
        self.last_routed_at: float | None = None
        self.queues: dict[str, deque[Request]] = {}  # group -> its queued requests, oldest first
        self.queued = 0
        self.current: str | None = cfg.initial_group
        self.current_since: float | None = None
        self.switching_to: str | None = None
        self.running: list[tuple[float, int]] = []  # heap of (finish progress, request index)
        self.progress = 0.0  # tokens every running sequence has advanced by, since the start
        self.progress_at = 0.0
        self.version = 0  # invalidates scheduled ticks when the batch changes
        self.host_cache = HostCache(cfg.cache_limit_models, None)
        self.prefetching: tuple[str, float] | None = None  # (group, done at): the pod's one prefetch thread
        self.prefetch_queue: deque[str] = deque()
        if self.current is not None:
            self._take(self.current)
        self.last_switch_at: float | None = None
        self.switch_s: dict[str, float] = {}
        self.switches: Counter[str] = Counter()
        # The fleet's changes under a control (see the module doc); a fixed fleet is ready from 0 to the end.
        self.started_at = 0.0  # billed from here (a pod's start-up included)
        self.ready = True
        self.draining = False
        self.stopped_at: float | None = None  # billed up to here (its drain included); None: to the end
        self.serves: frozenset[str] | None = None  # the groups it serves at all; None: any
        self.boot_group: str | None = None  # the group it holds once ready (a dedicated pod's model)
        self.preferred: str | None = None  # its placement: the group it makes current in its turn
        self.placed = True  # the placement's job is queued (or not needed) since it last changed

    @property
    def accepting(self) -> bool:
        """Takes new requests: ready, not draining, not stopped."""
        return self.ready and not self.draining and self.stopped_at is None

    @property
    def load(self) -> int:
        return self.queued + len(self.running)

    @property
    def running_n(self) -> int:
        return len(self.running)

    @property
    def capacity(self) -> int:
        return self.max_sequences + self.queue_limit

    def resident_group(self) -> str | None:
        return self.switching_to or self.current

    def waiting_groups(self) -> frozenset[str]:
        return frozenset(g for g, q in self.queues.items() if q)

    def view(self, now: float) -> tuple[str | None, float | None]:
        """(switching_to, last_switch_at) as the router sees them, expectations included."""
        switching_to, last_switch = self.switching_to, self.last_switch_at
        if self.expected is not None:
            group, since = self.expected
            if self.resident_group() == group or now - since >= self.expectation_ttl_s:
                self.expected = None  # the state caught up (or the expectation expired)
            else:
                switching_to = group
                last_switch = max(last_switch or since, since)
        return switching_to, last_switch

    def routed(self, group: str, now: float) -> None:
        """A request of ``group`` was just sent here."""
        self.last_routed_at = now
        if self.expect and self.resident_group() != group:
            self.expected = (group, now)

    def held_groups(self, now: float | None = None) -> list[str]:
        """Groups in this device's memory as the router sees it: the current one (or the one
        coming) and the cached ones."""
        held = list(self.cache)
        r = self.resident_group()
        if now is not None:
            r = self.view(now)[0] or self.current
        if r is not None and r not in held:
            held.append(r)
        return held

    @property
    def cache(self) -> list[str]:
        """Groups in the CPU cache a switch could take, as the pod reports them (not the current one)."""
        return [g for g in self.host_cache.groups() if g != self.current]

    def _take(self, group: str) -> Source:
        """The cache's side of a switch, as ``DeviceResidency.make_current`` does it: give the
        current group back, take the new one from the cache, else load it and cache it if it fits."""
        if self.current is not None:
            self.host_cache.release(self.current, self.name)
        if self.host_cache.acquire(group, self.name) is not None:
            return "cache"
        if self.host_cache.room_for(0, self.models_per_group):
            self.host_cache.insert(group, self._models(group), device=self.name)  # type: ignore[arg-type]
        return "disk"

    def _models(self, group: str) -> dict[str, _SimModel]:
        return {f"{group}/m{i}": _SimModel() for i in range(self.models_per_group)}

    def wants_prefetch(self, group: str) -> bool:
        """What ``PodService.prefetch`` checks: not cached, not already coming, and room to cache it."""
        return (
            group != self.current
            and group not in self.host_cache
            and group not in self.prefetch_queue
            and (self.prefetching is None or self.prefetching[0] != group)
        )

    def prefetched(self, group: str) -> None:
        """A prefetch finished: the group joins the cache, current nowhere (``HostCache.insert``)."""
        if group not in self.host_cache and self.host_cache.room_for(0, self.models_per_group):
            self.host_cache.insert(group, self._models(group), device=None, prefetched=True)  # type: ignore[arg-type]


@dataclass(frozen=True)
class _SimModel:
    """What ``HostCache`` reads of a model: its sizes (the simulator bounds the cache by count)."""

    bytes: int = 0
    host_bytes: int = 0


class Policy(Protocol):
    """Routes requests. It may also define ``finished(req, latency_s, idle)``, called when a
    request completes (``idle``: its device had nothing in flight when it was routed).

    Under a control ``devices`` holds only the devices that take the request, and the answer is
    a ``SimDevice.index`` (what ``bench.policies.SnapshotPolicy`` returns, from the device's name)."""

    name: str

    def choose(self, req: Request, devices: Sequence[SimDevice], now: float) -> int | None:
        """Index of the device for ``req``, or None to refuse it."""
        ...


@dataclass
class SimResult:
    n: int
    latencies: list[float]  # per request, in trace order; inf when refused or unfinished
    switches: Counter[str]
    device_of: list[int]  # -1 when refused
    rejected: int
    aborted: bool = False
    end_s: float = 0.0
    switched: list[str] = field(default_factory=list)  # per request: "", "cache" or "disk" when it waited for a switch
    held: int = 0  # requests held for want of a device (under a control), all routed later unless unfinished

    @property
    def total_switches(self) -> int:
        return sum(self.switches.values())

    def summary(self, slo_s: float) -> dict[str, float | int | bool]:
        lat = self.latencies
        done = [x for x in lat if not math.isinf(x)]
        ok = sum(1 for x in lat if x <= slo_s)
        s = sorted(lat)

        def pct(q: float) -> float:
            return s[max(0, min(len(s) - 1, math.ceil(q * len(s)) - 1))] if s else math.nan

        return {
            "requests": self.n,
            "switches": self.total_switches,
            "switches_from_cache": self.switches.get("cache", 0),
            "switches_from_disk": self.switches.get("disk", 0),
            "switches_per_1000": 1000.0 * self.total_switches / max(1, self.n),
            "mean_latency_s": sum(done) / len(done) if done else math.nan,
            "p50_latency_s": pct(0.50),
            "p99_latency_s": pct(0.99),
            "slo_attainment": ok / max(1, self.n),
            "rejected": self.rejected,
            "aborted": self.aborted,
        }


class Simulator:
    def __init__(self, cfg: SimConfig, policy: Policy) -> None:
        self.cfg = cfg
        self.policy = policy
        self.devices = [SimDevice(i, cfg) for i in range(cfg.n_devices)]
        self._events: list[tuple[float, int, int, int, int]] = []
        self._seq = 0
        self.now = 0.0
        self._trace: Sequence[Request] = ()
        self._work: list[float] = []  # per request: tokens of work (prefill included)
        self._latency: list[float] = []
        self._switched: list[str] = []
        self._idle: list[bool] = []
        self._switches: Counter[str] = Counter()
        self._misses = 0
        self._slo: float | None = None
        self._pending_switch: dict[int, Source] = {}
        self._switch_started: dict[int, float] = {}
        self._pending_take: dict[int, str] = {}  # device -> group its switch takes once the prefetch is in
        self._device_of: list[int] = []
        self._rejected = 0
        # Under a control only (see the module doc).
        self._dynamic = False
        self.held: deque[int] = deque()  # requests waiting for a device, oldest first
        self._held_total = 0
        self.was_held: list[bool] = []  # per request: it waited for a device at some point
        self.admitted_at: list[float] = []  # per request: when it joined a batch
        self.completed: list[tuple[int, float]] = []  # (request, answered at) since the control last cleared it

    def _push(self, t: float, kind: int, a: int, b: int = 0) -> None:
        self._seq += 1
        heapq.heappush(self._events, (t, kind, self._seq, a, b))

    def run(
        self,
        trace: Sequence[Request],
        *,
        slo_s: float | None = None,
        give_up_misses: int | None = None,
        control: Callable[[Simulator, float], None] | None = None,
        control_interval_s: float = 5.0,
        control_until_s: float | None = None,
    ) -> SimResult:
        """Simulate ``trace``; with ``give_up_misses``, stop early once more requests than that
        missed ``slo_s`` (the caller only needs to know the objective was not held). With
        ``control``, call it from time 0 every ``control_interval_s`` while anything is left to do
        (but not after ``control_until_s``: requests still held then stay unanswered)."""
        n = len(trace)
        self._trace = trace
        self._work = [r.tokens + self.cfg.steps.prefill_tokens for r in trace]
        self._latency = [math.inf] * n
        self._switched = [""] * n
        self._idle = [False] * n
        self._slo = slo_s
        self._device_of = [-1] * n
        self._rejected = 0
        self._dynamic = control is not None
        self.admitted_at = [math.nan] * n
        self.was_held = [False] * n
        for i, r in enumerate(trace):
            self._push(r.t, _ARRIVAL, i)
        if control is not None:
            self._push(0.0, _CONTROL, 0)
        while self._events:
            t, kind, _, a, b = heapq.heappop(self._events)
            self.now = t
            if kind == _ARRIVAL:
                if self._dynamic:
                    self._dispatch(a)
                else:
                    req = trace[a]
                    choice = self.policy.choose(req, self.devices, t)
                    self._enqueue(a, choice)
            elif kind == _CONTROL:
                assert control is not None
                control(self, t)
                nxt = t + control_interval_s
                if (self._events or self.held) and (control_until_s is None or nxt <= control_until_s):
                    self._push(nxt, _CONTROL, 0)
            elif kind == _READY:
                self._ready(self.devices[a])
            elif kind == _TICK:
                d = self.devices[a]
                if b == d.version:
                    self._progress(d)
            elif kind == _PREFETCH_DONE:
                self._prefetch_done(self.devices[a])
            else:  # _SWITCH_DONE
                self._switch_done(self.devices[a])
            if give_up_misses is not None and self._misses > give_up_misses:
                return self._result(n, aborted=True)
        return self._result(n)

    def _result(self, n: int, aborted: bool = False) -> SimResult:
        return SimResult(
            n,
            self._latency,
            self._switches,
            self._device_of,
            self._rejected,
            aborted=aborted,
            end_s=self.now,
            switched=self._switched,
            held=self._held_total,
        )

    def _enqueue(self, i: int, choice: int | None) -> None:
        """Queue request ``i`` on device ``choice`` (refused when None or its queue is full)."""
        if choice is None or self.devices[choice].queued >= self.devices[choice].queue_limit:
            self._rejected += 1
            self._misses += 1
            return
        req = self._trace[i]
        d = self.devices[choice]
        self._device_of[i] = choice
        self._idle[i] = d.load == 0
        d.routed(req.group, self.now)
        d.queues.setdefault(req.group, deque()).append(req)
        d.queued += 1
        self._progress(d)

    # --- the fleet's changes, under a control ----------------------------------------------

    def _dispatch(self, i: int) -> None:
        """Route request ``i`` among the devices that take it, or hold it until one is ready."""
        req = self._trace[i]
        ready = [d for d in self.devices if d.accepting and (d.serves is None or req.group in d.serves)]
        if not ready:
            self.held.append(i)
            if not self.was_held[i]:
                self.was_held[i] = True
                self._held_total += 1
            return
        self._enqueue(i, self.policy.choose(req, ready, self.now))

    def add_device(
        self, startup_s: float, *, serves: frozenset[str] | None = None, group: str | None = None
    ) -> SimDevice:
        """A new pod's device: billed from now, ready (empty, or holding ``group``) after ``startup_s``."""
        d = SimDevice(len(self.devices), replace(self.cfg, initial_group=None))
        d.started_at, d.ready, d.serves, d.boot_group = self.now, False, serves, group
        self.devices.append(d)
        self._push(self.now + max(0.0, startup_s), _READY, d.index)
        return d

    def remove_device(self, index: int) -> None:
        """Drain device ``index``: no new requests; it stops once what it has is served."""
        d = self.devices[index]
        if d.draining or d.stopped_at is not None:
            return
        d.draining = True
        for q in d.queues.values():  # its placement job, if still queued, goes with it
            for r in [r for r in q if r.index < 0]:
                q.remove(r)
                d.queued -= 1
        if not d.ready:
            d.stopped_at = self.now  # deleted while starting
        else:
            self._progress(d)

    def prefer(self, index: int, group: str | None) -> None:
        """Set device ``index``'s placement: honoured once per change, as the pod's ``Placer`` does."""
        d = self.devices[index]
        if d.preferred != group:
            d.preferred, d.placed = group, False
        self._honour(d)

    def _honour(self, d: SimDevice) -> None:
        if d.placed or not d.accepting:
            return
        group = d.preferred
        d.placed = True
        if group is None or d.resident_group() == group or d.queues.get(group):
            return  # there already, or demand has it queued: it becomes current in its turn
        d.queues.setdefault(group, deque()).append(Request(-1, self.now, group, 0.0, 0))
        d.queued += 1
        self._progress(d)

    def _ready(self, d: SimDevice) -> None:
        if d.stopped_at is not None:
            return
        d.ready = True
        if d.boot_group is not None:  # loaded while the pod started: current and in its host cache
            d._take(d.boot_group)
            d.current, d.current_since = d.boot_group, self.now
        self._honour(d)
        held, self.held = self.held, deque()
        for i in held:
            self._dispatch(i)
        self._progress(d)

    # --- the device's own rules ----------------------------------------------------------

    def _advance(self, d: SimDevice) -> None:
        """Move the batch's progress to now and retire the sequences that finished."""
        b = len(d.running)
        if b:
            d.progress += (self.now - d.progress_at) / self.cfg.steps.step_s(b)
        d.progress_at = self.now
        finished = getattr(self.policy, "finished", None)
        while d.running and d.running[0][0] <= d.progress + _EPS:
            _, i = heapq.heappop(d.running)
            req = self._trace[i]
            lat = self.now - req.t
            self._latency[i] = lat
            if self._dynamic:
                self.completed.append((i, self.now))
            if finished is not None:
                # As the router learns: only from a request that neither queued nor waited for a switch.
                finished(req, lat, self._idle[i] and not self._switched[i])
            if self._slo is not None and lat > self._slo:
                self._misses += 1

    def _state(self, d: SimDevice) -> QueueState:
        queues = tuple(GroupQueue(g, len(q), q[0].t) for g, q in d.queues.items() if q)
        return QueueState(d.current, len(d.running), d.max_sequences, queues, self.now, d.current_since)

    def _progress(self, d: SimDevice) -> None:
        self._advance(d)
        if d.switching_to is None:
            while True:
                state = self._state(d)
                step = next_action(state, self.cfg.queue_policy)
                if step.action is Action.ADMIT and step.group is not None:
                    req = d.queues[step.group].popleft()
                    d.queued -= 1
                    if req.index < 0:
                        continue  # a placement job: zero weight, done once its group is current
                    self.admitted_at[req.index] = self.now
                    heapq.heappush(d.running, (d.progress + self._work[req.index], req.index))
                    continue
                if step.action is Action.SWITCH and step.group is not None:
                    self._begin_switch(d, step.group)
                break
            if d.switching_to is None:
                self._prefetch_waiting(d)
        d.version += 1
        nxt = math.inf
        if d.running:
            nxt = self.now + (d.running[0][0] - d.progress) * self.cfg.steps.step_s(len(d.running))
        if d.switching_to is None:
            deadline = switch_deadline(self._state(d), self.cfg.queue_policy)
            if deadline is not None and deadline + 1e-6 > self.now:
                # Just past the deadline, as the scheduler wakes (a float landing on it would wait forever);
                # one already past waits for the next event (a finished sequence), as the scheduler does.
                nxt = min(nxt, max(deadline, self.now) + 1e-6)
        if nxt < math.inf:
            self._push(max(nxt, self.now), _TICK, d.index, d.version)
        if d.draining and d.stopped_at is None and not d.load and d.switching_to is None:
            d.stopped_at = self.now  # drained

    def _prefetch_waiting(self, d: SimDevice) -> None:
        """The scheduler's ``_prefetch_waiting``: ask for every group queued here to be prefetched."""
        if not self.cfg.prefetch:
            return
        for group, q in d.queues.items():
            if q and d.wants_prefetch(group):
                d.prefetch_queue.append(group)
        self._next_prefetch(d)

    def _next_prefetch(self, d: SimDevice) -> None:
        while d.prefetching is None and d.prefetch_queue:
            group = d.prefetch_queue.popleft()
            if group in d.host_cache or not d.host_cache.room_for(0, d.models_per_group):
                continue  # "prefetch skipped: CPU cache full", or a switch brought it meanwhile
            d.prefetching = (group, self.now + self.cfg.costs.load_s(self.cfg.group_gb))
            self._push(d.prefetching[1], _PREFETCH_DONE, d.index)

    def _prefetch_done(self, d: SimDevice) -> None:
        assert d.prefetching is not None
        group, d.prefetching = d.prefetching[0], None
        d.prefetched(group)
        if self._pending_take.get(d.index) == group:
            del self._pending_take[d.index]
            d.host_cache.acquire(group, d.name)  # the switch waiting on the load lock takes it at once
        self._next_prefetch(d)

    def _begin_switch(self, d: SimDevice, group: str) -> None:
        done = self.now
        if d.prefetching is not None and d.prefetching[0] == group and group not in d.host_cache:
            # The switch waits on the group's load lock for the prefetch, then takes it from the cache.
            done = d.prefetching[1]
            if d.current is not None:
                d.host_cache.release(d.current, d.name)
            source: Source = "cache"
            self._pending_take[d.index] = group
        else:
            source = d._take(group)
        d.switching_to = group
        self._pending_switch[d.index] = source
        self._switch_started[d.index] = self.now
        # The request that waited longest for this group is the one that "waited for a switch".
        first = next((r.index for r in d.queues[group] if r.index >= 0), None)
        if first is not None:
            self._switched[first] = source
        self._push(done + self.cfg.costs.seconds(source, self.cfg.group_gb), _SWITCH_DONE, d.index)

    def _switch_done(self, d: SimDevice) -> None:
        group = d.switching_to
        assert group is not None
        source = self._pending_switch.pop(d.index)
        started = self._switch_started.pop(d.index)
        d.current, d.switching_to = group, None
        d.current_since = d.last_switch_at = self.now
        d.switch_s[source] = self.now - started  # as the pod measures it: waiting for a prefetch included
        d.switches[source] += 1
        self._switches[source] += 1
        self._progress(d)


def simulate(
    trace: Sequence[Request],
    cfg: SimConfig,
    policy: Policy,
    *,
    slo_s: float | None = None,
    give_up_misses: int | None = None,
) -> SimResult:
    return Simulator(cfg, policy).run(trace, slo_s=slo_s, give_up_misses=give_up_misses)
