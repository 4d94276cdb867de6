"""Load on every answer: the header's format, and what the router does with it."""

from __future__ import annotations

import pytest

from gpufleet.api.load_report import DeviceLoad, LoadReport, format_load, parse_load
from gpufleet.api.pod_status import DeviceStatus, PodStatus
from gpufleet.router.state import FleetState

pytestmark = pytest.mark.unit


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_round_trip() -> None:
    devices = {"cuda:0": DeviceLoad(3, 1, 0.25), "cuda:1": DeviceLoad(0, 0, 0.0)}
    value = format_load(devices, 7)
    assert value.startswith("TEXT named_metrics.running.cuda:0=3")
    assert parse_load(value) == LoadReport(devices, 7)


@pytest.mark.parametrize("value", ["", "JSON {}", "TEXT named_metrics.running.cuda:0=lots"])
def test_not_a_report(value: str) -> None:
    assert parse_load(value) is None


def test_foreign_metrics_are_ignored() -> None:
    r = parse_load("TEXT cpu_utilization=0.3, named_metrics.running.cpu:0=2, named_metrics.status_version=1")
    assert r == LoadReport({"cpu:0": DeviceLoad(2, 0, 0.0)}, 1)


def status(version: int, group: str = "alpha") -> PodStatus:
    return PodStatus(
        pod="pod-a", ready=True, devices=[DeviceStatus(device="cpu:0", current_group=group)], timestamp=1.0,
        status_version=version,
    )


def test_answers_replace_polls_and_announce_status_changes() -> None:
    clock = Clock()
    state = FleetState(clock=clock, stale_after_s=300)
    state.upsert("u", "http://pod-a")
    assert [r.id for r in state.due_status(90)] == ["u"]  # a new pod: its status is fetched now
    state.observe_status("u", status(3))
    assert state.due_status(90) == [] and state.due_queue(90) != []  # its load: not reported yet
    # Another router's traffic, reported in an answer to ours: load beyond what we sent.
    ticket = state.begin("pod-a", "cpu:0", "alpha")
    state.observe_load("pod-a", LoadReport({"cpu:0": DeviceLoad(running=4, waiting=2)}, 3))
    assert state.snapshot().devices[0].load == 1 + 5
    # What waits there comes from the answer too: a busy pod is never polled for its queue, and
    # the queue scorer (gie) reads this.
    assert state.snapshot().devices[0].waiting == 2
    assert state.due_queue(90) == [] and state.due_status(90) == []
    state.finish(ticket)
    # An answer announcing a newer status version makes the document due at once.
    state.observe_load("pod-a", LoadReport({"cpu:0": DeviceLoad()}, 4))
    assert [r.id for r in state.due_status(90)] == ["u"]
    state.observe_status("u", status(4, "beta"))
    assert state.due_status(90) == []
    # Idle for the whole IDLE_POLL_S: polled again (the only background traffic).
    clock.t += 90
    assert [r.id for r in state.due_status(90)] == ["u"] and [r.id for r in state.due_queue(90)] == ["u"]
