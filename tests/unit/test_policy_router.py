"""Table tests of the pure routing functions as the router uses them: many pods, many devices."""

from __future__ import annotations

import dataclasses

import pytest

from gpufleet.routing.alternatives import POLICIES, least_load, lru_multiplex, round_robin
from gpufleet.routing.policy import Costs, DeviceState, Outcome, RouteRequest, Snapshot, choose_device

pytestmark = pytest.mark.unit

NOW = 1000.0
LONG_AGO = NOW - 3600


def dev(pod: str, device: str = "cuda:0", node: str | None = None, **kw: object) -> DeviceState:
    kw.setdefault("last_switch_at", LONG_AGO)
    return DeviceState(pod=pod, device=device, node=node, **kw)  # type: ignore[arg-type]


def route(devices: list[DeviceState], group: str = "alpha", exclusive: str | None = None, **snap: object):
    return choose_device(RouteRequest(group, exclusive), Snapshot(tuple(devices), now=NOW, **snap))  # type: ignore[arg-type]


FLEET = [
    dev("pod-a", "cuda:0", "node-1", current_group="alpha"),
    dev("pod-a", "cuda:1", "node-1", current_group="beta"),
    dev("pod-b", "cuda:0", "node-2", current_group="gamma", cached_groups=frozenset({"alpha"})),
    dev("pod-c", "cuda:2", "node-2", current_group=None),
]


@pytest.mark.parametrize(
    ("target", "outcome", "chosen"),
    [
        ("pod-a/cuda:1", Outcome.ROUTED, "pod-a/cuda:1"),  # pod and device
        ("node-2/cuda:2", Outcome.ROUTED, "pod-c/cuda:2"),  # node and device
        ("pod-b", Outcome.ROUTED, "pod-b/cuda:0"),  # a whole pod
        ("node-1", Outcome.ROUTED, "pod-a/cuda:0"),  # a whole node: affinity inside it
        ("cuda:2", Outcome.ROUTED, "pod-c/cuda:2"),  # a bare device only one pod has
        ("cuda:0", Outcome.AMBIGUOUS_TARGET, None),  # a bare device several pods have
        ("pod-z", Outcome.UNKNOWN_TARGET, None),
        ("pod-a/cuda:7", Outcome.UNKNOWN_TARGET, None),
        ("node-9/cuda:0", Outcome.UNKNOWN_TARGET, None),
    ],
)
def test_exclusive_targets(target: str, outcome: Outcome, chosen: str | None) -> None:
    d = route(FLEET, "alpha", target)
    assert d.outcome is outcome, d.reason
    assert (d.choice.key if d.choice else None) == chosen
    if d.routed:
        assert d.reason.startswith("exclusive:")


def test_bare_device_is_fine_with_one_pod() -> None:
    one_pod = [dev("local", "cuda:0"), dev("local", "cuda:1", current_group="alpha")]
    assert route(one_pod, exclusive="cuda:0").choice.key == "local/cuda:0"  # type: ignore[union-attr]


def test_exclusive_never_falls_back() -> None:
    fleet = [dev("pod-a", current_group="alpha", healthy=False), dev("pod-b", current_group="alpha")]
    assert route(fleet, exclusive="pod-a").outcome is Outcome.TARGET_DOWN
    full = [dev("pod-a", current_group="alpha", load=65), dev("pod-b", current_group="alpha")]
    assert route(full, exclusive="pod-a").outcome is Outcome.SATURATED


@pytest.mark.parametrize(
    ("devices", "expected", "reason"),
    [
        # current beats cached beats a switch from disk, all idle
        ([dev("a", current_group="beta"), dev("b", current_group="x", cached_groups=frozenset({"alpha"})),
          dev("c", current_group="alpha")], "c/cuda:0", "any:affinity_current"),
        ([dev("a", current_group="beta"), dev("b", current_group="x", cached_groups=frozenset({"alpha"}))],
         "b/cuda:0", "any:affinity_cached"),
        # a group loaded nowhere goes where the switch costs least: an empty device
        ([dev("a", current_group="beta"), dev("b", current_group=None, switch_s_from_disk=1.0)],
         "b/cuda:0", "any:switch"),
        # a measured switch time counts: the faster disk wins
        ([dev("a", switch_s_from_disk=9.0), dev("b", switch_s_from_disk=2.0)], "b/cuda:0", "any:switch"),
        # the shorter expected wait wins; at equal cost, the fewer requests
        ([dev("a", current_group="alpha", load=2), dev("b", current_group="alpha", load=1)],
         "b/cuda:0", "any:affinity_current"),
    ],
)
def test_affinity_order(devices: list[DeviceState], expected: str, reason: str) -> None:
    d = route(devices)
    assert d.choice is not None and d.choice.key == expected
    assert d.reason == reason
    assert d.candidates[0].key == expected


def test_equal_cost_goes_to_the_less_loaded_device() -> None:
    # Without batch slowdown, both wait a quarter of a service for a slot.
    devices = [dev("a", current_group="alpha", load=2, workers=4), dev("b", current_group="alpha", load=1, workers=4)]
    d = route(devices, costs=Costs(batch_slowdown=0.0))
    assert d.choice is not None and d.choice.key == "b/cuda:0"
    assert d.reason == "any:affinity_current,least_load"


@pytest.mark.parametrize(
    ("load", "winner"),
    [
        (7, "hot/cuda:0"),  # room in the batch of 8: 0.5 s in a full batch < 0.75 s switch from cache + service
        (8, "hot/cuda:0"),  # one batch ahead: a slot soon
        (16, "idle/cuda:0"),  # two batches ahead: switching is faster
    ],
)
def test_batch_and_queue_against_switch_cost(load: int, winner: str) -> None:
    hot = dev("hot", current_group="alpha", load=load, workers=8)
    idle = dev("idle", current_group=None, cached_groups=frozenset({"alpha"}))
    d = route([hot, idle])
    assert d.choice is not None and d.choice.key == winner


def test_long_queue_loses_to_a_disk_load() -> None:
    hot = dev("hot", current_group="alpha", load=20)  # 20 full batches of one ahead: 10 s
    empty = dev("empty", current_group=None)  # 3 s from disk
    assert route([hot, empty]).choice.key == "empty/cuda:0"  # type: ignore[union-attr]
    assert route([dataclasses.replace(hot, load=4), empty]).choice.key == "hot/cuda:0"  # type: ignore[union-attr]


def test_hysteresis_keeps_a_group_that_just_arrived() -> None:
    # beta just arrived on "recent": moving alpha there would throw it out again.
    recent = dev("recent", current_group="beta", cached_groups=frozenset({"alpha"}), last_switch_at=NOW - 2)
    busy = dev("busy", current_group="alpha", load=3)  # 2 s: less than a cache switch + the 2 s penalty
    assert route([recent, busy]).choice.key == "busy/cuda:0"  # type: ignore[union-attr]
    # Once the residency window has passed, the cheaper switch is allowed.
    settled = dataclasses.replace(recent, last_switch_at=NOW - 60)
    assert route([settled, busy]).choice.key == "recent/cuda:0"  # type: ignore[union-attr]


def test_hysteresis_against_a_busy_group_and_a_switch_in_flight() -> None:
    # A device serving beta (load > 0) is not taken from it for a small gain.
    serving = dev("serving", current_group="beta", load=1, cached_groups=frozenset({"alpha"}))
    queue = dev("queue", current_group="alpha", load=2)  # 1.5 s: less than draining beta and displacing it
    assert route([serving, queue]).choice.key == "queue/cuda:0"  # type: ignore[union-attr]
    # A switch already heading to alpha counts as alpha being there.
    switching = dev("switching", current_group="beta", switching_to="alpha", load=1)
    assert route([switching, queue]).choice.key == "switching/cuda:0"  # type: ignore[union-attr]


def test_stale_state_is_unknown_not_trusted() -> None:
    stale = dev("stale", current_group="alpha", fresh=False)
    fresh = dev("fresh", current_group="alpha", load=8)  # 4.5 s < 3 s from disk + 2 s unknown penalty
    d = route([stale, fresh])
    assert d.choice is not None and d.choice.key == "fresh/cuda:0"
    assert {c.key: c.note for c in d.candidates}["stale/cuda:0"] == "stale"
    # But a stale device still serves when it is the only one.
    assert route([stale]).routed


def test_saturated_unhealthy_failed_and_empty() -> None:
    assert route([dev("a", load=65), dev("b", load=70)]).outcome is Outcome.SATURATED
    assert route([dev("a", healthy=False)]).outcome is Outcome.TARGET_DOWN
    assert route([dev("a", failed_groups=frozenset({"alpha"}))]).outcome is Outcome.GROUP_FAILED
    assert route([]).outcome is Outcome.NO_DEVICES
    # A device with room wins over a full one even when the full one holds the group.
    d = route([dev("full", current_group="alpha", load=65), dev("room", current_group="beta")])
    assert d.choice is not None and d.choice.key == "room/cuda:0"


def test_a_group_already_waiting_on_a_device_joins_it_without_displacing_another() -> None:
    # beta runs on both; alpha already waits on "joined": another alpha request joins it there
    # rather than make a second device leave beta.
    joined = dev(
        "joined", current_group="beta", load=2, workers=8, waiting_groups=frozenset({"alpha"}),
        cached_groups=frozenset({"alpha"}),
    )
    other = dev("other", current_group="beta", load=1, workers=8, cached_groups=frozenset({"alpha"}))
    d = route([joined, other])
    assert d.choice is not None and d.choice.key == "joined/cuda:0"
    assert d.reason == "any:affinity_waiting"


def test_groups_queued_ahead_delay_a_switch() -> None:
    crowded = dev("crowded", current_group="beta", waiting_groups=frozenset({"gamma", "delta"}))
    calm = dev("calm", current_group="beta")
    assert route([crowded, calm]).choice.key == "calm/cuda:0"  # type: ignore[union-attr]


def test_costs_are_configurable() -> None:
    hot = dev("hot", current_group="alpha", load=3)
    idle = dev("idle", current_group=None, cached_groups=frozenset({"alpha"}))
    assert route([hot, idle], costs=Costs(service_s=0.05)).choice.key == "hot/cuda:0"  # type: ignore[union-attr]


# --- alternative policies ---------------------------------------------------------------------


def test_round_robin_cycles_over_open_devices() -> None:
    devices = (dev("a"), dev("b"), dev("c", load=65))
    picks = [round_robin(RouteRequest("alpha", sequence=i), Snapshot(devices, NOW)).choice.key for i in range(4)]  # type: ignore[union-attr]
    assert picks == ["a/cuda:0", "b/cuda:0", "a/cuda:0", "b/cuda:0"]


def test_least_load_ignores_residency() -> None:
    devices = (dev("a", current_group="alpha", load=3), dev("b", current_group="beta", load=1))
    assert least_load(RouteRequest("alpha"), Snapshot(devices, NOW)).choice.key == "b/cuda:0"  # type: ignore[union-attr]


def test_lru_multiplex_prefers_holders_then_evicts_least_recently_used() -> None:
    devices = (
        dev("a", current_group="beta", last_used_at=NOW - 1),
        dev("b", current_group="gamma", last_used_at=NOW - 50),
        dev("c", current_group="alpha", last_used_at=NOW - 5, load=2),
    )
    snap = Snapshot(devices, NOW)
    assert lru_multiplex(RouteRequest("alpha"), snap).choice.key == "c/cuda:0"  # type: ignore[union-attr]
    d = lru_multiplex(RouteRequest("delta"), snap)
    assert d.choice is not None and d.choice.key == "b/cuda:0" and d.reason == "any:evict_lru"


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_every_policy_honours_targets_health_and_saturation(name: str) -> None:
    policy = POLICIES[name]
    assert policy(RouteRequest("alpha", "pod-z"), Snapshot(tuple(FLEET), NOW)).outcome is Outcome.UNKNOWN_TARGET
    d = policy(RouteRequest("alpha", "pod-b"), Snapshot(tuple(FLEET), NOW))
    assert d.choice is not None and d.choice.pod == "pod-b"
    down = tuple(dataclasses.replace(d, healthy=False) for d in FLEET)
    assert policy(RouteRequest("alpha"), Snapshot(down, NOW)).outcome is Outcome.TARGET_DOWN
    full = tuple(dataclasses.replace(d, load=d.capacity) for d in FLEET)
    assert policy(RouteRequest("alpha"), Snapshot(full, NOW)).outcome is Outcome.SATURATED
