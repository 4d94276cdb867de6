"""The benchmark's batched-device simulator, on scenarios small enough to check by hand."""

from __future__ import annotations

import pytest

import bench.policies
import gpufleet.routing.alternatives
from bench.policies import device_state, make_policy
from bench.sim import SimConfig, SimDevice, StepModel, SwitchCosts, simulate
from bench.trace import Request
from gpufleet.pod_server.queue_order import QueuePolicy

pytestmark = pytest.mark.unit

# From disk 1 s, from the CPU cache 0.5 s, whatever the size.
COSTS = SwitchCosts(disk_fixed_s=1.0, disk_s_per_gb=0.0, cache_fixed_s=0.5, cache_s_per_gb=0.0)
# 10 tokens/s alone, 15 tokens/s for two at once (each at 7.5/s), flat beyond; no prefill.
STEPS = StepModel(points=((1, 10.0), (2, 15.0)), prefill_tokens=0.0)
NO_LINGER = QueuePolicy(max_wait_s=5.0, min_residency_s=2.0, linger_s=0.0)


def trace(*items: tuple[float, str, int]) -> list[Request]:
    return [Request(i, t, g, 0.0, tokens) for i, (t, g, tokens) in enumerate(items)]


class Fixed:
    """Every request to one device."""

    name = "fixed"

    def __init__(self, index: int = 0) -> None:
        self.index = index

    def choose(self, req: Request, devices: object, now: float) -> int:
        return self.index


def one_device(
    cache_limit: int = 4, policy: QueuePolicy = NO_LINGER, prefetch: bool = False, **kw: object
) -> SimConfig:
    """One device; without prefetching unless asked, so the hand-checked timings stay simple."""
    return SimConfig(
        prefetch=prefetch,
        n_devices=1,
        cache_limit_models=cache_limit,
        costs=COSTS,
        steps=STEPS,
        queue_policy=policy,
        initial_group="g00",
        **kw,  # type: ignore[arg-type]
    )


def test_step_model_interpolates_and_saturates() -> None:
    steps = StepModel(points=((1, 100.0), (8, 400.0), (32, 800.0)))
    assert steps.step_s(1) == pytest.approx(0.01)
    assert steps.tokens_per_s(20) == pytest.approx(600.0)
    assert steps.tokens_per_s(64) == pytest.approx(800.0)  # saturated: more sequences, longer steps
    assert steps.step_s(64) == pytest.approx(64 / 800)


def test_a_batch_shares_the_device() -> None:
    r = simulate(trace((0.0, "g00", 10), (0.0, "g00", 10)), one_device(), Fixed())
    # Together at 7.5 tokens/s each: both finish at 10 / 7.5.
    assert r.latencies == pytest.approx([10 / 7.5, 10 / 7.5])
    assert r.total_switches == 0


def test_the_batch_speeds_up_when_a_sequence_leaves() -> None:
    r = simulate(trace((0.0, "g00", 5), (0.0, "g00", 10)), one_device(), Fixed())
    # Both at 7.5/s until the short one ends at 2/3 s; the long one has 5 tokens left, alone at 10/s.
    assert r.latencies == pytest.approx([5 / 7.5, 5 / 7.5 + 0.5])


def test_a_switch_waits_for_the_batch_to_drain() -> None:
    r = simulate(trace((0.0, "g00", 10), (0.1, "g01", 10), (0.2, "g00", 10)), one_device(), Fixed())
    # g00's second request joins the batch at 0.2 (its group is current; g01 has waited < max_wait):
    # the first has 8 tokens left, both at 7.5/s until 0.2 + 8/7.5; the second then finishes its last
    # 2 tokens alone. Only then does the device switch to g01 (disk, 1 s) and run it (1 s).
    first_done = 0.2 + 8 / 7.5
    second_done = first_done + 2 / 10
    assert r.latencies == pytest.approx([first_done, second_done + 1.0 + 1.0 - 0.1, second_done - 0.2])
    assert r.switched == ["", "disk", ""]


def test_the_current_group_is_served_before_a_switch_bounded_by_max_wait() -> None:
    policy = QueuePolicy(max_wait_s=1.0, min_residency_s=0.0, linger_s=0.0)
    reqs = trace((0.0, "g00", 100), (0.1, "g01", 1))
    r = simulate(reqs, one_device(policy=policy), Fixed())
    # g01 waits for g00's long request: the device only switches once the batch has drained.
    assert r.latencies[0] == pytest.approx(10.0)
    assert r.latencies[1] == pytest.approx(10.0 - 0.1 + 1.0 + 0.1)


def test_lingering_keeps_the_group_for_its_next_request() -> None:
    reqs = trace((0.0, "g00", 1), (0.15, "g01", 1), (0.3, "g00", 1))
    eager = simulate(reqs, one_device(), Fixed())
    lingering = simulate(reqs, one_device(policy=QueuePolicy(linger_s=1.0)), Fixed())
    assert eager.total_switches == 2  # g00 -> g01 -> g00
    assert lingering.total_switches == 1  # g00's second request came within the linger: one switch
    assert lingering.latencies[2] < eager.latencies[2]


def test_cache_is_lru_and_limited_in_models() -> None:
    cfg = one_device(cache_limit=3)
    reqs = trace((0, "g01", 1), (10, "g02", 1), (20, "g03", 1), (30, "g01", 1), (40, "g00", 1))
    r = simulate(reqs, cfg, Fixed())
    # The pod's rule: the current group's host copy counts. After g03: g01, g02 and g03 (g00,
    # least recently used, evicted). g01 comes from the cache, g00 from disk.
    assert r.switched == ["disk", "disk", "disk", "cache", "disk"]


def test_a_cache_of_one_model_holds_only_the_current_group() -> None:
    # MAX_CPU_CACHED_MODELS=1 on a one-device pod: every switch loads from disk, as on the pod.
    reqs = trace((0, "g01", 1), (10, "g00", 1), (20, "g01", 1))
    r = simulate(reqs, one_device(cache_limit=1), Fixed())
    assert r.switched == ["disk", "disk", "disk"]


def test_a_group_larger_than_the_cache_is_dropped() -> None:
    cfg = one_device(cache_limit=1, models_per_group=2)
    r = simulate(trace((0, "g01", 1), (10, "g00", 1)), cfg, Fixed())
    assert r.switched == ["disk", "disk"]


def test_load_counts_queued_and_running() -> None:
    seen: list[tuple[int, int, frozenset[str]]] = []

    class Probe(Fixed):
        def choose(self, req: Request, devices: object, now: float) -> int:
            d = devices[0]  # type: ignore[index]
            seen.append((d.load, d.queued, d.waiting_groups()))
            return 0

    simulate(trace((0.0, "g01", 10), (0.5, "g02", 10)), one_device(), Probe())
    assert seen == [(0, 0, frozenset()), (1, 1, frozenset({"g01"}))]  # at 0.5 g01 still waits for its switch


def test_refused_when_the_queue_is_full() -> None:
    cfg = one_device(queue_limit=1, max_sequences=1)
    r = simulate(trace((0, "g00", 50), (0.1, "g00", 10), (0.2, "g00", 10)), cfg, Fixed())
    assert r.rejected == 1
    assert r.latencies[2] == float("inf")
    assert r.summary(100.0)["slo_attainment"] == pytest.approx(2 / 3)


def test_give_up_stops_early_once_the_objective_is_lost() -> None:
    reqs = trace(*[(i * 0.01, f"g0{i % 2}", 10) for i in range(50)])
    r = simulate(reqs, one_device(), Fixed(), slo_s=0.5, give_up_misses=2)
    assert r.aborted


def test_every_policy_is_the_routers_own_function() -> None:
    for name, fn in bench.policies.POLICIES.items():
        assert fn is gpufleet.routing.alternatives.POLICIES[name]
    cfg = SimConfig(n_devices=3, costs=COSTS, steps=STEPS, initial_group=None)
    devices = [SimDevice(i, cfg) for i in range(3)]
    devices[2].current = "g05"
    req = Request(0, 0.0, "g05", 0.0, 1)
    assert make_policy("affinity").choose(req, devices, 0.0) == 2
    state = device_state(devices[2], 0.0)
    assert (state.current_group, state.load, state.key, state.workers) == ("g05", 0, "sim/dev2", 64)


def test_policies_learn_the_service_time_from_requests_alone_on_their_device() -> None:
    policy = make_policy("affinity")
    reqs = trace((0.0, "g00", 10), (0.5, "g00", 10), (10.0, "g00", 20))
    simulate(reqs, one_device(), policy)
    # 1st: started alone (joined at 0.5, so 0.5 + 5 / 7.5 s); 2nd: joined a busy device, ignored; 3rd: alone, 2 s.
    first = 0.5 + 5 / 7.5
    assert policy.service.seconds == pytest.approx(first + 0.2 * (2.0 - first))


def test_a_group_queued_behind_the_batch_is_prefetched_and_switched_in_from_the_cache() -> None:
    # As the pod's scheduler does: g01 waits behind g00's batch, so it is loaded into the CPU cache
    # meanwhile (1 s from disk, 0.1 -> 1.1); the batch drains at 1.0 + ... and the switch takes it
    # from the cache (0.5 s) instead of the disk (1 s).
    reqs = trace((0.0, "g00", 15), (0.1, "g01", 10))
    r = simulate(reqs, one_device(prefetch=True), Fixed())
    assert r.switched == ["", "cache"]
    assert r.latencies[1] == pytest.approx(1.5 + 0.5 + 1.0 - 0.1)
    without = simulate(reqs, one_device(prefetch=False), Fixed())
    assert without.switched == ["", "disk"]


def test_a_switch_for_a_group_still_prefetching_waits_for_that_load() -> None:
    # g01 queues at 0.1 behind a batch that drains at 0.5: its prefetch (0.1 -> 1.1) is still
    # loading, so the switch waits for it on the group's load lock and then takes the cached copy.
    reqs = trace((0.0, "g00", 5), (0.1, "g01", 10))
    r = simulate(reqs, one_device(prefetch=True), Fixed())
    assert r.switched == ["", "cache"]
    assert r.latencies[1] == pytest.approx(1.1 + 0.5 + 1.0 - 0.1)
    assert r.total_switches == 1


def test_no_prefetch_when_the_cache_has_no_room() -> None:
    # A cache of one model holds only the current group: nothing can be prefetched.
    r = simulate(trace((0.0, "g00", 15), (0.1, "g01", 10)), one_device(cache_limit=1, prefetch=True), Fixed())
    assert r.switched == ["", "disk"]
