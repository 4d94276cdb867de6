"""The pool placement (gpufleet.operator.placement.place): pure, table-driven."""

from __future__ import annotations

from typing import Any

import pytest

from gpufleet.api.placement import DevicePlacement, PodPlacement, PoolPlacement
from gpufleet.operator.placement import GroupDemand, place

pytestmark = pytest.mark.unit

TWO_PODS = [("p-0", 1), ("p-1", 1)]  # two devices, one per pod
ONE_POD_TWO = [("p-0", 2)]  # two devices on one pod


def layout(placement: PoolPlacement) -> dict[str, tuple[str | None, tuple[str, ...]]]:
    """'pod/device' -> (current, cached) of every placed device."""
    return {
        f"{pod}/{index}": (d.current, d.cached)
        for pod, p in placement.pods.items()
        for index, d in p.devices.items()
    }


def currents(placement: PoolPlacement) -> dict[str, str | None]:
    return {k: c for k, (c, _) in layout(placement).items() if c is not None}


def held(spec: dict[str, tuple[str | None, tuple[str, ...]]]) -> PoolPlacement:
    """A PoolPlacement from 'pod/device' -> (current, cached): what devices hold, or held before."""
    pods: dict[str, dict[str, DevicePlacement]] = {}
    for key, (current, cached) in spec.items():
        pod, index = key.split("/")
        pods.setdefault(pod, {})[index] = DevicePlacement(current=current, cached=cached)
    return PoolPlacement(pods={p: PodPlacement(devices=d) for p, d in pods.items()})


def demands(*items: tuple[str, int] | tuple[str, int, int]) -> list[GroupDemand]:
    return [GroupDemand(*item) for item in items]


NOTHING = PoolPlacement()


@pytest.mark.parametrize(
    ("pods", "groups", "expected"),
    [
        # Three groups on two devices: two current (spread over the pods), the third cached.
        (TWO_PODS, demands(("a", 1), ("b", 1), ("c", 1)),
         {"p-0/0": ("a", ("c",)), "p-1/0": ("b", ())}),
        # A group's units go to different pods first.
        ([("p-0", 2), ("p-1", 2)], demands(("a", 2)), {"p-0/0": ("a", ()), "p-1/0": ("a", ())}),
        # Priority when scarce: the high-priority group is current, whatever its name.
        (TWO_PODS, demands(("a", 1), ("b", 1), ("z", 1, 5)),
         {"p-0/0": ("z", ("b",)), "p-1/0": ("a", ())}),
        # More units than devices: the rest cached, on devices not already holding the group.
        (TWO_PODS, demands(("a", 2), ("b", 2)),
         {"p-0/0": ("a", ("b",)), "p-1/0": ("a", ("b",))}),
        # minResident 0: not placed at all.
        (TWO_PODS, demands(("a", 0), ("b", 1)), {"p-0/0": ("b", ())}),
        # minResident beyond the pool: at most one unit per device.
        (ONE_POD_TWO, demands(("a", 5)), {"p-0/0": ("a", ()), "p-0/1": ("a", ())}),
        # No devices (replicas 0): nothing.
        ([], demands(("a", 1)), {}),
    ],
)
def test_initial_placement(
    pods: list[tuple[str, int]], groups: list[GroupDemand], expected: dict[str, Any]
) -> None:
    assert layout(place(pods, groups, NOTHING, 1)) == expected


def test_ties_are_broken_by_name_and_the_result_is_deterministic() -> None:
    groups = demands(("b", 1), ("a", 1), ("c", 1))
    first = place(TWO_PODS, groups, NOTHING, 1)
    assert currents(first) == {"p-0/0": "a", "p-1/0": "b"}
    assert place(TWO_PODS, list(reversed(groups)), NOTHING, 1) == first
    assert first.generation == 1


@pytest.mark.parametrize("newcomer", [("d", 1), ("0-first-by-name", 1), ("d", 3)])
def test_adding_a_group_moves_no_current_assignment(newcomer: tuple[str, int]) -> None:
    before = place(TWO_PODS, demands(("a", 1), ("b", 1), ("c", 1)), NOTHING, 1)
    after = place(TWO_PODS, demands(("a", 1), ("b", 1), ("c", 1), newcomer), NOTHING, 2, before)
    assert currents(after) == currents(before)
    resident = [g for current, cached in layout(after).values() for g in (current, *cached)]
    assert {"a", "b", "c", newcomer[0]} <= set(resident)  # the newcomer and c: cached


def test_a_higher_priority_newcomer_takes_the_lowest_ranked_device() -> None:
    before = place(TWO_PODS, demands(("a", 1), ("b", 1)), NOTHING, 1)
    after = place(TWO_PODS, demands(("a", 1), ("b", 1), ("vip", 1, 10)), NOTHING, 2, before)
    assert currents(after) == {"p-0/0": "a", "p-1/0": "vip"}  # b ranks last (same priority as a, later name)
    assert "b" in layout(after)["p-0/0"][1] + layout(after)["p-1/0"][1]  # still resident: cached


def test_a_removed_groups_device_is_freed_for_the_others() -> None:
    before = place(TWO_PODS, demands(("a", 1), ("b", 1), ("c", 1)), NOTHING, 1)
    assert currents(before) == {"p-0/0": "a", "p-1/0": "b"}
    after = place(TWO_PODS, demands(("b", 1), ("c", 1)), NOTHING, 2, before)
    assert currents(after) == {"p-0/0": "c", "p-1/0": "b"}  # c takes a's device; b stays
    assert "a" not in str(layout(after))


def test_a_device_keeps_what_it_holds_when_nothing_was_placed_before() -> None:
    observed = held({"p-0/0": ("x", ()), "p-1/0": ("b", ("a",))})
    placement = place(TWO_PODS, demands(("a", 1), ("b", 1)), observed, 1)
    assert currents(placement) == {"p-0/0": "a", "p-1/0": "b"}  # b stays where it is; a takes the free one


def test_the_previous_placement_wins_over_what_demand_switched_since() -> None:
    previous = held({"p-0/0": ("a", ()), "p-1/0": ("b", ())})
    observed = held({"p-0/0": ("b", ()), "p-1/0": ("b", ())})  # demand took both devices to b for now
    placement = place(TWO_PODS, demands(("a", 1), ("b", 1)), observed, 3, previous)
    assert currents(placement) == {"p-0/0": "a", "p-1/0": "b"}  # the document does not churn


def test_cached_units_stay_where_they_were() -> None:
    previous = held({"p-0/0": ("a", ()), "p-1/0": ("b", ("c",))})
    placement = place(TWO_PODS, demands(("a", 1), ("b", 1), ("c", 1)), NOTHING, 2, previous)
    assert layout(placement) == {"p-0/0": ("a", ()), "p-1/0": ("b", ("c",))}


def test_scaling_down_replaces_the_units_of_the_pods_gone() -> None:
    before = place([("p-0", 1), ("p-1", 1), ("p-2", 1)], demands(("a", 1), ("b", 1), ("c", 1)), NOTHING, 1)
    assert currents(before) == {"p-0/0": "a", "p-1/0": "b", "p-2/0": "c"}
    after = place(TWO_PODS, demands(("a", 1), ("b", 1), ("c", 1)), NOTHING, 2, before)
    assert currents(after) == {"p-0/0": "a", "p-1/0": "b"} and "c" in str(layout(after))


def test_the_document_round_trips_through_json() -> None:
    placement = place(ONE_POD_TWO, demands(("a", 1), ("b", 1), ("c", 1)), NOTHING, 7)
    again = PoolPlacement.model_validate_json(placement.model_dump_json())
    assert again == placement and again.for_device("p-0", 0).current == "a"
    assert again.for_device("p-9", 0) == DevicePlacement()
