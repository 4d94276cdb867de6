"""Autoscaling (issue 20) on a simulated day: pods and residency from demand against fixed pools
and a KubeAI-style rule, the same trace, the same simulated devices.

The trace is a day compressed into minutes: the arrival rate rises smoothly (a raised cosine)
from the trough to ten times it and falls back; six groups share it by Zipf popularity until,
halfway, one rare group turns hot (its share jumps). It runs on the discrete-event simulator
(``bench/sim.py``: batched devices with one current group each, the pod's own queue rule and
host cache, the router's own policy function, ``affinity``), with this machine's measured costs
as ``routing_quality`` uses them (decode step by batch from ``throughput.json``, switches from
``switch_cost.json``; the defaults where those are missing). Every ``CONTROL_S`` of simulated time
a controller looks at what the routers would report (per group: sequences in flight at pods and
waiting at routers) and changes the fleet: a new pod's device bills from its start and takes
work after the start-up delay, empty; a removed one drains (takes nothing new, serves what it
holds) and then stops billing; a request that finds no device waits for one (the router's
scale-from-zero wait) and its wait counts in its latency.

Lines, one run, one trace:

- ``ours``: one pool, its pod count from ``gpufleet.autoscale.replicas.plan_replicas`` (one
  device a pod, from zero), its residency from ``gpufleet.autoscale.residency.plan_residency``
  turned into a placement by the operator's ``gpufleet.operator.placement.place`` and honoured
  by each device as the pod's ``Placer`` does (a zero-weight job for the placed group);
- ``fixed_peak`` / ``fixed_mean`` / ``fixed_trough``: today's pool, a fixed number of devices
  sized for the peak, mean and trough rates at the same target sequences per device, the
  router's policy and no residency rule;
- ``kubeai``: per model, ``ceil(active requests / target)`` dedicated replicas, scaled up at
  once, down after the 30 s scale-down delay (``requiredConsecutiveScaleDowns`` consecutive
  lower looks, as KubeAI's model scaler counts them), from zero when a request waits; each
  replica loads its model while it starts and serves only it (no sharing, no switches).

    python -m bench autoscale [--quick]
    python -m bench.autoscale --help
"""

from __future__ import annotations

import argparse
import bisect
import itertools
import math
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from bench.common import md_table, percentile, progress, pyplot, rounded, save_figure, write_result
from bench.policies import OURS, make_policy
from bench.sim import SimConfig, SimDevice, Simulator, StepModel, SwitchCosts
from bench.trace import Request, group_names, zipf_weights
from gpufleet.api.autoscaling import AutoscalingSpec
from gpufleet.api.placement import DevicePlacement, PodPlacement, PoolPlacement
from gpufleet.autoscale.replicas import ReplicaHistory, plan_replicas
from gpufleet.autoscale.residency import GroupLoad, ResidencySettings, ResidencyState, plan_residency
from gpufleet.operator.placement import GroupDemand, place
from gpufleet.routing.service_time import ServiceTime

NAME = "autoscale"
LINES = ("ours", "fixed_peak", "fixed_mean", "fixed_trough", "kubeai", "ours_from_zero")
FLAP_WINDOW_S = 300.0


@dataclass(frozen=True)
class Day:
    """The trace and the fleet's settings."""

    duration_s: float = 1440.0  # the day, compressed (24 simulated minutes)
    night_s: float = 360.0  # then no requests: the autoscaled pools go to zero (longer than the flap window)
    morning_s: float = 120.0  # then requests again, the rate rising from 0 to the trough's: scale from zero
    peak_devices: int = 8  # the peak-sized layout; the peak rate follows from it and the target
    swing: float = 10.0  # peak rate / trough rate
    n_groups: int = 6
    alpha: float = 1.0  # Zipf exponent of popularity
    hot_group: str = "g04"  # rank 5 of 6: turns hot halfway
    hot_share: float = 0.4  # its share of the requests from then on (the others keep their proportions)
    tokens_mean: float = 256.0  # completion tokens per request, lognormal
    tokens_cv: float = 0.5
    target: int = 8  # targetSequencesPerDevice: both rules, the KubeAI-style target, and the layouts' sizing
    startup_s: float = 30.0  # a GPU pod's start-up: scheduled, container up, engine ready
    control_s: float = 5.0  # how often the operator (and KubeAI's scaler) looks
    scale_down_delay_s: float = 60.0  # ours: scaleDownDelaySeconds (2 start-ups; see the notes)
    kubeai_scale_down_delay_s: float = 30.0
    group_gb: float = 1.0  # weights per group (as routing_quality's scenario)
    cache_models: int = 4  # MAX_CPU_CACHED_MODELS
    seed: int = 20


@dataclass(frozen=True)
class Costs:
    steps: StepModel
    switches: SwitchCosts


def measured_costs() -> Costs:
    """This machine's figures, as routing_quality's ``measured`` cost set reads them."""
    from bench.routing_quality import measured_steps, measured_switches

    return Costs(measured_steps(), measured_switches())


def service_at_target(day: Day, steps: StepModel) -> float:
    """A request's seconds in a batch of ``target`` sequences: what sizes the layouts."""
    return (day.tokens_mean + steps.prefill_tokens) * steps.step_s(day.target)


def rates(day: Day, steps: StepModel) -> tuple[float, float, float]:
    """(trough, mean, peak) requests/s: the peak fills the peak layout at the target."""
    peak = day.peak_devices * day.target / service_at_target(day, steps)
    trough = peak / day.swing
    return trough, (trough + peak) / 2, peak


def rate_at(day: Day, steps: StepModel, t: float) -> float:
    trough, _, peak = rates(day, steps)
    return trough + (peak - trough) * (1 - math.cos(2 * math.pi * t / day.duration_s)) / 2


def layout_size(day: Day, steps: StepModel, rate: float) -> int:
    """Devices for ``rate`` at ``target`` sequences each by Little's law, were every request held its
    device for its time in a batch of ``target`` (no switch, no queue): a lower bound."""
    return max(1, math.ceil(rate * service_at_target(day, steps) / day.target - 1e-9))


def sized_layout(day: Day, costs: Costs, rate: float, seconds: float = 600.0) -> tuple[int, list[dict[str, float]]]:
    """The fewest devices that carry at most ``target`` sequences each, on average, at a constant
    ``rate``: the same measure of demand the rule scales by (sequences in flight, Little's law:
    rate x mean latency), measured on the simulator with the day's groups (the hot group's turn
    halfway included) and the router's policy. Returns the size and every size tried."""
    trace = diurnal_trace(replace(day, duration_s=seconds), costs.steps, flat_rate=rate)
    tried: list[dict[str, float]] = []
    n = layout_size(day, costs.steps, rate)
    while True:
        r = Simulator(sim_config(day, costs, n), make_policy(OURS)).run(trace)
        done = [x for x in r.latencies if math.isfinite(x)]
        per_device = rate * (sum(done) / len(done)) / n if done else math.inf
        ok = len(done) == len(trace) and per_device <= day.target
        tried.append({"devices": n, "sequences_per_device": per_device, "p99_latency_s": percentile(r.latencies, 99)})
        if ok or n >= 64:
            return n, tried
        n += 1


def shares(day: Day, hot: bool) -> np.ndarray:
    """Each group's share of the requests: Zipf, or from halfway with the hot group at ``hot_share``."""
    w = zipf_weights(day.n_groups, day.alpha)
    if not hot:
        return w
    k = group_names(day.n_groups).index(day.hot_group)
    rest = np.delete(w, k)
    out: np.ndarray = np.insert(rest / rest.sum() * (1 - day.hot_share), k, day.hot_share)
    return out


def wake_at(day: Day) -> float:
    """When the morning after the night begins: the first request to a pool at zero."""
    return day.duration_s + day.night_s


def diurnal_trace(day: Day, steps: StepModel, flat_rate: float | None = None) -> tuple[Request, ...]:
    """The day as a non-homogeneous Poisson process (thinning), Zipf groups with the hot group
    from halfway, then a night without requests and a morning whose rate climbs from zero back to
    the trough's. With ``flat_rate``: ``duration_s`` at that constant rate, the same groups."""
    seq = np.random.SeedSequence(day.seed)
    a_rng, g_rng, s_rng = (np.random.default_rng(s) for s in seq.spawn(3))
    trough, _, peak = rates(day, steps)
    if flat_rate is not None:
        times = np.sort(a_rng.uniform(0.0, day.duration_s, a_rng.poisson(flat_rate * day.duration_s)))
    else:
        n = a_rng.poisson(peak * day.duration_s)
        times = np.sort(a_rng.uniform(0.0, day.duration_s, n))
        times = times[a_rng.random(n) < np.array([rate_at(day, steps, t) for t in times]) / peak]
        m = a_rng.poisson(trough * day.morning_s)  # the morning: rate rising linearly from 0 to the trough's
        morning = np.sort(a_rng.uniform(0.0, day.morning_s, m))
        morning = morning[a_rng.random(m) < morning / day.morning_s]
        times = np.concatenate([times, wake_at(day) + morning])
    names = group_names(day.n_groups)
    half = day.duration_s / 2
    before, after = shares(day, False), shares(day, True)
    picks = np.where(
        times < half,
        g_rng.choice(day.n_groups, size=len(times), p=before),
        g_rng.choice(day.n_groups, size=len(times), p=after),
    )
    sigma2 = math.log1p(day.tokens_cv**2)
    tokens = s_rng.lognormal(math.log(day.tokens_mean) - sigma2 / 2, math.sqrt(sigma2), len(times))
    alone = steps.step_s(1)
    return tuple(
        Request(i, float(times[i]), names[int(picks[i])], float(tokens[i]) * alone, max(1, round(float(tokens[i]))))
        for i in range(len(times))
    )


# --- what the routers and pods would report ------------------------------------------------


@dataclass
class Observation:
    in_flight: dict[str, int]  # sent to devices, not answered (queued or running)
    held: dict[str, int]  # waiting at the router for a device
    resident: dict[str, int]  # devices that take work and hold the group current (or are switching to it)

    def demand(self, group: str) -> int:
        return self.in_flight.get(group, 0) + self.held.get(group, 0)

    @property
    def sequences(self) -> int:
        return sum(self.in_flight.values()) + sum(self.held.values())


def observe(sim: Simulator, trace: tuple[Request, ...]) -> Observation:
    in_flight: dict[str, int] = {}
    resident: dict[str, int] = {}
    for d in sim.devices:
        if d.stopped_at is not None:
            continue
        for g, q in d.queues.items():
            real = sum(1 for r in q if r.index >= 0)
            if real:
                in_flight[g] = in_flight.get(g, 0) + real
        for _, i in d.running:
            g = trace[i].group
            in_flight[g] = in_flight.get(g, 0) + 1
        r = d.resident_group()
        if d.accepting and r is not None:
            resident[r] = resident.get(r, 0) + 1
    held: dict[str, int] = {}
    for i in sim.held:
        held[trace[i].group] = held.get(trace[i].group, 0) + 1
    return Observation(in_flight, held, resident)


def pool_of(sim: Simulator) -> list[SimDevice]:
    """The pods that exist and are not being removed (starting ones included), oldest first."""
    return [d for d in sim.devices if not d.draining and d.stopped_at is None]


@dataclass
class Recorder:
    """The time series every line records at each look."""

    trace: tuple[Request, ...]
    groups: list[str]
    series: dict[str, list[Any]] = field(default_factory=dict)
    arrivals: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.arrivals = [r.t for r in self.trace]
        for k in ("t", "rate", "sequences", "held", "replicas", "ready", "billed"):
            self.series[k] = []

    def record(self, sim: Simulator, now: float, obs: Observation, step_s: float, **extra: Any) -> None:
        s = self.series
        n = bisect.bisect_right(self.arrivals, now) - bisect.bisect_right(self.arrivals, now - step_s)
        s["t"].append(round(now, 3))
        s["rate"].append(n / step_s)
        s["sequences"].append(obs.sequences)
        s["held"].append(sum(obs.held.values()))
        s["replicas"].append(len(pool_of(sim)))
        s["ready"].append(sum(1 for d in sim.devices if d.accepting))
        s["billed"].append(sum(1 for d in sim.devices if d.stopped_at is None))
        for k, v in extra.items():
            s.setdefault(k, []).append(v)


# --- the controllers ------------------------------------------------------------------------


class Fixed:
    """Today's pool: nothing changes; it only records."""

    def __init__(self, day: Day, rec: Recorder) -> None:
        self.day, self.rec = day, rec

    def __call__(self, sim: Simulator, now: float) -> None:
        sim.completed.clear()
        self.rec.record(sim, now, observe(sim, self.rec.trace), self.day.control_s)


class Ours:
    """The operator's loop for one pool: pods from demand, then residency from demand, as a placement."""

    def __init__(self, day: Day, rec: Recorder, max_replicas: int, costs: Costs) -> None:
        self.day, self.rec, self.costs = day, rec, costs
        self.spec = AutoscalingSpec(
            min_replicas=0,
            max_replicas=max_replicas,
            target_sequences_per_device=day.target,
            scale_up_delay_seconds=0,
            scale_down_delay_seconds=day.scale_down_delay_s,
        )
        self.residency = ResidencySettings(target_sequences_per_device=day.target)
        self.history = ReplicaHistory()
        self.state = ResidencyState()
        self.placement = PoolPlacement()
        self.service = {g: ServiceTime() for g in rec.groups}
        self.pooled = ServiceTime()
        self.replica_reasons: dict[str, int] = {}
        self.residency_reasons: dict[str, int] = {}
        self.pinned = 0

    def _learn(self, sim: Simulator) -> None:
        """Each group's service time: how long an answered request held its device (an EWMA)."""
        for i, answered_at in sim.completed:
            req = self.rec.trace[i]
            held_s = answered_at - sim.admitted_at[i]
            self.service[req.group].observe(held_s)
            self.pooled.observe(held_s)
        sim.completed.clear()

    def switch_s(self, sim: Simulator) -> float:
        """The pods' measured switch seconds (mean over devices and sources), else the cost model's."""
        seen = [s for d in sim.devices if d.stopped_at is None for s in d.switch_s.values()]
        if seen:
            return sum(seen) / len(seen)
        return self.costs.switches.seconds("disk", self.day.group_gb)

    def __call__(self, sim: Simulator, now: float) -> None:
        self._learn(sim)
        obs = observe(sim, self.rec.trace)
        pool = pool_of(sim)
        # The floor: devices the residency rule held against flapping last round (its pinned devices).
        d = plan_replicas(
            len(pool), obs.sequences, sum(obs.held.values()), self.pinned, 1, self.spec, self.history, now
        )
        self.history = d.history
        key = d.reason.split(":")[0]
        self.replica_reasons[key] = self.replica_reasons.get(key, 0) + 1
        for _ in range(d.after - len(pool)):
            sim.add_device(self.day.startup_s)
        for dev in pool[d.after :]:  # a StatefulSet removes its highest ordinals first
            sim.remove_device(dev.index)
        pool = pool_of(sim)
        fallback = self.pooled.seconds or 1.0
        loads = [
            GroupLoad(
                g, demand=obs.demand(g), resident=obs.resident.get(g, 0), service_s=self.service[g].seconds or fallback
            )
            for g in self.rec.groups
        ]
        plan = plan_residency(loads, len(pool), self.switch_s(sim), self.residency, self.state, now)
        self.state = plan.state
        self.pinned = plan.pinned_devices
        for dec in plan.decisions:
            k = dec.reason.split(":")[0].split(" ")[0]
            self.residency_reasons[k] = self.residency_reasons.get(k, 0) + 1
        observed = PoolPlacement(
            pods={
                dev.name: PodPlacement(
                    devices={"0": DevicePlacement(current=dev.resident_group(), cached=tuple(sorted(dev.cache)))}
                )
                for dev in pool
            }
        )
        new = place(
            [(dev.name, 1) for dev in pool],
            [GroupDemand(g, min_resident=n) for g, n in plan.desired.items()],
            observed,
            self.placement.generation + 1,
            previous=self.placement,
        )
        if new.pods != self.placement.pods:
            self.placement = new
        for dev in pool:
            sim.prefer(dev.index, self.placement.for_device(dev.name, 0).current)
        self.rec.record(sim, now, obs, self.day.control_s, **{f"desired:{g}": plan.desired[g] for g in self.rec.groups})


class KubeAI:
    """Per model: ceil(active / target) dedicated replicas; down after the delay's consecutive looks."""

    def __init__(self, day: Day, rec: Recorder, max_replicas: int) -> None:
        self.day, self.rec, self.max_replicas = day, rec, max_replicas
        self.required = math.ceil(day.kubeai_scale_down_delay_s / day.control_s)
        self.downs = dict.fromkeys(rec.groups, 0)

    def __call__(self, sim: Simulator, now: float) -> None:
        sim.completed.clear()
        obs = observe(sim, self.rec.trace)
        counts: dict[str, int] = {}
        for g in self.rec.groups:
            replicas = [dev for dev in pool_of(sim) if dev.serves == frozenset({g})]
            want = min(self.max_replicas, math.ceil(obs.demand(g) / self.day.target - 1e-9))
            if want < len(replicas) and self.downs[g] < self.required:
                self.downs[g] += 1  # KubeAI's ModelScaler: scale down only after this many looks in a row
            else:
                self.downs[g] = 0
                for _ in range(want - len(replicas)):
                    sim.add_device(self.day.startup_s, serves=frozenset({g}), group=g)
                for dev in replicas[want:]:
                    sim.remove_device(dev.index)
            counts[f"replicas:{g}"] = sum(1 for dev in pool_of(sim) if dev.serves == frozenset({g}))
        self.rec.record(sim, now, obs, self.day.control_s, **counts)


# --- measuring ------------------------------------------------------------------------------


def direction_changes(
    values: list[int], times: list[float], window_s: float = FLAP_WINDOW_S, pool: list[int] | None = None
) -> int:
    """The most direction changes of a series in any ``window_s``: a change whose sign differs
    from the previous change's, counted at its own time. With ``pool`` (the pool's devices at each
    look), a fall forced by the pool's size (the previous value no longer fits) is left out."""
    changes = [
        (times[k], 1 if values[k] > values[k - 1] else -1)
        for k in range(1, len(values))
        if values[k] != values[k - 1] and not (pool is not None and values[k - 1] > pool[k] >= values[k])
    ]
    flips = [t for (_, a), (t, b) in itertools.pairwise(changes) if a != b]
    best = 0
    for k, t in enumerate(flips):
        best = max(best, bisect.bisect_left(flips, t + window_s) - k)
    return best


def sim_config(day: Day, costs: Costs, n_devices: int) -> SimConfig:
    return SimConfig(
        n_devices=n_devices,
        cache_limit_models=day.cache_models,
        models_per_group=1,
        group_gb=day.group_gb,
        costs=costs.switches,
        steps=costs.steps,
        initial_group=None,  # pods start empty; the router's policy brings groups in
    )


def _billed(d: SimDevice, lo: float, hi: float) -> float:
    """Seconds device ``d`` was billed within [lo, hi] (from its pod's start to its stop)."""
    stop = d.stopped_at if d.stopped_at is not None else hi
    return max(0.0, min(stop, hi) - max(d.started_at, lo))


def _latency(lat: list[float], idx: list[int]) -> dict[str, Any]:
    vals = [lat[i] for i in idx]
    done = [x for x in vals if math.isfinite(x)]
    return {
        "requests": len(vals),
        "answered": len(done),
        "p50_latency_s": percentile(vals, 50),
        "p99_latency_s": percentile(vals, 99),
        "mean_latency_s": sum(done) / len(done) if done else math.nan,
        "max_latency_s": max(vals) if vals else math.nan,
    }


def run_line(
    name: str, day: Day, costs: Costs, trace: tuple[Request, ...], sizes: dict[str, int]
) -> tuple[dict[str, Any], dict[str, list[Any]], dict[str, Any]]:
    """One line on the trace: its figures, its time series, its settings."""
    groups = group_names(day.n_groups)
    rec = Recorder(trace, groups)
    extra: dict[str, Any] = {}
    ours: Ours | None = None
    controller: Callable[[Simulator, float], None]
    if name.startswith("fixed_"):
        sim = Simulator(sim_config(day, costs, sizes[name.removeprefix("fixed_")]), make_policy(OURS))
        controller = Fixed(day, rec)
    elif name.startswith("ours"):
        # The day begins with the pool the trough asks for, up and empty; from_zero: with no pod at all.
        sim = Simulator(sim_config(day, costs, 0 if name == "ours_from_zero" else sizes["trough"]), make_policy(OURS))
        ours = Ours(day, rec, sizes["peak"], costs)
        controller = ours
        extra = {"spec": ours.spec.model_dump(by_alias=True), "residency_settings": asdict(ours.residency)}
    else:
        sim = Simulator(sim_config(day, costs, 0), make_policy(OURS))
        for g in groups:  # the day begins with what the trough keeps: one replica of every model, up
            sim.add_device(0.0, serves=frozenset({g}), group=g)
        kubeai = KubeAI(day, rec, sizes["peak"])
        controller = kubeai
        extra = {
            "target": day.target,
            "scale_down_delay_s": day.kubeai_scale_down_delay_s,
            "required_consecutive_scale_downs": kubeai.required,
            "max_replicas_per_model": sizes["peak"],
        }
    started = time.monotonic()
    r = sim.run(
        trace,
        control=controller,
        control_interval_s=day.control_s,
        control_until_s=wake_at(day) + day.morning_s + 3600.0,
    )
    wall = time.monotonic() - started
    lat = r.latencies
    finished = [trace[i].t + x for i, x in enumerate(lat) if math.isfinite(x)]
    end = max([wake_at(day) + day.morning_s, *finished])
    wake = wake_at(day)
    day_idx = [i for i, q in enumerate(trace) if q.t < day.duration_s]
    wake_idx = [i for i, q in enumerate(trace) if q.t >= day.duration_s]
    first = trace[wake_idx[0]].t if wake_idx else wake
    day_gpu = sum(_billed(d, 0.0, day.duration_s) for d in sim.devices)
    held = [lat[i] for i in range(len(trace)) if sim.was_held[i]]
    row: dict[str, Any] = {
        "day": {
            **_latency(lat, day_idx),
            "gpu_seconds": day_gpu,
            "mean_devices": day_gpu / day.duration_s,
            "held_for_a_device": sum(1 for i in day_idx if sim.was_held[i]),
        },
        "wake": {
            **_latency(lat, wake_idx),
            "pods_at_first_request": sum(
                1 for d in sim.devices if d.started_at <= first and (d.stopped_at is None or d.stopped_at > first)
            ),
            "held_for_a_device": sum(1 for i in wake_idx if sim.was_held[i]),
            "gpu_seconds": sum(_billed(d, day.duration_s, end) for d in sim.devices),
        },
        "requests": len(trace),
        "answered": len(finished),
        "lost": len(trace) - len(finished),
        "refused_429": r.rejected,
        "held_for_a_device": r.held,
        "held_max_wait_s": max(held) if held else 0.0,
        "gpu_seconds_all": sum(_billed(d, 0.0, end) for d in sim.devices),
        "max_replicas": max(rec.series["replicas"]) if rec.series["replicas"] else len(sim.devices),
        "pods_started": len(sim.devices),
        "switches": r.total_switches,
        "switches_from_disk": r.switches.get("disk", 0),
        "switches_from_cache": r.switches.get("cache", 0),
        "end_s": end,
        "sim_wall_s": wall,
    }
    if ours is not None:
        times = rec.series["t"]
        per_group = {g: direction_changes(rec.series[f"desired:{g}"], times) for g in groups}
        chosen = {g: direction_changes(rec.series[f"desired:{g}"], times, pool=rec.series["replicas"]) for g in groups}
        row["max_direction_changes_in_5_min"] = max(per_group.values())
        row["direction_changes_in_5_min_by_group"] = per_group
        row["max_direction_changes_in_5_min_unforced"] = max(chosen.values())
        # The pods the demand asked for at each look against the pods there were (the day's looks).
        looks = [k for k, t in enumerate(times) if t < day.duration_s]
        asked = [min(sizes["peak"], math.ceil(rec.series["sequences"][k] / day.target - 1e-9)) for k in looks]
        row["day"]["mean_pods_asked"] = sum(asked) / max(1, len(looks))
        row["day"]["mean_pods"] = sum(rec.series["replicas"][k] for k in looks) / max(1, len(looks))
        extra["replica_reasons"] = ours.replica_reasons
        extra["residency_reasons"] = ours.residency_reasons
    return row, rec.series, extra


def run(*, quick: bool, command: str, day: Day | None = None) -> dict[str, Any]:
    day = day or (Day(duration_s=720.0) if quick else Day())
    costs = measured_costs()
    trough, mean, peak = rates(day, costs.steps)
    lower_bounds = {
        k: layout_size(day, costs.steps, r) for k, r in (("peak", peak), ("mean", mean), ("trough", trough))
    }
    sizes: dict[str, int] = {}
    sizing: dict[str, Any] = {}
    for key, rate in (("trough", trough), ("mean", mean), ("peak", peak)):
        sizes[key], sizing[key] = sized_layout(day, costs, rate)
        progress(
            f"autoscale: layout for the {key} ({rate:.2f} req/s): {sizes[key]} devices "
            f"(Little's-law lower bound {lower_bounds[key]})"
        )
    trace = diurnal_trace(day, costs.steps)
    progress(
        f"autoscale: a {day.duration_s / 60:.0f}-minute day, {trough:.2f} -> {peak:.2f} -> {trough:.2f} req/s, "
        f"then {day.night_s:g}s of night and a {day.morning_s:g}s morning; {len(trace)} requests of "
        f"~{day.tokens_mean:.0f} tokens, {day.n_groups} groups (Zipf {day.alpha}, {day.hot_group} to "
        f"{day.hot_share:.0%} from halfway); layouts peak/mean/trough {sizes['peak']}/{sizes['mean']}/"
        f"{sizes['trough']} devices; start-up {day.startup_s:g}s; a request {service_at_target(day, costs.steps):.2f}s "
        f"at batch {day.target}; switch disk {costs.switches.seconds('disk', day.group_gb):.3f}s, cache "
        f"{costs.switches.seconds('cache', day.group_gb):.3f}s"
    )
    lines: dict[str, Any] = {}
    series: dict[str, Any] = {}
    settings: dict[str, Any] = {}
    for name in LINES:
        row, s, extra = run_line(name, day, costs, trace, sizes)
        lines[name], series[name], settings[name] = row, s, extra
        dd, w = row["day"], row["wake"]
        progress(
            f"autoscale {name:14s} day: GPU-s {dd['gpu_seconds']:7.0f} (mean {dd['mean_devices']:5.2f} devices) "
            f"p50 {dd['p50_latency_s']:.2f}s p99 {dd['p99_latency_s']:.2f}s | switches {row['switches']} answered "
            f"{row['answered']}/{row['requests']} 429 {row['refused_429']} | morning: {w['pods_at_first_request']} "
            f"pods at its first request, {w['held_for_a_device']} held, max {w['max_latency_s']:.1f}s "
            f"({row['sim_wall_s']:.1f}s)"
        )
    doc: dict[str, Any] = {
        "what": "autoscaling on a simulated day: pods (plan_replicas) and residency (plan_residency) from demand "
        "vs fixed pools sized for the peak, mean and trough, and a KubeAI-style per-model rule; one trace, one "
        "discrete-event simulator, the router's own policy",
        "day": asdict(day),
        "rates": {"trough": trough, "mean": mean, "peak": peak},
        "layout_sizes": sizes,
        "layout_sizing": {
            "what": "the fewest devices carrying at most target sequences each on average (rate x mean latency / "
            "devices) at a constant rate, simulated with the day's groups; lower_bound: rate x a request's time "
            "at batch target / target, were nothing ever queued or switched",
            "lower_bound": lower_bounds,
            "tried": sizing,
        },
        "group_shares": {
            "before_halfway": dict(zip(group_names(day.n_groups), shares(day, False).round(4).tolist(), strict=True)),
            "from_halfway": dict(zip(group_names(day.n_groups), shares(day, True).round(4).tolist(), strict=True)),
        },
        "costs": {
            "steps": asdict(costs.steps),
            "switches": asdict(costs.switches),
            "switch_s": {
                "disk": costs.switches.seconds("disk", day.group_gb),
                "cache": costs.switches.seconds("cache", day.group_gb),
            },
            "request_s_at_target_batch": service_at_target(day, costs.steps),
        },
        "lines": lines,
        "settings": settings,
        "targets": targets(lines),
        "series": {k: _rounded(v) for k, v in series.items()},
        "notes": [
            "day: requests arriving in [0, duration_s); its GPU-seconds: every device from the start of its pod "
            "(start-up included) to its stop (drain included), clipped to the day; wake: the night and the morning "
            "after it (scale to zero, then from zero)",
            "the day begins as a trough would leave it: ours with the trough layout's pods up and empty, kubeai "
            "with one replica of each model, the fixed layouts up and empty; ours_from_zero is ours with no pod at "
            "t=0 while the trough's requests already arrive (they wait for a pod; a harsher start than any pool "
            "at zero would see), outside the targets",
            f"ours: scaleDownDelaySeconds {day.scale_down_delay_s:g} (two pod start-ups; the HPA's 300 s is a "
            "fifth of this compressed day), scaleUpDelaySeconds 0, minReplicas 0, maxReplicas the peak layout; "
            "residency settings the rule's defaults with its target; each group's service time learned from "
            "answers (admission to answer, an EWMA), the switch time the devices' measured mean",
            "the placement's cached hints are not simulated (only its current group, honoured as the pod's "
            "Placer does: one zero-weight job per change)",
            "kubeai: active requests are read as they are at each look (KubeAI averages them over a window, "
            "10 minutes by default: slower than here); its replicas load their model while they start",
            f"direction changes: of each group's desired residency (ours) at each look, in any {FLAP_WINDOW_S:g} s; "
            "'unforced' leaves out the falls the pool's size forces (the previous desire no longer fits the pool, "
            "as when it scales to zero for the night)",
            "mean_pods_asked: ceil(sequences / target) at each look of the day (capped at maxReplicas), against "
            "mean_pods, what the rule kept (its scale-down stabilisation holds the highest of the delay's looks)",
        ],
    }
    write_result(NAME, doc, quick=quick, command=command)
    plot(doc)
    return doc


def _rounded(series: dict[str, list[Any]]) -> dict[str, list[Any]]:
    """Time series as recorded (one point per look), numbers rounded."""
    return {k: [round(x, 3) if isinstance(x, float) else x for x in v] for k, v in series.items()}


def targets(lines: dict[str, Any]) -> list[dict[str, Any]]:
    ours, peak, kubeai = lines["ours"]["day"], lines["fixed_peak"]["day"], lines["kubeai"]["day"]
    saved = 1 - ours["gpu_seconds"] / peak["gpu_seconds"]
    p99_vs_peak = _ratio(ours["p99_latency_s"], peak["p99_latency_s"])
    p99_vs_kubeai = _ratio(ours["p99_latency_s"], kubeai["p99_latency_s"])
    gpu_vs_kubeai = ours["gpu_seconds"] / kubeai["gpu_seconds"]
    ours_lines = [v for k, v in lines.items() if k.startswith("ours")]
    lost = sum(v["lost"] + v["refused_429"] for v in ours_lines)
    from_zero = all(v["wake"]["pods_at_first_request"] == 0 for v in ours_lines)
    flaps = max(v["max_direction_changes_in_5_min"] for v in ours_lines)
    unforced = max(v["max_direction_changes_in_5_min_unforced"] for v in ours_lines)
    return [
        {
            "target": "day: GPU-seconds saved against the peak-sized layout",
            "figure": saved,
            "limit": 0.30,
            "met": saved >= 0.30,
        },
        {
            "target": "day: p99 latency / the peak-sized layout's",
            "figure": p99_vs_peak,
            "limit": 1.5,
            "met": p99_vs_peak is not None and p99_vs_peak <= 1.5,
        },
        {
            "target": "day: p99 latency / the KubeAI-style rule's (below 1: beaten)",
            "figure": p99_vs_kubeai,
            "limit": 1.0,
            "met": p99_vs_kubeai is not None and p99_vs_kubeai < 1.0,
        },
        {
            "target": "day: GPU-seconds / the KubeAI-style rule's (at most 1)",
            "figure": gpu_vs_kubeai,
            "limit": 1.0,
            "met": gpu_vs_kubeai <= 1.0,
        },
        {
            "target": "requests lost or refused (ours, ours_from_zero), each having scaled from zero",
            "figure": lost,
            "limit": 0,
            "met": lost == 0 and from_zero,
            "held_for_a_device": sum(v["held_for_a_device"] for v in ours_lines),
            "scaled_from_zero": from_zero,
        },
        {
            "target": "most direction changes of a group's desired residency in any 5 minutes (ours, ours_from_zero)",
            "figure": flaps,
            "limit": 2,
            "met": flaps <= 2,
            "without_falls_forced_by_the_pool_size": unforced,
        },
    ]


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or not math.isfinite(a) or not math.isfinite(b) or b <= 0:
        return None
    return a / b


COLORS = {
    "ours": "C0",
    "fixed_peak": "C3",
    "fixed_mean": "C1",
    "fixed_trough": "C7",
    "kubeai": "C2",
    "ours_from_zero": "C9",
}


def plot(doc: dict[str, Any]) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(14, 8.5))
    series = doc["series"]
    d = doc["day"]
    night = (d["duration_s"], d["duration_s"] + d["night_s"])

    ax = axes[0][0]
    for name in LINES:
        s = series[name]
        ax.step(
            s["t"],
            s["billed"],
            where="post",
            color=COLORS[name],
            label=name,
            lw=1.2,
            ls="--" if name == "ours_from_zero" else "-",
        )
    ax2 = ax.twinx()
    ax2.plot(series["ours"]["t"], series["ours"]["rate"], color="k", alpha=0.25, lw=0.8)
    ax2.set_ylabel("arrivals (req/s, grey)", fontsize=9)
    ax.axvspan(*night, color="k", alpha=0.06)
    ax.set_ylabel("devices billed", fontsize=9)
    ax.set_title(
        "devices over the day, the night (shaded) and the morning (starting and draining included)", fontsize=9
    )
    ax.legend(fontsize=7, loc="upper left")

    ax = axes[0][1]
    s = series["ours"]
    groups = [k.removeprefix("desired:") for k in s if k.startswith("desired:")]
    ax.stackplot(s["t"], [s[f"desired:{g}"] for g in groups], labels=groups, step="post", alpha=0.8)
    ax.step(s["t"], s["replicas"], where="post", color="k", lw=1, label="pods")
    ax.axvline(d["duration_s"] / 2, color="k", ls=":", lw=0.8)
    ax.axvspan(*night, color="k", alpha=0.06)
    ax.set_title(
        f"ours: desired residency per group (stacked) and pods; {d['hot_group']} hot from halfway (dotted)", fontsize=9
    )
    ax.legend(fontsize=7, ncol=4, loc="upper left")

    ax = axes[1][0]
    s = series["kubeai"]
    models = [k.removeprefix("replicas:") for k in s if k.startswith("replicas:")]
    ax.stackplot(s["t"], [s[f"replicas:{g}"] for g in models], labels=models, step="post", alpha=0.8)
    ax.axvspan(*night, color="k", alpha=0.06)
    ax.set_title("kubeai: dedicated replicas per model (stacked)", fontsize=9)
    ax.set_xlabel("simulated seconds", fontsize=9)
    ax.legend(fontsize=7, ncol=3, loc="upper left")

    ax = axes[1][1]
    xs = list(range(len(LINES)))
    ax.bar(xs, [doc["lines"][k]["day"]["gpu_seconds"] for k in LINES], 0.5, color=[COLORS[k] for k in LINES])
    ax.set_ylabel("GPU-seconds of the day (bars)", fontsize=9)
    ax.set_xticks(xs)
    ax.set_xticklabels(LINES, fontsize=7)
    ax3 = ax.twinx()
    for key, marker, label in (("p99_latency_s", "kv", "p99"), ("p50_latency_s", "ko", "p50")):
        vals = [doc["lines"][k]["day"][key] for k in LINES]
        ax3.plot(
            xs,
            [v if v is not None else math.nan for v in vals],
            marker,
            label=label,
            mfc="none" if label == "p50" else None,
        )
    ax3.set_yscale("log")
    ax3.set_ylabel("latency of the day's requests (s, markers; log)", fontsize=9)
    ax3.legend(fontsize=8, loc="upper right")
    ax.set_title("the day: GPU-seconds and latency (no marker: refused requests make it infinite)", fontsize=9)
    fig.suptitle(
        f"Autoscaling on a {d['duration_s'] / 60:.0f}-minute simulated day "
        f"({doc['rates']['trough']:.1f} -> {doc['rates']['peak']:.1f} -> {doc['rates']['trough']:.1f} req/s), "
        f"{d['n_groups']} groups, pod start-up {d['startup_s']:g} s",
        fontsize=11,
    )
    save_figure(fig, NAME)


def summarize(doc: dict[str, Any]) -> str:
    rows = []
    for k, v in doc["lines"].items():
        dd, w = v["day"], v["wake"]
        rows.append(
            [
                k,
                rounded(dd["gpu_seconds"], 0),
                rounded(dd["mean_devices"], 2),
                v["max_replicas"],
                rounded(dd["p50_latency_s"], 3),
                rounded(dd["p99_latency_s"], 3),
                v["switches"],
                f"{v['answered']}/{v['requests']}",
                v["lost"],
                v["refused_429"],
                w["pods_at_first_request"],
                w["held_for_a_device"],
                rounded(w["max_latency_s"], 1),
            ]
        )
    d = doc["day"]
    tgt = [
        [
            t["target"],
            rounded(t["figure"], 3) if isinstance(t["figure"], float) else t["figure"],
            t["limit"],
            "met" if t["met"] else "MISSED",
        ]
        for t in doc["targets"]
    ]
    return "\n".join(
        [
            "## Autoscaling on a simulated day (`python -m bench autoscale`)",
            "",
            f"{doc['what']}. A {d['duration_s'] / 60:.0f}-minute day, {doc['rates']['trough']:.2f} -> "
            f"{doc['rates']['peak']:.2f} -> {doc['rates']['trough']:.2f} req/s, {d['n_groups']} groups (Zipf "
            f"{d['alpha']}; {d['hot_group']} to {d['hot_share']:.0%} of requests from halfway), then "
            f"{d['night_s']:g} s without requests and a {d['morning_s']:g} s morning from zero; pod start-up "
            f"{d['startup_s']:g} s, looks every {d['control_s']:g} s; layouts peak/mean/trough "
            f"{doc['layout_sizes']['peak']}/{doc['layout_sizes']['mean']}/{doc['layout_sizes']['trough']} devices; "
            "costs: "
            f"{doc['costs']['steps']['origin']}; {doc['costs']['switches']['origin']}.",
            "",
            md_table(
                [
                    "line",
                    "day GPU-s",
                    "mean devices",
                    "max pods",
                    "day p50 s",
                    "day p99 s",
                    "switches",
                    "answered",
                    "lost",
                    "429",
                    "pods at morning",
                    "held (morning)",
                    "morning max s",
                ],
                rows,
            ),
            "",
            md_table(["target", "figure", "limit", "met"], tgt),
            "",
            "![autoscale](autoscale.png)",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.autoscale",
        description="Autoscaling on a simulated diurnal day: ours (pods and residency from demand) vs fixed pools "
        "sized for the peak, mean and trough, and a KubeAI-style per-model rule. Writes bench/results/autoscale.json "
        "and .png.",
    )
    parser.add_argument("--quick", action="store_true", help="a 12-minute day instead of 24 (well under 2 minutes)")
    parser.add_argument("--duration-s", type=float, help="the day's length in simulated seconds")
    parser.add_argument("--startup-s", type=float, help=f"a pod's start-up delay (default {Day.startup_s:g})")
    parser.add_argument(
        "--scale-down-delay-s", type=float, help=f"ours: scaleDownDelaySeconds (default {Day.scale_down_delay_s:g})"
    )
    parser.add_argument("--seed", type=int, help=f"the trace's seed (default {Day.seed})")
    args = parser.parse_args(argv)
    day = Day(duration_s=720.0) if args.quick else Day()
    for arg in ("duration_s", "startup_s", "scale_down_delay_s", "seed"):
        if getattr(args, arg) is not None:
            day = replace(day, **{arg: getattr(args, arg)})
    argv_used = argv if argv is not None else sys.argv[1:]
    command = "python -m bench.autoscale " + " ".join(shlex.quote(a) for a in argv_used)
    run(quick=args.quick, command=command.strip(), day=day)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
