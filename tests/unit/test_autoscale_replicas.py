"""The pod-count rule (gpufleet.autoscale.replicas): tables, delays, scale from and to zero."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from gpufleet.api.autoscaling import AutoscalingSpec
from gpufleet.autoscale.replicas import ReplicaHistory, plan_replicas, recommend

pytestmark = pytest.mark.unit

SPEC = AutoscalingSpec(min_replicas=0, max_replicas=6, target_sequences_per_device=8, scale_down_delay_seconds=60)


@pytest.mark.parametrize(
    ("sequences", "floor", "gpus_per_pod", "spec", "pods"),
    [
        (0, 0, 1, SPEC, 0),
        (1, 0, 1, SPEC, 1),
        (8, 0, 1, SPEC, 1),
        (9, 0, 1, SPEC, 2),
        (9, 0, 2, SPEC, 1),  # two devices in one pod
        (1000, 0, 1, SPEC, 6),  # maxReplicas
        (0, 3, 1, SPEC, 3),  # minResident floors need their devices
        (0, 0, 1, AutoscalingSpec(min_replicas=2, max_replicas=4), 2),
    ],
)
def test_recommendation(sequences: float, floor: int, gpus_per_pod: int, spec: AutoscalingSpec, pods: int) -> None:
    assert recommend(sequences, floor, gpus_per_pod, spec) == pods


def run(
    series: Sequence[tuple[float, float, int]], spec: AutoscalingSpec = SPEC, start: int = 0
) -> list[tuple[int, str]]:
    """(time, sequences, waiting) rounds -> (pods, reason) after each."""
    history, pods, out = ReplicaHistory(), start, []
    for now, sequences, waiting in series:
        d = plan_replicas(pods, sequences, waiting, 0, 1, spec, history, now)
        history, pods = d.history, d.after
        out.append((pods, d.reason))
    return out


def test_up_at_once_down_only_after_the_delay_and_to_zero_when_idle() -> None:
    rounds = [(0, 20, 0), (10, 20, 0), (20, 4, 0), (40, 4, 0), (70, 4, 0), (90, 4, 0), (100, 0, 0), (160, 0, 0)]
    pods = [p for p, _ in run(rounds, start=1)]
    # 20 -> 3 at once; 4 asks for 1 from t=20, but the 60 s window holds 3 until t=90 (first look t=0).
    assert pods == [3, 3, 3, 3, 3, 1, 1, 0]


def test_a_restarted_operator_does_not_scale_down_on_its_first_look() -> None:
    out = run([(0, 0, 0), (30, 0, 0)], start=4)
    assert [p for p, _ in out] == [4, 4]
    assert "watching" in out[0][1]


def test_scale_up_delay_holds_a_brief_burst() -> None:
    spec = SPEC.model_copy(update={"scale_up_delay_seconds": 30})
    pods = [p for p, _ in run([(0, 8, 0), (10, 40, 0), (20, 8, 0), (30, 40, 0), (45, 40, 0), (61, 40, 0)], spec, 1)]
    assert pods == [1, 1, 1, 1, 1, 5]  # up only once 30 s of recommendations all asked for 5


def test_from_zero_at_once_when_a_request_waits_even_with_an_up_delay() -> None:
    spec = SPEC.model_copy(update={"scale_up_delay_seconds": 120})
    out = run([(0, 1, 1)], spec, start=0)
    assert out == [(1, "from zero: a request waits")]


def test_bounds_apply_at_once() -> None:
    spec = AutoscalingSpec(min_replicas=2, max_replicas=3)
    assert run([(0, 0, 0)], spec, start=0)[0] == (2, "bounds")
    assert run([(0, 100, 0)], spec, start=5)[0][0] == 3


def test_min_above_max_is_refused() -> None:
    with pytest.raises(ValueError, match="minReplicas"):
        AutoscalingSpec(min_replicas=3, max_replicas=2)
