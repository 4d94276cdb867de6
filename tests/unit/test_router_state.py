"""The router's fleet state: snapshots, load accounting, expectations, staleness, ejection.

Time is a hand-driven clock: nothing here sleeps.
"""

from __future__ import annotations

import pytest

from gpufleet.api.device_report import QueueDocument
from gpufleet.api.pod_status import DeviceStatus, PodStatus
from gpufleet.router.ejection import Outlier
from gpufleet.router.state import EjectionPolicy, FleetState

pytestmark = pytest.mark.unit


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t

    def advance(self, s: float) -> None:
        self.t += s


def status(pod: str, *devices: DeviceStatus, ready: bool = True, timestamp: float = 5000.0) -> PodStatus:
    return PodStatus(
        pod=pod,
        ready=ready,
        devices=list(devices) or [DeviceStatus(device="cpu:0", current_group="alpha")],
        groups=["alpha", "beta"],
        models={"tiny-chat": "alpha", "tiny-chat-b": "beta"},
        timestamp=timestamp,
    )


def fleet(clock: Clock, *pods: str, **kw: object) -> FleetState:
    state = FleetState(clock=clock, stale_after_s=10.0, **kw)  # type: ignore[arg-type]
    for p in pods:
        url = f"http://{p}:8000"
        state.upsert(url, url)
        state.observe_status(url, status(p))
    return state


def queue(doc: dict[str, object]) -> QueueDocument:
    return QueueDocument.model_validate(doc)


def devices(state: FleetState) -> dict[str, object]:
    return {d.key: d for d in state.snapshot().devices}


def test_snapshot_from_status_documents() -> None:
    clock = Clock()
    state = fleet(clock, "pod-a", "pod-b")
    snap = devices(state)
    assert set(snap) == {"pod-a/cpu:0", "pod-b/cpu:0"}
    d = snap["pod-a/cpu:0"]
    assert d.current_group == "alpha" and d.healthy and d.fresh and d.load == 0  # type: ignore[attr-defined]
    assert state.models == {"tiny-chat": "alpha", "tiny-chat-b": "beta"}
    assert state.ready


def test_not_ready_pod_is_known_but_unhealthy() -> None:
    clock = Clock()
    state = fleet(clock, "pod-a")
    state.observe_status("http://pod-a:8000", status("pod-a", ready=False))
    assert not devices(state)["pod-a/cpu:0"].healthy  # type: ignore[attr-defined]
    assert not state.ready
    assert state.pod_state(state.by_name["pod-a"]) == "not_ready"


def test_load_is_own_inflight_plus_what_others_sent() -> None:
    clock = Clock()
    state = fleet(clock, "pod-a")
    t1 = state.begin("pod-a", "cpu:0", "alpha")
    state.begin("pod-a", "cpu:0", "alpha")
    assert devices(state)["pod-a/cpu:0"].load == 2  # type: ignore[attr-defined]
    # The pod reports 5 queued or running: 3 of them came from elsewhere.
    state.observe_queue("http://pod-a:8000", queue({"devices": {"cpu:0": {"queue_size": 4, "busy_workers": 1}}}))
    assert devices(state)["pod-a/cpu:0"].load == 5  # type: ignore[attr-defined]
    state.finish(t1)
    state.finish(t1)  # finishing twice counts once
    assert devices(state)["pod-a/cpu:0"].load == 4  # type: ignore[attr-defined]
    # A queue report gone stale no longer counts; only what the router knows itself.
    clock.advance(11)
    assert devices(state)["pod-a/cpu:0"].load == 1  # type: ignore[attr-defined]


def test_stale_pod_is_unknown_not_dropped() -> None:
    clock = Clock()
    state = fleet(clock, "pod-a")
    clock.advance(9.9)
    assert devices(state)["pod-a/cpu:0"].fresh  # type: ignore[attr-defined]
    clock.advance(0.2)
    d = devices(state)["pod-a/cpu:0"]
    assert not d.fresh and d.healthy  # type: ignore[attr-defined]
    assert state.pod_state(state.by_name["pod-a"]) == "stale"
    state.observe_queue("http://pod-a:8000", queue({"devices": {}}))  # any contact refreshes it
    assert devices(state)["pod-a/cpu:0"].fresh  # type: ignore[attr-defined]


def test_a_group_sent_to_a_device_waits_there_until_the_documents_catch_up() -> None:
    clock = Clock()
    state = fleet(clock, "pod-a")
    state.expect("pod-a", "cpu:0", "beta")
    d = devices(state)["pod-a/cpu:0"]
    # The device decides when it switches: the router sees beta waiting there, alpha still current.
    assert d.waiting_groups == {"beta"} and d.resident_group() == "alpha"  # type: ignore[attr-defined]
    # A document still showing alpha (the request is queued) does not cancel the expectation...
    clock.advance(1)
    state.observe_status("http://pod-a:8000", status("pod-a"))
    assert devices(state)["pod-a/cpu:0"].waiting_groups == {"beta"}  # type: ignore[attr-defined]
    # ...one showing beta confirms it, and the document is the truth again.
    state.observe_status("http://pod-a:8000", status("pod-a", DeviceStatus(device="cpu:0", current_group="beta")))
    assert "pod-a/cpu:0" not in state.tickets.expected
    d = devices(state)["pod-a/cpu:0"]
    assert d.resident_group() == "beta" and not d.waiting_groups  # type: ignore[attr-defined]


def test_a_queue_document_taken_after_the_send_settles_what_waits() -> None:
    clock = Clock()
    state = fleet(clock, "pod-a")
    state.expect("pod-a", "cpu:0", "beta")
    doc = queue({"devices": {"cpu:0": {"queue_size": 1, "busy_workers": 0, "waiting_groups": ["beta"]}}})
    clock.advance(2)
    state.observe_queue("http://pod-a:8000", doc)
    d = devices(state)["pod-a/cpu:0"]
    assert d.waiting_groups == {"beta"} and d.waiting == 1  # type: ignore[attr-defined]
    # Served (or left) and gone from the queue: nothing waits any more.
    state.observe_queue("http://pod-a:8000", queue({"devices": {"cpu:0": {"queue_size": 0, "waiting_groups": []}}}))
    assert not devices(state)["pod-a/cpu:0"].waiting_groups  # type: ignore[attr-defined]


def test_expectation_expires() -> None:
    clock = Clock()
    state = fleet(clock, "pod-a", expectation_ttl_s=30.0)
    state.expect("pod-a", "cpu:0", "beta")
    clock.advance(31)
    state.observe_queue("http://pod-a:8000", queue({"devices": {}}))
    d = devices(state)["pod-a/cpu:0"]
    assert d.resident_group() == "alpha" and not d.waiting_groups  # type: ignore[attr-defined]


def test_served_moves_load_to_the_device_that_served_and_notes_switches() -> None:
    clock = Clock()
    state = FleetState(clock=clock)
    state.upsert("u", "http://pod-a:8000")
    state.observe_status(
        "u",
        status("pod-a", DeviceStatus(device="cuda:0", current_group="alpha"), DeviceStatus(device="cuda:1")),
    )
    ticket = state.begin("pod-a", "cuda:0", "beta")
    state.served(ticket, "cuda:1", switched=True)
    snap = devices(state)
    assert snap["pod-a/cuda:0"].load == 0 and snap["pod-a/cuda:1"].load == 1  # type: ignore[attr-defined]
    assert "beta" in snap["pod-a/cuda:1"].waiting_groups  # type: ignore[attr-defined]  # until a document says so
    assert ticket.switched  # its time includes a switch: it teaches no service time
    state.finish(ticket)
    assert devices(state)["pod-a/cuda:1"].load == 0  # type: ignore[attr-defined]


def test_last_switch_time_is_converted_to_the_router_clock() -> None:
    clock = Clock()
    state = FleetState(clock=clock)
    state.upsert("u", "http://pod-a:8000")
    doc = status("pod-a", DeviceStatus(device="cpu:0", current_group="alpha", last_switch_unix=4990.0))
    state.observe_status("u", doc)  # made at unix 5000: the switch was 10 s before we saw it
    assert devices(state)["pod-a/cpu:0"].last_switch_at == pytest.approx(clock.t - 10)  # type: ignore[attr-defined]


def test_duplicate_pod_names_are_told_apart() -> None:
    clock = Clock()
    state = FleetState(clock=clock)
    for port in (8001, 8002):
        url = f"http://127.0.0.1:{port}"
        state.upsert(url, url)
        state.observe_status(url, status("local"))
    assert sorted(state.by_name) == ["local@127.0.0.1:8001", "local@127.0.0.1:8002"]
    assert len(state.snapshot().devices) == 2


def test_poll_failures_eject_and_a_success_after_cool_down_readmits() -> None:
    clock = Clock()
    events: list[tuple[str, bool]] = []
    state = fleet(clock, "pod-a", "pod-b", ejection=EjectionPolicy(threshold=2, cooldown_s=5, cooldown_max_s=60))
    state.on_eject = lambda pod, ejected: events.append((pod, ejected))
    state.observe_failure("http://pod-a:8000", "refused")
    assert state.routable(state.by_name["pod-a"])
    state.observe_failure("http://pod-a:8000", "refused")
    assert events == [("pod-a", True)]
    assert not devices(state)["pod-a/cpu:0"].healthy  # type: ignore[attr-defined]
    assert state.pod_state(state.by_name["pod-a"]) == "ejected"
    clock.advance(4)
    state.observe_queue("http://pod-a:8000", queue({"devices": {}}))  # answers, but the cool-down is not over
    assert not state.routable(state.by_name["pod-a"])
    clock.advance(2)
    state.observe_queue("http://pod-a:8000", queue({"devices": {}}))
    assert state.by_name["pod-a"].outlier.admitted and events[-1] == ("pod-a", False)
    # Back in rotation only once a fresh status document says it is ready (it may have restarted).
    assert not state.routable(state.by_name["pod-a"])
    state.observe_status("http://pod-a:8000", status("pod-a", ready=False))
    assert not state.routable(state.by_name["pod-a"])
    state.observe_status("http://pod-a:8000", status("pod-a"))
    assert state.routable(state.by_name["pod-a"])


def test_request_failures_eject_too() -> None:
    clock = Clock()
    state = fleet(clock, "pod-a", ejection=EjectionPolicy(threshold=3, cooldown_s=5, cooldown_max_s=60))
    assert not state.failed("pod-a", "reset")
    assert not state.failed("pod-a", "reset")
    assert state.failed("pod-a", "reset")
    assert not state.ready


@pytest.mark.parametrize(
    ("steps", "admitted", "cooldown"),
    [
        (["f", "f"], True, None),
        (["f", "f", "f"], False, 5.0),
        (["f", "f", "s", "f", "f"], True, None),  # a success resets the count
        (["f", "f", "f", "wait", "f"], False, 10.0),  # failing on probation doubles the cool-down
        (["f", "f", "f", "wait", "f", "wait", "f"], False, 20.0),
        (["f", "f", "f", "wait", "s"], True, None),
    ],
)
def test_outlier_table(steps: list[str], admitted: bool, cooldown: float | None) -> None:
    o = Outlier(threshold=3, cooldown_s=5, cooldown_max_s=60)
    now = 0.0
    for step in steps:
        if step == "f":
            o.failure(now, "boom")
        elif step == "s":
            o.success(now)
        else:
            now = (o.ejected_until or now) + 0.1
    assert o.admitted is admitted
    if cooldown is not None:
        assert o.ejected_until == pytest.approx(now + cooldown)


def test_outlier_cooldown_is_capped() -> None:
    o = Outlier(threshold=1, cooldown_s=5, cooldown_max_s=12)
    for _ in range(5):
        now = o.ejected_until or 0.0
        o.failure(now)
    assert o.ejected_until is not None and o.ejected_until - now == 12


def test_remove_and_replace() -> None:
    clock = Clock()
    state = fleet(clock, "pod-a", "pod-b")
    state.remove("http://pod-a:8000")
    assert list(state.by_name) == ["pod-b"]
    state.replace_all([])
    assert not state.pods and not state.models


def test_describe_is_a_plain_document() -> None:
    clock = Clock()
    state = fleet(clock, "pod-a")
    state.begin("pod-a", "cpu:0", "alpha")
    doc = state.describe()
    dev = doc["pods"]["pod-a"]["devices"]["cpu:0"]
    assert doc["ready"] and dev["router_inflight"] == 1 and dev["current_group"] == "alpha"


def test_service_time_is_learned_from_requests_that_found_their_device_idle() -> None:
    clock = Clock()
    state = fleet(clock, "pod-a")
    assert state.snapshot().costs.service_s == 0.25  # the default until something is measured
    t = state.begin("pod-a", "cpu:0", "alpha", idle=True)
    clock.advance(0.05)
    state.finish(t, ok=True)
    assert state.snapshot().costs.service_s == pytest.approx(0.05)
    queued = state.begin("pod-a", "cpu:0", "alpha", idle=False)  # waited behind others: not service time
    clock.advance(3)
    state.finish(queued, ok=True)
    failed = state.begin("pod-a", "cpu:0", "alpha", idle=True)
    clock.advance(3)
    state.finish(failed, ok=False)
    assert state.snapshot().costs.service_s == pytest.approx(0.05)
    t = state.begin("pod-a", "cpu:0", "alpha", idle=True)
    clock.advance(0.15)
    state.finish(t, ok=True)
    assert state.snapshot().costs.service_s == pytest.approx(0.05 + 0.2 * 0.1)


def test_the_kept_index_is_the_snapshot_after_any_sequence_of_events() -> None:
    """The router decides from an index kept as events arrive; it must always hold exactly the
    devices a fresh snapshot would build, and decide as choose_device does on them."""
    import random

    from gpufleet.api.load_report import DeviceLoad, LoadReport
    from gpufleet.routing.policy import RouteRequest, choose_device

    rng = random.Random(5)
    clock = Clock()
    state = FleetState(clock=clock, stale_after_s=30.0)
    groups = ["alpha", "beta", "gamma"]
    pods = [f"pod-{i}" for i in range(40)]
    for p in pods:
        state.upsert(f"http://{p}:8000", f"http://{p}:8000")
    tickets = []
    for step in range(400):
        p = rng.choice(pods)
        url = f"http://{p}:8000"
        kind = rng.random()
        if kind < 0.25:
            devs = [DeviceStatus(device=f"cuda:{i}", current_group=rng.choice([*groups, None]),
                                 cached_groups=rng.sample(groups, 1), workers=4) for i in range(2)]
            state.observe_status(url, status(p, *devs, ready=rng.random() > 0.1))
        elif kind < 0.4:
            state.observe_load(p, LoadReport({"cuda:0": DeviceLoad(rng.randint(0, 9), rng.randint(0, 3))}, None))
        elif kind < 0.6 and state.by_name.get(p) and state.by_name[p].status:
            tickets.append(state.begin(p, "cuda:0", rng.choice(groups)))
            if rng.random() < 0.3:
                state.expect(p, "cuda:0", rng.choice(groups))
        elif kind < 0.8 and tickets:
            state.finish(tickets.pop(rng.randrange(len(tickets))), ok=True)
        elif kind < 0.85:
            state.failed(p, "boom")
        else:
            clock.advance(rng.choice([0.1, 1.0, 40.0]))
        if step % 10 == 0:
            state.resync(budget=len(state.pods))  # every pod looked at, as len(pods) / batch decisions do
            snap = state.snapshot()
            kept = {d.key: d for d in state.index.devices}
            built = {d.key: d for d in snap.devices}
            assert kept.keys() == built.keys()
            differ = [(kept[k], built[k]) for k in kept if kept[k] != built[k]]
            assert not differ, differ[:1]
            request = RouteRequest(rng.choice(groups))
            full = choose_device(request, snap)
            fast = state.decide(request)
            assert (fast.outcome, fast.choice and fast.choice.key) == (full.outcome, full.choice and full.choice.key)


def test_waiting_groups_age_with_the_queue_document_not_with_load_reports() -> None:
    """Only the queue document says which groups wait on a device; answers' load reports carry
    counts. A busy pod answers all the time and is never queue-polled, so its reports must not keep
    an old document's waiting groups alive: the policy prices switches from them."""
    from gpufleet.api.load_report import DeviceLoad, LoadReport
    from gpufleet.routing.policy import RouteRequest

    clock = Clock()
    state = fleet(clock, "pod-a")  # stale after 10 s
    doc = queue({"devices": {"cpu:0": {"queue_size": 1, "busy_workers": 1, "waiting_groups": ["beta"]}}})
    state.observe_queue("http://pod-a:8000", doc)
    assert devices(state)["pod-a/cpu:0"].waiting_groups == {"beta"}  # type: ignore[attr-defined]
    for _ in range(30):  # busy for 30 s: an answer every second, still one request queued
        clock.advance(1)
        state.observe_load("pod-a", LoadReport({"cpu:0": DeviceLoad(running=1, waiting=1)}, None))
    d = devices(state)["pod-a/cpu:0"]
    assert d.fresh and d.load == 2 and d.waiting == 1  # type: ignore[attr-defined]  # counts: from the reports
    assert d.waiting_groups == frozenset()  # type: ignore[attr-defined]  # which groups: a 30 s old document
    state.resync(budget=len(state.pods))
    kept = {k.key: k for k in state.index.devices}["pod-a/cpu:0"]
    assert kept.waiting_groups == frozenset()
    assert state.decide(RouteRequest("beta")).reason != "any:affinity_waiting"


def test_a_report_of_an_empty_queue_clears_the_waiting_groups_at_once() -> None:
    from gpufleet.api.load_report import DeviceLoad, LoadReport

    clock = Clock()
    state = fleet(clock, "pod-a")
    doc = queue({"devices": {"cpu:0": {"queue_size": 1, "waiting_groups": ["beta"]}}})
    state.observe_queue("http://pod-a:8000", doc)
    clock.advance(1)
    state.observe_load("pod-a", LoadReport({"cpu:0": DeviceLoad(running=1, waiting=0)}, None))
    # Nothing queued there now, so no group waits there, whatever the older document said.
    assert devices(state)["pod-a/cpu:0"].waiting_groups == frozenset()  # type: ignore[attr-defined]


def test_one_entry_point_owns_when_the_kept_index_answers() -> None:
    from gpufleet.routing.alternatives import round_robin
    from gpufleet.routing.policy import RouteRequest, choose_device

    clock = Clock()
    state = fleet(clock, *[f"pod-{i:02}" for i in range(40)])  # above the index's small-fleet cut-off
    request = RouteRequest("alpha")
    full = choose_device(request, state.snapshot())
    assert full.choice is not None and state.decide(request).choice == full.choice  # the kept index
    # A retry's exclusions and another policy take a full snapshot: the index knows neither.
    retry = state.decide(request, exclude=frozenset({full.choice.pod}))
    assert retry.choice is not None and retry.choice.pod != full.choice.pod
    assert state.decide(request, round_robin).reason.endswith("round_robin")


def test_a_renamed_pod_leaves_the_index_at_once_and_comes_back_under_its_new_name() -> None:
    clock = Clock()
    state = fleet(clock, "pod-a")
    assert [d.key for d in state.index.devices] == ["pod-a/cpu:0"]
    state.upsert("http://other:8000", "http://other:8000")
    state.observe_status("http://other:8000", status("pod-a"))  # a second pod of the same name
    state.resync(budget=len(state.pods))
    assert sorted(d.key for d in state.index.devices) == sorted(d.key for d in state.snapshot().devices) == [
        "pod-a@other:8000/cpu:0", "pod-a@pod-a:8000/cpu:0"]
    state.remove("http://other:8000")
    state.resync()
    assert [d.key for d in state.index.devices] == ["pod-a/cpu:0"]
