"""What the router knows without pods: ModelGroups read from the resources (catalog), the models they
add to routing and to the fleet API, the demand document, and the SSE rule of a stream the router has
started. Pure parts; the proxy's wait over them: test_router_scale_wait_inprocess.py."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest

from gpufleet.api.demand import DemandReport
from gpufleet.api.errors import Overloaded, Unavailable
from gpufleet.api.pod_status import DeviceStatus, PodStatus
from gpufleet.router import fleet_api
from gpufleet.router.catalog import Catalog, KnownGroup, KnownModel, parse_model_group
from gpufleet.router.decide import Decider
from gpufleet.router.demand import demand_report
from gpufleet.router.kube_discovery import MODELGROUPS, apply_event
from gpufleet.router.metrics import RouterMetrics
from gpufleet.router.sse import CommittedStream
from gpufleet.router.state import FleetState
from gpufleet.router.tickets import Tickets
from gpufleet.routing.policy import Outcome

pytestmark = pytest.mark.unit


def model_group(
    name: str, *models: str, namespace: str = "team-a", status: dict[str, Any] | None = None, **spec: Any
) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "apiVersion": "gpufleet.io/v1alpha1",
        "kind": "ModelGroup",
        "metadata": {"name": name, "namespace": namespace,
                     "creationTimestamp": spec.pop("created", "2026-01-01T00:00:00Z")},
        "spec": {"models": [{"id": m, "source": f"/models/{m}", "task": "chat"} for m in models], **spec},
    }
    if status is not None:
        obj["status"] = status
    return obj


# --- parsing one ModelGroup ----------------------------------------------------------------------------


def test_a_model_group_as_routing_needs_it() -> None:
    obj = model_group("alpha", "chat", "embed", pool="shared",
                      status={"residency": 2, "desiredResidency": 3, "desiredReplicas": 1, "replicas": 4})
    obj["spec"]["models"][1]["task"] = "embedding"
    group = parse_model_group(obj)
    assert group.key == "team-a/alpha" and group.pool == "shared"
    assert group.models == (KnownModel("chat", "chat"), KnownModel("embed", "embedding"))
    assert group.figures() == {"residency": 2, "desired_residency": 3, "desired_replicas": 1}


@pytest.mark.parametrize("value", [True, "2", 2.5, -1, None, [1]])
def test_status_figures_are_read_defensively(value: object) -> None:
    group = parse_model_group(model_group("alpha", "chat", status={"residency": value, "desiredResidency": 1}))
    assert group.residency is None and group.figures() == {"desired_residency": 1}


def test_a_spec_field_this_router_does_not_know_is_no_reason_to_ignore_the_group() -> None:
    group = parse_model_group(model_group("alpha", "chat", someFutureField={"x": 1}))
    assert [m.id for m in group.models] == ["chat"]


@pytest.mark.parametrize(
    "obj",
    [
        model_group("alpha"),  # no models
        model_group("alpha", "chat", "chat"),  # an id twice
        model_group("alpha", "bad id"),
        model_group("alpha", "chat", minResident=1),  # pooled settings without a pool: the operator refuses it
        {"metadata": {"name": "alpha"}, "spec": {"models": [{"id": "chat", "source": "x"}]}},  # no namespace
        {"metadata": {"name": "alpha", "namespace": "team-a"}, "spec": "nope"},
    ],
)
def test_an_object_the_operator_would_refuse_is_not_parsed(obj: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        parse_model_group(obj)


# --- the catalog over watch events -------------------------------------------------------------------


def test_watch_events_keep_the_models_of_each_namespace() -> None:
    catalog = Catalog()
    assert catalog.apply("RESET", "team-a", [model_group("alpha", "chat"), model_group("beta", "code")])
    assert catalog.apply("RESET", "team-b", [model_group("alpha", "chat", namespace="team-b")])
    assert catalog.models() == {"team-a/chat": "team-a/alpha", "team-a/code": "team-a/beta",
                                "team-b/chat": "team-b/alpha"}
    # A fresh list of one namespace forgets what it no longer lists there, and only there.
    assert catalog.apply("RESET", "team-a", [model_group("alpha", "chat")])
    assert set(catalog.groups) == {"team-a/alpha", "team-b/alpha"}
    assert catalog.apply("MODIFIED", "team-a", model_group("alpha", "chat", "chat-2"))
    assert catalog.models()["team-a/chat-2"] == "team-a/alpha"
    assert catalog.apply("DELETED", "team-b", model_group("alpha", namespace="team-b"))  # gone, valid or not
    assert "team-b/chat" not in catalog.models()


def test_a_status_update_changes_no_model() -> None:
    catalog = Catalog()
    catalog.apply("ADDED", "team-a", model_group("alpha", "chat"))
    assert not catalog.apply("MODIFIED", "team-a", model_group("alpha", "chat", status={"residency": 1}))
    assert catalog.groups["team-a/alpha"].residency == 1  # kept for /api/models all the same


def test_a_group_no_capacity_can_serve_is_not_offered() -> None:
    # Too big for every device of its pool: its pods do not offer it, nor does the router (no 200 to
    # wait for); a group merely short of capacity (at zero pods) stays offered.
    catalog = Catalog()
    too_big = {"conditions": [{"type": "Degraded", "status": "True", "reason": "InsufficientMemory"}]}
    catalog.apply("ADDED", "team-a", model_group("huge", "big", status=too_big))
    assert catalog.models() == {} and catalog.groups["team-a/huge"].unservable == "InsufficientMemory"
    assert catalog.offered() == []  # nor listed in /v1/models
    starting = {"conditions": [{"type": "Degraded", "status": "True", "reason": "LoadFailed"}]}
    assert catalog.apply("MODIFIED", "team-a", model_group("huge", "big", status=starting))
    assert catalog.models() == {"team-a/big": "team-a/huge"}
    assert [g.name for g in catalog.offered()] == ["huge"]


def test_a_model_id_two_groups_claim_belongs_to_the_earlier_as_the_operator_decides() -> None:
    catalog = Catalog()
    catalog.apply("RESET", "team-a", [model_group("zeta", "chat", created="2026-01-01T00:00:00Z"),
                                      model_group("alpha", "chat", created="2026-02-01T00:00:00Z")])
    assert catalog.models() == {"team-a/chat": "team-a/zeta"}


def test_a_group_being_deleted_claims_nothing() -> None:
    catalog = Catalog()
    going = model_group("alpha", "chat")
    going["metadata"]["deletionTimestamp"] = "2026-03-01T00:00:00Z"
    catalog.apply("RESET", "team-a", [model_group("alpha", "chat")])
    assert catalog.apply("MODIFIED", "team-a", going)
    assert catalog.models() == {}


def test_an_invalid_object_is_ignored_with_one_log_line(caplog: pytest.LogCaptureFixture) -> None:
    catalog = Catalog()
    catalog.apply("ADDED", "team-a", model_group("alpha", "chat"))
    with caplog.at_level(logging.WARNING, logger="gpufleet.router.catalog"):
        catalog.apply("MODIFIED", "team-a", model_group("alpha"))
    assert [r.getMessage() for r in caplog.records] == ["ModelGroup ignored: not a valid spec"]
    assert caplog.records[0].modelgroup == "team-a/alpha"  # type: ignore[attr-defined]
    assert catalog.models() == {}  # what it declared before no longer stands


# --- the catalog in the fleet state -----------------------------------------------------------------------


def pod_status(pod: str, models: dict[str, str], ready: bool = True) -> PodStatus:
    groups = sorted(set(models.values()))
    return PodStatus(pod=pod, ready=ready, devices=[DeviceStatus(device="cpu:0", current_group=groups[0])],
                     groups=groups, models=models, timestamp=1.0)


def test_models_known_only_from_the_resources_route_to_their_group() -> None:
    state = FleetState()
    changes: list[int] = []
    state.on_change = lambda: changes.append(1)
    apply_event(state, "RESET", "team-a", [model_group("alpha", "chat")], 8000, resource=MODELGROUPS)
    assert changes and state.models == {"team-a/chat": "team-a/alpha", "chat": "team-a/alpha"}
    decider = Decider(state, RouterMetrics(), "affinity")
    assert decider.group_of("chat") == "team-a/alpha"
    assert decider.peek("team-a/alpha").outcome is Outcome.NO_DEVICES
    # A pod of another namespace serving "chat" makes the bare id ambiguous: no alias any more.
    state.upsert("team-b/pod-b", "http://pod-b", name="pod-b", tenant="team-b")
    state.observe_status("team-b/pod-b", pod_status("pod-b", {"chat": "alpha"}), contact=False)
    assert "chat" not in state.models and state.models["team-a/chat"] == "team-a/alpha"
    assert decider.peek("team-a/alpha").outcome is Outcome.GROUP_NOT_SERVED
    assert state.local_models["team-a/chat"] == "chat"  # what its pods will call it


def test_what_the_pods_report_wins_over_the_resources() -> None:
    state = FleetState()
    state.observe_model_groups("RESET", "team-a", [model_group("alpha", "chat")])
    state.upsert("team-a/pod-a", "http://pod-a", name="pod-a", tenant="team-a")
    state.observe_status("team-a/pod-a", pod_status("pod-a", {"chat": "beta"}), contact=False)
    assert state.models["team-a/chat"] == "team-a/beta"


def test_a_pod_that_never_answered_is_not_ejected_by_failed_polls() -> None:
    state = FleetState()
    state.upsert("http://pod-a", "http://pod-a")
    for _ in range(10):  # a pod starting: its port is not open yet
        state.observe_failure("http://pod-a", "refused")
    rec = state.pods["http://pod-a"]
    assert rec.outlier.admitted and rec.outlier.last_error == "refused"
    state.observe_status("http://pod-a", pod_status("pod-a", {"chat": "alpha"}))  # it answered: it counts now
    for _ in range(3):
        state.observe_failure("http://pod-a", "refused")
    assert not rec.outlier.admitted


# --- demand ----------------------------------------------------------------------------------------------


def test_tickets_count_sequences_and_service_time_per_group() -> None:
    now = [10.0]
    tickets = Tickets(lambda: now[0], 30.0)
    a = tickets.begin("pod-a", "cpu:0", "team-a/alpha", idle=True, weight=3)
    b = tickets.begin("pod-a", "cpu:0", "team-a/beta")
    assert tickets.group_inflight == {"team-a/alpha": 3, "team-a/beta": 1}
    now[0] += 0.5
    tickets.finish(a, ok=True)
    tickets.finish(a, ok=True)  # twice: released once
    tickets.finish(b, ok=True)  # not idle: teaches nothing
    assert tickets.group_inflight == {}
    assert tickets.group_service["team-a/alpha"].seconds == 0.5 and "team-a/beta" not in tickets.group_service


def test_the_demand_document_lists_every_known_group_split_by_namespace() -> None:
    report = demand_report(
        "router-0", 1000.0,
        groups=["team-a/alpha", "team-a/idle", "local"],
        in_flight={"team-a/alpha": 3},
        held={"team-b/cold": (2, 4.56789)},
        service_s={"team-a/alpha": 0.25},
        fleet_service_s=0.5,
    )
    doc = DemandReport.model_validate_json(report.model_dump_json())  # what the operator reads back
    groups = {g.key: g for g in doc.groups}
    assert list(groups) == ["local", "team-a/alpha", "team-a/idle", "team-b/cold"]
    assert (groups["team-a/alpha"].namespace, groups["team-a/alpha"].group) == ("team-a", "alpha")
    assert groups["team-a/alpha"].in_flight == 3 and groups["team-a/alpha"].service_seconds == 0.25
    assert groups["team-b/cold"].waiting == 2 and groups["team-b/cold"].oldest_wait_seconds == 4.568
    assert groups["team-b/cold"].service_seconds == 0.5  # not timed yet: the fleet's estimate
    assert groups["local"].namespace is None and groups["team-a/idle"].in_flight == 0
    assert doc.router == "router-0" and doc.schema_version == 1
    nothing = demand_report("r", 1.0, groups=["g"], in_flight={}, held={}, service_s={}, fleet_service_s=None)
    assert nothing.groups[0].service_seconds is None


# --- the fleet API with groups at zero -----------------------------------------------------------------


KNOWN = [
    KnownGroup("team-a", "alpha", (KnownModel("chat", "chat"),), pool="shared", residency=0, desired_residency=1),
    KnownGroup("team-a", "served", (KnownModel("code", "chat"),), residency=2),
]


def pod_doc(doc: dict[str, Any]) -> fleet_api.PodDoc:
    return fleet_api.PodDoc("pod-a", "node-1", "http://pod-a", "ready", doc, tenant="team-a")


def test_v1_models_lists_models_no_pod_serves() -> None:
    served = pod_doc({"data": [{"id": "code", "object": "model", "created": 0, "owned_by": "gpufleet",
                                "group": "served", "task": "chat"}]})
    cards = {c["id"]: c for c in fleet_api.model_cards([served], KNOWN)}
    assert set(cards) == {"team-a/code", "team-a/chat"}
    assert cards["team-a/chat"] == {"id": "team-a/chat", "object": "model", "created": 0, "owned_by": "gpufleet",
                                    "group": "alpha", "task": "chat"}
    assert cards["team-a/code"]["group"] == "served"  # the pod's card, as it was


def test_api_models_shows_groups_at_zero_and_the_operators_figures() -> None:
    served = pod_doc({"model_groups": [{"group_id": "served", "device_info": [{"device": "cpu:0"}],
                                        "models": [{"id": "code", "loaded_on_devices": ["cpu:0"]}]}]})
    groups = {g["group_id"]: g for g in fleet_api.models([served], KNOWN)["model_groups"]}
    cold = groups["team-a/alpha"]
    assert cold["device_info"] == [] and cold["pool"] == "shared"
    assert (cold["residency"], cold["desired_residency"]) == (0, 1) and "desired_replicas" not in cold
    assert [(m["id"], m["status"]) for m in cold["models"]] == [("team-a/chat", "available")]
    assert groups["team-a/served"]["residency"] == 2
    assert groups["team-a/served"]["models"][0]["loaded_on_devices"] == ["pod-a/cpu:0"]


# --- a stream the router started ------------------------------------------------------------------------


async def committed(*messages: dict[str, Any]) -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []

    async def send(message: Any) -> None:
        sent.append(message)

    stream = CommittedStream(send)
    await stream.start(b": loading\n\n")
    for m in messages:
        await stream(m)
    return sent


async def test_a_pods_stream_follows_without_its_headers() -> None:
    sent = await committed(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]},
        {"type": "http.response.body", "body": b"data: 1\n\n", "more_body": True},
        {"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False},
    )
    assert [m["type"] for m in sent] == ["http.response.start"] + ["http.response.body"] * 3
    assert sent[0]["status"] == 200 and (b"content-type", b"text/event-stream") in sent[0]["headers"]
    assert [m["body"] for m in sent[1:]] == [b": loading\n\n", b"data: 1\n\n", b"data: [DONE]\n\n"]


@pytest.mark.parametrize(
    ("status", "body", "code"),
    [
        (429, json.dumps(Overloaded("full", retry_after_s=3).to_openai()).encode(), "queue_full"),
        (503, json.dumps(Unavailable("late", code="scale_from_zero_timeout").to_openai()).encode(),
         "scale_from_zero_timeout"),
        (502, b"<html>bad gateway</html>", "upstream_error"),
        (200, b'{"not": "a stream"}', "upstream_error"),
    ],
)
async def test_any_other_answer_ends_the_stream_as_an_error_event(status: int, body: bytes, code: str) -> None:
    sent = await committed(
        {"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json")]},
        {"type": "http.response.body", "body": body[:5], "more_body": True},
        {"type": "http.response.body", "body": body[5:]},
    )
    assert len(sent) == 3 and sent[2]["more_body"] is False
    data, done = sent[2]["body"].split(b"\n\n")[:2]
    assert json.loads(data.removeprefix(b"data: "))["error"]["code"] == code and done == b"data: [DONE]"
