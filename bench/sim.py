"""A discrete-event simulator of devices that serve model groups, one current group each.

Each simulated device behaves like ``gpufleet.pod_server.scheduler.DeviceScheduler``:

- a FIFO queue of bounded length and ``workers`` workers that take jobs from it;
- one current group; a job of another group waits until no request runs on the device,
  then its worker switches groups (from the CPU cache when the group is parked there,
  else from disk) and runs the job;
- once a switch is wanted, the current group takes no new work (switch waiters first);
- a switch parks the previous group in a CPU cache of ``cache_limit_models`` models,
  evicting least recently used groups (``DeviceResidency``);

Requests are routed by a policy at their arrival instant. What the policy sees is the
router's view (``gpufleet.router.state``), taken from the exact device state without
polling delay:

- ``load`` is every request in flight on the device (the router counts what it sent and
  has not seen answered), including a job a worker holds while it waits for, or performs,
  a switch. ``load_counts_held=False`` gives the pod scheduler's own figure instead
  (``DeviceScheduler.load`` = queued + running), which misses those jobs;
- with ``expect_switches`` a request sent to a device that does not hold its group makes
  the router expect that switch (``switching_to`` and a fresh ``last_switch_at``) until the
  device's state catches up, as ``FleetState.expect`` does.
"""

from __future__ import annotations

import heapq
import math
from collections import Counter, OrderedDict, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from bench.trace import Request

Source = Literal["cache", "disk"]

IDLE, WAITING, SWITCHING, RUNNING = 0, 1, 2, 3
# Event kinds, in the order they are handled at equal times: finished work frees capacity
# before a request that arrives at the same instant is routed.
_SWITCH_DONE, _JOB_DONE, _ARRIVAL = 0, 1, 2


@dataclass(frozen=True)
class SwitchCosts:
    """Seconds to make a group current: a fixed part plus a part per GB of its weights."""

    disk_fixed_s: float = 0.2
    disk_s_per_gb: float = 1.0
    cache_fixed_s: float = 0.01
    cache_s_per_gb: float = 0.05
    origin: str = "default"  # where the figures came from

    def seconds(self, source: Source, gb: float) -> float:
        if source == "cache":
            return self.cache_fixed_s + self.cache_s_per_gb * gb
        return self.disk_fixed_s + self.disk_s_per_gb * gb


@dataclass(frozen=True)
class SimConfig:
    n_devices: int = 4
    workers: int = 2
    queue_limit: int = 64
    cache_limit_models: int = 4  # MAX_CPU_CACHED_MODELS
    models_per_group: int = 1
    group_gb: float = 1.0
    group_gb_overrides: Mapping[str, float] = field(default_factory=dict)
    costs: SwitchCosts = field(default_factory=SwitchCosts)
    initial_group: str | None = "g00"  # pod servers preload their default group on every device
    # The router counts every request in flight; False: DeviceScheduler.load (queued + running),
    # which misses a job whose worker waits for, or performs, a switch.
    load_counts_held: bool = True
    expect_switches: bool = True  # the router's FleetState.expect overlay
    expectation_ttl_s: float = 30.0

    def gb(self, group: str) -> float:
        return self.group_gb_overrides.get(group, self.group_gb)


class Worker:
    __slots__ = ("index", "job", "registered", "source", "state")

    def __init__(self, index: int) -> None:
        self.index = index
        self.state = IDLE
        self.job: Request | None = None
        self.registered = False  # counted in the device's switch waiters
        self.source: Source = "disk"


class SimDevice:
    """State of one device; policies read it, only the simulator changes it."""

    def __init__(self, index: int, cfg: SimConfig) -> None:
        self.index = index
        self.name = f"dev{index}"
        self.workers_n = cfg.workers
        self.queue_limit = cfg.queue_limit
        self.count_held = cfg.load_counts_held
        self.expect = cfg.expect_switches
        self.expectation_ttl_s = cfg.expectation_ttl_s
        self.expected: tuple[str, float] | None = None  # (group, since): a switch the router expects
        self.last_routed_at: float | None = None
        self.held = 0  # jobs taken from the queue by a worker that does not run them yet
        self.cache_limit = cfg.cache_limit_models
        self.models_per_group = cfg.models_per_group
        self.workers = [Worker(i) for i in range(cfg.workers)]
        self.queue: deque[Request] = deque()
        self.waiting: list[Worker] = []  # workers waiting on the condition, oldest first
        self.current: str | None = cfg.initial_group
        self.switching_to: str | None = None
        self.active = 0
        self.switch_waiters = 0
        self.cache: OrderedDict[str, int] = OrderedDict()  # group -> models, LRU first
        self.last_switch_at: float | None = None
        self.switch_s: dict[str, float] = {}
        self.switches: Counter[str] = Counter()
        self.last_used: dict[str, float] = {}  # group -> last time a job of it was routed here

    @property
    def load(self) -> int:
        return len(self.queue) + self.active + (self.held if self.count_held else 0)

    @property
    def capacity(self) -> int:
        return self.workers_n + self.queue_limit

    def resident_group(self) -> str | None:
        return self.switching_to or self.current

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
        self.last_used[group] = now
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

    def _park(self, group: str | None) -> None:
        if group is None:
            return
        models = self.models_per_group
        if models > self.cache_limit:
            return  # too big to cache: dropped
        while self.cache and sum(self.cache.values()) + models > self.cache_limit:
            self.cache.popitem(last=False)
        self.cache[group] = models


class Policy(Protocol):
    """Routes requests. It may also define ``finished(req, latency_s, idle)``, called when a
    request completes (``idle``: its device had nothing in flight when it was routed)."""

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

    def _push(self, t: float, kind: int, a: int, b: int = 0) -> None:
        self._seq += 1
        heapq.heappush(self._events, (t, kind, self._seq, a, b))

    def run(
        self, trace: Sequence[Request], *, slo_s: float | None = None, give_up_misses: int | None = None
    ) -> SimResult:
        """Simulate ``trace``; with ``give_up_misses``, stop early once more requests than that
        missed ``slo_s`` (the caller only needs to know the objective was not held)."""
        n = len(trace)
        latency = [math.inf] * n
        device_of = [-1] * n
        switched = [""] * n
        idle = [False] * n  # the device had nothing in flight when the request was routed there
        finished = getattr(self.policy, "finished", None)
        switches: Counter[str] = Counter()
        rejected = misses = 0
        for i, r in enumerate(trace):
            self._push(r.t, _ARRIVAL, i)
        while self._events:
            t, kind, _, a, b = heapq.heappop(self._events)
            self.now = t
            if kind == _ARRIVAL:
                req = trace[a]
                choice = self.policy.choose(req, self.devices, t)
                if choice is None or len(self.devices[choice].queue) >= self.devices[choice].queue_limit:
                    rejected += 1
                    misses += 1
                else:
                    d = self.devices[choice]
                    device_of[a] = choice
                    idle[a] = d.load == 0
                    d.routed(req.group, t)
                    d.queue.append(req)
                    self._progress(d)
            elif kind == _JOB_DONE:
                d = self.devices[a]
                w = d.workers[b]
                job = w.job
                assert job is not None
                latency[job.index] = t - job.t
                if finished is not None:
                    finished(job, t - job.t, idle[job.index])
                if slo_s is not None and t - job.t > slo_s:
                    misses += 1
                w.state, w.job = IDLE, None
                d.active -= 1
                self._progress(d)
            else:  # _SWITCH_DONE
                d = self.devices[a]
                w = d.workers[b]
                job = w.job
                assert job is not None and d.switching_to == job.group
                if w.source == "cache":
                    d.cache.pop(job.group, None)
                d._park(d.current)
                d.current, d.switching_to = job.group, None
                d.last_switch_at = t
                d.switch_s[w.source] = self.cfg.costs.seconds(w.source, self.cfg.gb(job.group))
                d.switches[w.source] += 1
                switches[w.source] += 1
                switched[job.index] = w.source
                w.state = RUNNING
                d.active += 1
                d.held -= 1
                self._push(t + job.service_s, _JOB_DONE, d.index, w.index)
                self._progress(d)
            if give_up_misses is not None and misses > give_up_misses:
                return SimResult(n, latency, switches, device_of, rejected, aborted=True, end_s=t, switched=switched)
        return SimResult(n, latency, switches, device_of, rejected, end_s=self.now, switched=switched)

    # --- the device's own rules ----------------------------------------------------------

    def _progress(self, d: SimDevice) -> None:
        changed = True
        while changed:
            changed = False
            for w in list(d.waiting):
                if self._evaluate(d, w):
                    changed = True
            for w in d.workers:
                if w.state == IDLE and d.queue:
                    w.state, w.job, w.registered = WAITING, d.queue.popleft(), False
                    d.held += 1
                    d.waiting.append(w)
                    self._evaluate(d, w)
                    changed = True

    def _evaluate(self, d: SimDevice, w: Worker) -> bool:
        """One pass of DeviceScheduler._acquire's loop for a waiting worker; True on progress."""
        job = w.job
        assert job is not None
        resident = d.switching_to is None and d.current == job.group
        progressed = False
        if resident and w.registered:  # someone else brought our group in
            w.registered = False
            d.switch_waiters -= 1
            progressed = True
        if resident and d.switch_waiters == 0:
            d.waiting.remove(w)
            w.state = RUNNING
            d.active += 1
            d.held -= 1
            self._push(self.now + job.service_s, _JOB_DONE, d.index, w.index)
            return True
        if not resident and d.switching_to is None and d.active == 0:
            if w.registered:
                w.registered = False
                d.switch_waiters -= 1
            d.waiting.remove(w)
            w.state = SWITCHING
            w.source = "cache" if job.group in d.cache else "disk"
            d.switching_to = job.group
            cost = self.cfg.costs.seconds(w.source, self.cfg.gb(job.group))
            self._push(self.now + cost, _SWITCH_DONE, d.index, w.index)
            return True
        if not resident and not w.registered:
            w.registered = True
            d.switch_waiters += 1
        return progressed


def simulate(
    trace: Sequence[Request],
    cfg: SimConfig,
    policy: Policy,
    *,
    slo_s: float | None = None,
    give_up_misses: int | None = None,
) -> SimResult:
    return Simulator(cfg, policy).run(trace, slo_s=slo_s, give_up_misses=give_up_misses)
