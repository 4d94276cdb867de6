"""The autoscaling benchmark: the simulator's fleet changes on hand-checked scenarios, the day's
trace, the flap count, and a short day end to end."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from bench.autoscale import Costs, Day, direction_changes, diurnal_trace, rates, run_line, shares, wake_at
from bench.policies import make_policy
from bench.sim import SimConfig, Simulator, StepModel, SwitchCosts
from bench.tests.test_sim import COSTS, NO_LINGER, STEPS, trace  # the simulator tests' small world

pytestmark = pytest.mark.unit

def cfg(n: int = 0) -> SimConfig:
    return SimConfig(n_devices=n, costs=COSTS, steps=STEPS, queue_policy=NO_LINGER, initial_group=None, prefetch=False)


def test_a_request_with_no_device_waits_for_one_and_its_wait_counts() -> None:
    def control(sim: Simulator, now: float) -> None:
        if now == 0.0:
            sim.add_device(3.0)  # a pod that takes 3 s to start

    sim = Simulator(cfg(), make_policy("affinity"))
    r = sim.run(trace((0.5, "g00", 10)), control=control, control_interval_s=1.0)
    # Held until 3.0, then a disk switch (1 s) and 10 tokens alone (1 s).
    assert r.latencies == pytest.approx([3.0 - 0.5 + 1.0 + 1.0])
    assert r.held == 1 and r.rejected == 0
    assert sim.devices[0].started_at == 0.0 and sim.devices[0].stopped_at is None


def test_a_removed_device_drains_then_stops_and_takes_nothing_new() -> None:
    def control(sim: Simulator, now: float) -> None:
        if now == 1.0:
            sim.remove_device(0)

    sim = Simulator(cfg(2), make_policy("affinity"))
    r = sim.run(trace((0.0, "g00", 20), (1.5, "g00", 10)), control=control, control_interval_s=1.0)
    first, second = sim.devices
    # The first request ran on dev0 (1 s switch + 2 s); removed at 1.0, dev0 finishes it and stops at 3.0.
    assert r.device_of == [0, 1]
    assert first.stopped_at == pytest.approx(3.0)
    assert second.stopped_at is None
    assert r.latencies[0] == pytest.approx(3.0)


def test_a_placement_makes_an_idle_device_current_so_the_next_request_needs_no_switch() -> None:
    def control(sim: Simulator, now: float) -> None:
        sim.prefer(0, "g01")

    sim = Simulator(cfg(1), make_policy("affinity"))
    r = sim.run(trace((5.0, "g01", 10)), control=control, control_interval_s=1.0)
    assert sim.devices[0].current == "g01"
    assert r.total_switches == 1  # the placement's, at 0 (from disk); the request found g01 current
    assert r.switched == [""]
    assert r.latencies == pytest.approx([1.0])


def test_a_dedicated_replica_serves_only_its_model_and_starts_with_it_loaded() -> None:
    def control(sim: Simulator, now: float) -> None:
        if now == 0.0:
            sim.add_device(0.0, serves=frozenset({"g00"}), group="g00")
            sim.add_device(2.0, serves=frozenset({"g01"}), group="g01")

    sim = Simulator(cfg(), make_policy("affinity"))
    r = sim.run(trace((0.5, "g00", 10), (0.5, "g01", 10)), control=control, control_interval_s=1.0)
    assert r.device_of == [0, 1]
    assert r.total_switches == 0
    assert r.latencies == pytest.approx([1.0, 2.0 - 0.5 + 1.0])
    assert r.held == 1


def test_direction_changes_count_reversals_in_a_window_and_can_leave_out_forced_falls() -> None:
    times = [0.0, 10.0, 20.0, 30.0, 400.0, 410.0]
    assert direction_changes([0, 1, 2, 1, 1, 2], times) == 1  # down at 30, up again at 410: another window
    assert direction_changes([0, 1, 0, 1, 1, 1], times) == 2
    assert direction_changes([0, 1, 2, 3, 4, 5], times) == 0
    # 2 -> 1 when the pool shrank to 1 device is forced: left out, the rise after it is no reversal.
    assert direction_changes([1, 2, 1, 2, 2, 2], times, pool=[4, 4, 1, 4, 4, 4]) == 0
    assert direction_changes([1, 2, 1, 2, 2, 2], times) == 2


def test_the_day_rises_ten_fold_turns_one_group_hot_halfway_then_sleeps_and_wakes() -> None:
    steps = StepModel()
    day = Day(duration_s=1200.0, seed=3)
    reqs = diurnal_trace(day, steps)
    times = np.array([r.t for r in reqs])
    trough, _, peak = rates(day, steps)
    assert peak / trough == pytest.approx(10.0)
    edge = ((times < 120) | ((times > 1080) & (times < 1200))).sum() / 240
    middle = ((times > 540) & (times < 660)).sum() / 120
    assert 6.0 < middle / edge < 12.0  # the ends are near the trough, the middle near the peak
    assert not ((times >= day.duration_s) & (times < wake_at(day))).any()  # the night is silent
    assert (times >= wake_at(day)).sum() > 0
    hot = [r for r in reqs if r.t < day.duration_s]
    before = np.mean([r.group == day.hot_group for r in hot if r.t < 600])
    after = np.mean([r.group == day.hot_group for r in hot if r.t >= 600])
    assert before == pytest.approx(shares(day, False)[4], abs=0.02)
    assert after == pytest.approx(day.hot_share, abs=0.03)


def test_a_short_day_loses_nothing_and_scales_from_zero_in_the_morning() -> None:
    steps = StepModel()
    costs = Costs(steps, SwitchCosts())
    # A night longer than the 300 s flap window: a group held against flapping keeps its device until then.
    day = replace(Day(), duration_s=240.0, peak_devices=3, night_s=330.0, morning_s=60.0, startup_s=20.0)
    reqs = diurnal_trace(day, steps)
    sizes = {"peak": 3, "mean": 2, "trough": 1}
    for line in ("ours", "kubeai"):
        row, series, _ = run_line(line, day, costs, reqs, sizes)
        assert row["lost"] == 0 and row["refused_429"] == 0
        assert row["wake"]["pods_at_first_request"] == 0  # the night took the pool to zero
        assert row["wake"]["held_for_a_device"] > 0
        assert max(series["replicas"]) <= (sizes["peak"] if line == "ours" else sizes["peak"] * day.n_groups)
    assert row["day"]["gpu_seconds"] <= 3 * day.duration_s * day.n_groups
