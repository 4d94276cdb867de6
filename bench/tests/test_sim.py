"""The benchmark's device simulator, on scenarios small enough to check by hand."""

from __future__ import annotations

import pytest

import bench.policies
import gpufleet.routing.policy
from bench.policies import Affinity, LeastLoad, LruMultiplex, RoundRobin, device_state
from bench.sim import SimConfig, SimDevice, SwitchCosts, simulate
from bench.trace import Request

pytestmark = pytest.mark.unit

# From disk 1 s, from the CPU cache 0.5 s, whatever the size.
COSTS = SwitchCosts(disk_fixed_s=1.0, disk_s_per_gb=0.0, cache_fixed_s=0.5, cache_s_per_gb=0.0)


def trace(*items: tuple[float, str, float]) -> list[Request]:
    return [Request(i, t, g, s, 1) for i, (t, g, s) in enumerate(items)]


class Fixed:
    """Every request to one device."""

    name = "fixed"

    def __init__(self, index: int = 0) -> None:
        self.index = index

    def choose(self, req: Request, devices: object, now: float) -> int:
        return self.index


def one_device(workers: int, cache_limit: int = 4) -> SimConfig:
    return SimConfig(n_devices=1, workers=workers, cache_limit_models=cache_limit, costs=COSTS, initial_group="g00")


def test_one_worker_switches_from_disk_then_back_from_cache() -> None:
    r = simulate(trace((0.0, "g00", 1.0), (0.1, "g01", 1.0), (0.2, "g00", 1.0)), one_device(1), Fixed())
    # g00 runs 0-1; g01 switches from disk 1-2 and runs 2-3; g00 comes back from the cache 3-3.5, runs 3.5-4.5.
    assert r.latencies == pytest.approx([1.0, 2.9, 4.3])
    assert dict(r.switches) == {"disk": 1, "cache": 1}
    assert r.switched == ["", "disk", "cache"]
    assert r.summary(10.0)["switches_per_1000"] == pytest.approx(1000 * 2 / 3)


def test_a_switch_waits_for_in_flight_work_and_blocks_new_work_of_the_old_group() -> None:
    reqs = trace((0.0, "g00", 2.0), (0.1, "g01", 1.0), (0.2, "g00", 0.1))
    r = simulate(reqs, one_device(3), Fixed())
    # A worker takes g01 at 0.1 and waits: g00's request runs until 2. The short g00 request at 0.2
    # finds a free worker and g00 current, yet must not start: a switch is wanted. At 2 the switch
    # runs (disk, until 3), then g01 runs 3-4; only then g00 comes back from the cache (4-4.5)
    # and the short request runs 4.5-4.6.
    assert r.latencies == pytest.approx([2.0, 3.9, 4.4])
    assert dict(r.switches) == {"disk": 1, "cache": 1}


def test_requests_of_the_incoming_group_share_the_switch() -> None:
    reqs = trace((0.0, "g01", 1.0), (0.1, "g01", 1.0))
    r = simulate(reqs, one_device(2), Fixed())
    # One switch from disk 0-1, then both run at once on the two workers.
    assert r.latencies == pytest.approx([2.0, 1.9])
    assert r.total_switches == 1


def test_cache_is_lru_and_limited_in_models() -> None:
    cfg = SimConfig(n_devices=1, workers=1, cache_limit_models=2, models_per_group=1, costs=COSTS, initial_group="g00")
    reqs = trace((0, "g01", 0.1), (10, "g02", 0.1), (20, "g03", 0.1), (30, "g01", 0.1), (40, "g00", 0.1))
    r = simulate(reqs, cfg, Fixed())
    # After g03: cache holds g01, g02 (g00 evicted). g01 comes from the cache, g00 from disk.
    assert r.switched == ["disk", "disk", "disk", "cache", "disk"]


def test_a_group_larger_than_the_cache_is_dropped() -> None:
    cfg = SimConfig(n_devices=1, workers=1, cache_limit_models=1, models_per_group=2, costs=COSTS, initial_group="g00")
    r = simulate(trace((0, "g01", 0.1), (10, "g00", 0.1)), cfg, Fixed())
    assert r.switched == ["disk", "disk"]


def test_load_as_the_router_counts_it_or_as_the_scheduler_does() -> None:
    reqs = trace((0, "g01", 1.0), (0, "g01", 1.0))
    router = SimDevice(0, SimConfig(n_devices=1, costs=COSTS))
    router.queue.extend(reqs)
    router.held = 1
    assert router.load == 3  # everything in flight, the job held for a switch included
    pod = SimDevice(0, SimConfig(n_devices=1, costs=COSTS, load_counts_held=False))
    pod.queue.extend(reqs)
    pod.held = 1
    assert pod.load == 2  # DeviceScheduler.load: queued + running


def test_held_jobs_are_tracked_through_a_switch() -> None:
    seen: list[int] = []

    class Probe(Fixed):
        def choose(self, req: Request, devices: object, now: float) -> int:
            seen.append(devices[0].load)  # type: ignore[index]
            return 0

    simulate(trace((0.0, "g01", 1.0), (0.5, "g02", 1.0)), one_device(1), Probe())
    assert seen == [0, 1]  # at 0.5 the first job is still switching: one in flight


def test_the_router_expects_the_switch_it_caused() -> None:
    cfg = SimConfig(n_devices=1, workers=1, costs=COSTS, initial_group="g00")
    d = SimDevice(0, cfg)
    d.routed("g01", 3.0)
    assert d.view(3.5) == ("g01", 3.0)  # switching_to and a fresh last switch, before the device acts
    assert device_state(d, 3.5).resident_group() == "g01"
    d.switching_to = "g01"
    assert d.view(4.0) == ("g01", None)  # caught up: the device itself says so now
    d.current, d.switching_to, d.last_switch_at = "g01", None, 5.0
    assert d.view(6.0) == (None, 5.0)  # caught up: the expectation is gone
    assert d.expected is None
    d.routed("g02", 10.0)
    assert d.view(10.0 + cfg.expectation_ttl_s) == (None, 5.0)  # expired
    off = SimDevice(0, SimConfig(n_devices=1, costs=COSTS, initial_group="g00", expect_switches=False))
    off.routed("g01", 1.0)
    assert off.view(1.0) == (None, None)


def test_refused_when_the_queue_is_full() -> None:
    cfg = SimConfig(n_devices=1, workers=1, queue_limit=1, costs=COSTS, initial_group="g00")
    r = simulate(trace((0, "g00", 5.0), (0.1, "g00", 1.0), (0.2, "g00", 1.0)), cfg, Fixed())
    assert r.rejected == 1
    assert r.latencies[2] == float("inf")
    assert r.summary(100.0)["slo_attainment"] == pytest.approx(2 / 3)


def test_give_up_stops_early_once_the_objective_is_lost() -> None:
    reqs = trace(*[(i * 0.01, f"g0{i % 2}", 1.0) for i in range(50)])
    r = simulate(reqs, one_device(1), Fixed(), slo_s=0.5, give_up_misses=2)
    assert r.aborted


def test_affinity_calls_the_real_routing_function() -> None:
    assert bench.policies.choose_device is gpufleet.routing.policy.choose_device
    cfg = SimConfig(n_devices=3, workers=1, costs=COSTS, initial_group=None)
    devices = [SimDevice(i, cfg) for i in range(3)]
    devices[2].current = "g05"
    req = Request(0, 0.0, "g05", 1.0, 1)
    assert Affinity().choose(req, devices, 0.0) == 2
    state = device_state(devices[2], 0.0)
    assert (state.current_group, state.load, state.key) == ("g05", 0, "sim/dev2")


def test_baselines() -> None:
    cfg = SimConfig(n_devices=3, workers=1, costs=COSTS, initial_group=None)
    devices = [SimDevice(i, cfg) for i in range(3)]
    req = Request(0, 0.0, "g01", 1.0, 1)
    rr = RoundRobin()
    assert [rr.choose(req, devices, 0) for _ in range(4)] == [0, 1, 2, 0]
    devices[0].active, devices[1].active = 2, 1
    assert LeastLoad().choose(req, devices, 0) == 2
    # LRU multiplexing prefers a device holding the group (here in its cache), even a busier one,
    devices[1].cache["g01"] = 1
    assert LruMultiplex().choose(req, devices, 0) == 1
    # and otherwise the device holding the fewest groups.
    devices[1].cache.clear()
    devices[0].current, devices[2].current = "g07", "g08"
    devices[2].cache["g09"] = 1
    assert LruMultiplex().choose(req, devices, 0) == 1


def test_affinity_learns_the_service_time_from_idle_devices_like_the_router() -> None:
    policy = Affinity()
    reqs = trace((0.0, "g00", 1.0), (0.5, "g00", 1.0), (10.0, "g00", 2.0))
    simulate(reqs, one_device(1), policy)
    # 1st: idle, 1.0 s; 2nd: queued behind the 1st (not idle), ignored; 3rd: idle, 2.0 s.
    assert policy.service_s == pytest.approx(1.0 + 0.2 * (2.0 - 1.0))
    assert policy.costs_now().service_s == pytest.approx(1.2)
    assert Affinity(learn_service=False).costs_now().service_s == gpufleet.routing.policy.Costs().service_s
