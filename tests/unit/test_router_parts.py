"""Pure parts of the router: settings, body parsing, refusals, Kubernetes pods, fleet documents."""

from __future__ import annotations

import json
from typing import Any

import pytest

from gpufleet.api import labels
from gpufleet.api.errors import ConfigError, GpufleetError, InvalidRequest, ModelNotFound, Overloaded, Unavailable
from gpufleet.api.labels import STATUS_ANNOTATION
from gpufleet.api.pod_status import DeviceStatus, PodStatus
from gpufleet.router import fleet_api
from gpufleet.router.decide import Decider
from gpufleet.router.kube_discovery import LEASES, ClusterView, apply_event, parse_lease, parse_pod
from gpufleet.router.metrics import RouterMetrics
from gpufleet.router.proxy import parse_routing, pod_body, request_lease
from gpufleet.router.settings import load_router_settings
from gpufleet.router.state import FleetState
from gpufleet.routing.policy import DeviceState, Snapshot, names_one_device

pytestmark = pytest.mark.unit


# --- settings -----------------------------------------------------------------------------------


def test_settings_parse_urls_and_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POD_URLS", " http://a:1/ , http://b:2")
    monkeypatch.setenv("ROUTING_POLICY", "least_load")
    s = load_router_settings()
    assert s.pod_urls == ["http://a:1", "http://b:2"] and s.routing_policy == "least_load"


@pytest.mark.parametrize(
    ("env", "names"),
    [
        ({}, "POD_URLS"),
        ({"POD_URLS": "a:1"}, "POD_URLS"),
        ({"POD_URLS": "http://a:1", "ROUTING_POLICY": "random"}, "ROUTING_POLICY"),
        ({"POD_URLS": "http://a:1", "FIRST_BYTE_TIMEOUT_S": "0"}, "FIRST_BYTE_TIMEOUT_S"),
    ],
)
def test_bad_settings_name_the_setting(monkeypatch: pytest.MonkeyPatch, env: dict[str, str], names: str) -> None:
    monkeypatch.delenv("POD_URLS", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ConfigError, match=names):
        load_router_settings()


def test_kubernetes_discovery_needs_no_urls(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("POD_URLS", raising=False)
    s = load_router_settings(discovery="kubernetes", pod_namespaces="team-a, team-b")
    assert s.pod_namespaces == ["team-a", "team-b"]


@pytest.mark.parametrize(
    ("env", "on"),
    [
        ({"POD_URLS": "http://a:1,http://b:2"}, True),  # a short static list: per-pod series by default
        ({"POD_URLS": ",".join(f"http://p{i}:1" for i in range(65))}, False),
        ({"DISCOVERY": "kubernetes"}, False),  # a fleet that grows: fleet-wide series by default
        ({"DISCOVERY": "kubernetes", "METRICS_POD_LABELS": "true"}, True),
        ({"POD_URLS": "http://a:1", "METRICS_POD_LABELS": "false"}, False),
    ],
)
def test_per_pod_metric_series_are_off_by_default_where_the_fleet_can_grow(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], on: bool
) -> None:
    monkeypatch.delenv("POD_URLS", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert load_router_settings().pod_labels_on is on


@pytest.mark.parametrize("per_pod", [True, False])
def test_metrics_name_pods_and_devices_only_when_asked(per_pod: bool) -> None:
    metrics = RouterMetrics(per_pod=per_pod)
    for i in range(50):
        metrics.decision("affinity", "routed", "any:affinity_current", f"pod-{i}", "cuda:0")
        metrics.upstream_failure(f"pod-{i}", "connect")
        metrics.retry(f"pod-{i}")
        metrics.ejection(f"pod-{i}")
    devices = tuple(DeviceState(pod=f"pod-{i}", device="cuda:0", leased_by="lease-1" if i < 3 else None)
                    for i in range(50))
    metrics.leases_now(Snapshot(devices, leases=frozenset({"lease-1"})))
    samples = [s for family in metrics.registry.collect() for s in family.samples]
    labelled = [s for s in samples if "pod" in s.labels or "gpu" in s.labels]
    counted = {s.name: s.value for s in samples if not s.labels}
    assert counted["gpufleet_router_leased_devices"] == 3 and counted["gpufleet_router_leases_active"] == 1
    if per_pod:
        assert len([s for s in labelled if s.name == "gpufleet_router_decisions_total"]) == 50
        assert len([s for s in labelled if s.name == "gpufleet_router_device_leased"]) == 50
    else:
        assert labelled == []
        assert counted["gpufleet_router_retries_total"] == 50 and counted["gpufleet_router_ejections_total"] == 50
        assert sum(s.value for s in samples if s.name == "gpufleet_router_decisions_total") == 50


# --- request bodies -------------------------------------------------------------------------------


def test_parse_routing_reads_only_what_routing_needs() -> None:
    doc, r = parse_routing(b'{"model": "m", "exclusive_gpu": "pod-a/cuda:1", "stream": true, "messages": []}')
    assert (r.model, r.exclusive_gpu, r.stream) == ("m", "pod-a/cuda:1", True)
    assert doc["messages"] == []


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b"{nope", None),
        (b"[1]", None),
        (b'{"messages": []}', "model"),
        (b'{"model": ""}', "model"),
        (b'{"model": "m", "exclusive_gpu": 3}', "exclusive_gpu"),
        (b'{"model": "m", "stream": "yes"}', "stream"),
    ],
)
def test_parse_routing_errors_are_openai_400s(body: bytes, param: str | None) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_routing(body)
    assert info.value.status_code == 400 and info.value.param == param


@pytest.mark.parametrize(
    ("target", "sent"),
    [
        ("node-a/cuda:2", "cuda:2"),
        ("pod-a/cuda:2", "cuda:2"),
        ("cuda:2", "cuda:2"),
        ("GPU-3f2a", "cuda:2"),  # a GPU UUID names the device itself
        ("gpu-3F2A", "cuda:2"),  # UUIDs compare without case
        ("pod-a", None),  # a whole pod: the pod picks among its devices
        ("node-a", None),
    ],
)
def test_exclusive_target_is_rewritten_for_the_pod(target: str, sent: str | None) -> None:
    chosen = DeviceState(pod="pod-a", device="cuda:2", node="node-a", uuid="GPU-3f2a")
    pin = names_one_device(target, chosen)
    out = json.loads(pod_body({"model": "m", "exclusive_gpu": target, "x": [1]}, chosen.device if pin else None))
    assert out.get("exclusive_gpu") == sent and out["x"] == [1]


def test_the_lease_never_reaches_the_pod() -> None:
    out = json.loads(pod_body({"model": "m", "lease": "lease-1", "exclusive_gpu": "pod-a"}, "cuda:1"))
    assert out == {"model": "m", "exclusive_gpu": "cuda:1"}


@pytest.mark.parametrize(
    ("body", "headers", "lease"),
    [
        (b'{"model": "m"}', [], None),
        (b'{"model": "m", "lease": "lease-1"}', [], "lease-1"),
        (b'{"model": "m"}', [(b"x-gpufleet-lease", b"lease-2")], "lease-2"),
        (b'{"model": "m", "lease": "lease-1"}', [(b"x-gpufleet-lease", b"lease-1")], "lease-1"),
        # Two different leases: valid by the OpenAPI document, so served, under the header's (it says so).
        (b'{"model": "m", "lease": "lease-1"}', [(b"x-gpufleet-lease", b" lease-2 ")], "lease-2"),
    ],
)
def test_a_lease_comes_from_the_body_or_the_header(body: bytes, headers: list[tuple[bytes, bytes]],
                                                   lease: str | None) -> None:
    _, fields = parse_routing(body)
    assert request_lease(fields, headers) == lease


@pytest.mark.parametrize(
    ("body", "headers"),
    [
        (b'{"model": "m", "lease": 7}', []),
        (b'{"model": "m", "lease": ""}', []),
        (b'{"model": "m"}', [(b"x-gpufleet-lease", b" ")]),
    ],
)
def test_bad_leases_are_400s_naming_lease(body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    with pytest.raises(InvalidRequest) as info:
        request_lease(parse_routing(body)[1], headers)
    assert info.value.status_code == 400 and info.value.param == "lease"


# --- refusals -----------------------------------------------------------------------------------


def _decider(*docs: PodStatus) -> Decider:
    state = FleetState(clock=lambda: 0.0)
    for doc in docs:
        state.upsert(doc.pod, f"http://{doc.pod}:8000")
        state.observe_status(doc.pod, doc)
    return Decider(state, RouterMetrics(), "affinity")


def _pod(name: str, load_limit: int = 64, ready: bool = True) -> PodStatus:
    return PodStatus(
        pod=name,
        ready=ready,
        devices=[DeviceStatus(device="cpu:0", current_group="alpha", queue_limit=load_limit)],
        models={"m": "alpha"},
        timestamp=0.0,
    )


def _refuse(decider: Decider, exclusive: str | None = None) -> GpufleetError:
    d = decider.decide("rid", "m", "alpha", exclusive, frozenset(), 0)
    assert not d.routed
    return decider.refusal(d, "alpha", exclusive)


def test_refusals_map_to_openai_errors() -> None:
    decider = _decider(_pod("pod-a"), _pod("pod-b"))
    err = _refuse(decider, "pod-z/cpu:0")
    assert isinstance(err, InvalidRequest) and err.param == "exclusive_gpu" and err.code == "unknown_device"
    assert "pod-a/cpu:0" in err.message
    err = _refuse(decider, "cpu:0")
    assert err.status_code == 400 and err.code == "ambiguous_device"

    down = _decider(_pod("pod-a", ready=False))
    err = _refuse(down, "pod-a")
    assert isinstance(err, Unavailable) and err.status_code == 503 and "Retry-After" in err.headers()

    full = _decider(_pod("pod-a", load_limit=1))
    for _ in range(2):
        full.state.begin("pod-a", "cpu:0", "alpha")
    err = _refuse(full)
    assert isinstance(err, Overloaded) and err.status_code == 429 and int(err.headers()["Retry-After"]) >= 1


def test_model_lookup() -> None:
    decider = _decider(_pod("pod-a"))
    assert decider.group_of("m") == "alpha"
    with pytest.raises(ModelNotFound):
        decider.group_of("other")
    with pytest.raises(Unavailable):
        _decider().group_of("m")  # no pod has reported yet: not a 404


def test_decisions_are_counted() -> None:
    decider = _decider(_pod("pod-a"))
    decider.decide("rid", "m", "alpha", None, frozenset(), 0)
    text = json.dumps([m.samples for m in decider.metrics.registry.collect()], default=str)
    assert "any:affinity_current" in text


# --- Kubernetes pods ----------------------------------------------------------------------------


def k8s_pod(name: str = "pod-a", *, ready: bool = True, ip: str | None = "10.0.0.5", deleting: bool = False,
            port: int | None = 8080, namespace: str = "ml", managed: bool = True, group: str = "alpha",
            annotation: str | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": namespace, "uid": f"uid-{name}", "annotations": {},
                            "labels": {labels.LABEL_COMPONENT: labels.COMPONENT_POD_SERVER,
                                       labels.LABEL_MODEL_GROUP: group}}
    if managed:
        meta["labels"][labels.LABEL_MANAGED_BY] = labels.MANAGED_BY
        meta["ownerReferences"] = [{"apiVersion": "apps/v1", "kind": "StatefulSet", "name": group,
                                    "uid": "sts-uid", "controller": True}]
    if annotation is not None:
        meta["annotations"][STATUS_ANNOTATION] = annotation
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    ports = [{"name": "metrics", "containerPort": 9090}] + ([{"name": "http", "containerPort": port}] if port else [])
    status: dict[str, Any] = {
        "phase": "Running",
        "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
    }
    if ip:
        status["podIP"] = ip
    return {
        "metadata": meta,
        "spec": {"nodeName": "node-1", "containers": [{"name": "server", "ports": ports}]},
        "status": status,
    }


def k8s_lease(name: str = "pod-a", *, owner: str | None = "same", doc: Any = "doc",
              namespace: str = "ml") -> dict[str, Any]:
    """A pod server's status Lease, as gpufleet.pod_server.status_publisher writes it."""
    meta: dict[str, Any] = {"name": name, "namespace": namespace, "annotations": {}}
    if owner is not None:
        uid = f"uid-{name}" if owner == "same" else owner
        meta["ownerReferences"] = [{"apiVersion": "v1", "kind": "Pod", "name": name, "uid": uid}]
    text = _pod(name).model_dump_json() if doc == "doc" else doc
    if text is not None:
        meta["annotations"][STATUS_ANNOTATION] = text
    return {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": meta}


def test_parse_a_ready_pod() -> None:
    obs = parse_pod(k8s_pod())
    assert obs.id == "ml/pod-a" and obs.url == "http://10.0.0.5:8080" and obs.ready and obs.node == "node-1"
    assert obs.managed and obs.uid == "uid-pod-a"


@pytest.mark.parametrize(
    ("kw", "ready", "url"),
    [
        ({"ready": False}, False, "http://10.0.0.5:8080"),
        ({"deleting": True}, False, "http://10.0.0.5:8080"),
        ({"ip": None}, False, None),
        ({"port": None}, True, "http://10.0.0.5:9090"),  # no port named http: the first one
        ({"ip": "fd00::5"}, True, "http://[fd00::5]:8080"),
    ],
)
def test_parse_pod_readiness_and_address(kw: dict[str, Any], ready: bool, url: str | None) -> None:
    obs = parse_pod(k8s_pod(**kw))
    assert obs.ready is ready and obs.url == url


def test_a_status_annotation_on_the_pod_itself_is_not_believed() -> None:
    """Pod servers cannot write pods: whoever wrote it, it is not the pod server."""
    assert parse_pod(k8s_pod(annotation=_pod("pod-a").model_dump_json())).status is None


def test_parse_lease_without_or_with_a_bad_document() -> None:
    assert parse_lease(k8s_lease(doc=None)).status is None
    bad = parse_lease(k8s_lease(doc='{"pod": 1}'))
    assert bad.status is None and bad.status_error is not None
    other = parse_lease(k8s_lease("pod-a", doc=_pod("pod-b").model_dump_json()))  # describes another pod
    assert other.status is None and "pod-b" in (other.status_error or "")


def test_watch_events_update_the_fleet() -> None:
    state = FleetState(clock=lambda: 0.0)
    view = ClusterView()
    apply_event(state, "RESET", "ml", [k8s_pod("pod-a"), k8s_pod("pod-b")], 8000, view=view)
    assert sorted(state.by_name) == ["pod-a", "pod-b"] and state.models == {}  # no status yet
    apply_event(state, "RESET", "ml", [k8s_lease("pod-a"), k8s_lease("pod-b")], 8000, resource=LEASES, view=view)
    assert state.models == {"ml/m": "ml/alpha", "m": "ml/alpha"}  # qualified by namespace; unique: an alias
    # Leases carry no contact: the status counts as fresh only once a poll answers.
    assert not state.snapshot().devices[0].fresh
    apply_event(state, "MODIFIED", "ml", k8s_pod("pod-a", ready=False), 8000, view=view)
    assert not state.routable(state.by_name["pod-a"])
    apply_event(state, "DELETED", "ml", k8s_pod("pod-b"), 8000, view=view)
    assert sorted(state.by_name) == ["pod-a"]
    apply_event(state, "RESET", "other", [k8s_pod("pod-c", namespace="other")], 8000, view=view)
    apply_event(state, "RESET", "ml", [], 8000, view=view)  # a relist without pod-a forgets it, not other namespaces
    assert sorted(state.by_name) == ["pod-c"]


def test_only_operator_managed_pods_are_routed_to() -> None:
    state = FleetState(clock=lambda: 0.0)
    view = ClusterView()
    apply_event(state, "RESET", "ml", [k8s_pod("pod-a"), k8s_pod("intruder", managed=False)], 8000, view=view)
    assert sorted(state.by_name) == ["pod-a"]
    mislabelled = k8s_pod("pod-a")
    mislabelled["metadata"]["ownerReferences"][0]["name"] = "other-group"  # not its group's StatefulSet
    apply_event(state, "MODIFIED", "ml", mislabelled, 8000, view=view)
    assert state.by_name == {}


def test_a_pools_pods_are_trusted_by_their_pool_label_and_statefulset() -> None:
    def pool_pod(name: str, owner: str) -> dict[str, Any]:
        pod = k8s_pod(name)
        del pod["metadata"]["labels"][labels.LABEL_MODEL_GROUP]  # a pool's pods serve many groups
        pod["metadata"]["labels"][labels.LABEL_POOL] = "shared"
        pod["metadata"]["ownerReferences"][0]["name"] = owner
        return pod

    state = FleetState(clock=lambda: 0.0)
    view = ClusterView()
    apply_event(state, "RESET", "ml", [pool_pod("shared-0", "shared"), pool_pod("shared-1", "other")], 8000,
                view=view)
    assert sorted(state.by_name) == ["shared-0"]  # shared-1's StatefulSet is not its pool's


def test_a_lease_counts_only_when_its_owner_is_the_live_pod() -> None:
    state = FleetState(clock=lambda: 0.0)
    view = ClusterView()
    apply_event(state, "RESET", "ml", [k8s_pod("pod-a")], 8000, view=view)
    for lease in (k8s_lease("pod-a", owner="uid-of-an-earlier-pod-a"), k8s_lease("pod-a", owner=None)):
        apply_event(state, "MODIFIED", "ml", lease, 8000, resource=LEASES, view=view)
        assert state.pods["ml/pod-a"].status is None
    apply_event(state, "MODIFIED", "ml", k8s_lease("pod-a"), 8000, resource=LEASES, view=view)
    assert state.pods["ml/pod-a"].status is not None


# --- fleet documents ----------------------------------------------------------------------------


def _docs() -> list[fleet_api.PodDoc]:
    gpu = {"available": False, "utilization": 1.0, "devices": {"cpu:0": {"utilization": 1.0, "memory_used": 2.0}}}
    return [
        fleet_api.PodDoc("pod-a", "node-1", "http://a", "ready", gpu),
        fleet_api.PodDoc("pod-b", None, "http://b", "ejected", None, "ReadError"),
    ]


def test_gpu_stats_names_pod_and_device() -> None:
    doc = fleet_api.gpu_stats(_docs())
    assert doc["devices"]["pod-a/cpu:0"]["node"] == "node-1"
    assert doc["utilization"] == 1.0 and doc["memory_used"] == 2.0  # the first device's fields, at the top
    assert doc["available"] is False
    assert doc["pods"]["pod-b"] == {"node": None, "url": "http://b", "state": "ejected", "reachable": False,
                                    "error": "ReadError"}


def test_models_merge_device_info_across_pods() -> None:
    def models_doc(current: bool) -> dict[str, Any]:
        return {"model_groups": [{
            "group_id": "alpha", "is_default": True,
            "device_info": [{"device": "cpu:0", "has_group": current, "is_current": current, "is_cached": False,
                             "load_error": None}],
            "models": [{"id": "m", "task": "chat", "loaded_on_devices": ["cpu:0"] if current else [],
                        "cached_on_devices": [], "status": "loaded" if current else "available"}],
        }]}

    doc = fleet_api.models([
        fleet_api.PodDoc("pod-a", None, "u", "ready", models_doc(True)),
        fleet_api.PodDoc("pod-b", None, "u", "ready", models_doc(False)),
    ])
    (group,) = doc["model_groups"]
    assert [i["device"] for i in group["device_info"]] == ["pod-a/cpu:0", "pod-b/cpu:0"]
    assert group["device_info"][1]["local_device"] == "cpu:0" and group["device_info"][1]["pod"] == "pod-b"
    (model,) = group["models"]
    assert model["loaded_on_devices"] == ["pod-a/cpu:0"] and model["status"] == "loaded"


def test_queue_per_pod_and_device() -> None:
    q = {"devices": {"cpu:0": {"queue_size": 2, "busy_workers": 1}}, "total_queued": 2, "total_running": 1}
    doc = fleet_api.queue([fleet_api.PodDoc("pod-a", None, "u", "ready", q)], {"pod-a/cpu:0": 3})
    assert doc["devices"]["pod-a/cpu:0"]["router_inflight"] == 3
    assert doc["pods"]["pod-a"]["total_queued"] == 2 and doc["total_running"] == 1


def test_model_cards_union() -> None:
    a = {"data": [{"id": "x", "group": "alpha"}, {"id": "y", "group": "alpha"}]}
    b = {"data": [{"id": "y", "group": "alpha"}, {"id": "z", "group": "beta"}]}
    cards = fleet_api.model_cards([fleet_api.PodDoc("a", None, "u", "ready", a),
                                   fleet_api.PodDoc("b", None, "u", "ready", b)])
    assert [c["id"] for c in cards] == ["x", "y", "z"]


# --- decision log ---------------------------------------------------------------------------------


def test_decision_lines_are_json_and_written_in_batches() -> None:
    import io
    import logging

    from gpufleet.logs import JsonFormatter
    from gpufleet.router.decision_log import BatchingHandler

    stream = io.StringIO()
    handler = BatchingHandler(stream, JsonFormatter("router"), capacity=3)
    logger = logging.getLogger("test.router.decisions")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    for i in range(2):
        logger.info("route", extra={"request_id": f"r{i}", "pod": "pod-a"})
    assert stream.getvalue() == ""  # gathered, not yet written
    logger.info("route", extra={"request_id": "r2", "pod": "pod-a"})
    lines = stream.getvalue().splitlines()
    assert [json.loads(line)["request_id"] for line in lines] == ["r0", "r1", "r2"]
    assert json.loads(lines[0])["msg"] == "route" and json.loads(lines[0])["component"] == "router"
    logger.info("route", extra={"request_id": "r3"})
    handler.flush()
    assert json.loads(stream.getvalue().splitlines()[-1])["request_id"] == "r3"


def test_same_named_groups_of_two_namespaces_stay_two_groups() -> None:
    """team-a/chat and team-b/chat: each namespace's ids are qualified by it, and a model id
    both serve has no unqualified alias (it would be ambiguous)."""
    state = FleetState(clock=lambda: 0.0)
    view = ClusterView()
    for ns, ip in (("team-a", "10.0.0.5"), ("team-b", "10.0.1.5")):
        apply_event(state, "RESET", ns, [k8s_pod("chat-0", namespace=ns, group="chat", ip=ip)], 8000, view=view)
        lease = k8s_lease("chat-0", namespace=ns, doc=PodStatus(
            pod="chat-0", ready=True, groups=["chat"], models={"m": "chat", f"only-{ns}": "chat"}, timestamp=0.0,
            devices=[DeviceStatus(device="cuda:0", current_group="chat", cached_groups=["chat"])]).model_dump_json())
        apply_event(state, "MODIFIED", ns, lease, 8000, resource=LEASES, view=view)
    assert state.models == {"team-a/m": "team-a/chat", "team-b/m": "team-b/chat", "team-a/only-team-a": "team-a/chat",
                            "team-b/only-team-b": "team-b/chat", "only-team-a": "team-a/chat",
                            "only-team-b": "team-b/chat"}
    assert state.local_models["team-b/m"] == "m" and state.local_models["only-team-a"] == "only-team-a"
    groups = {d.pod: d.current_group for d in state.snapshot().devices}
    assert groups == {"chat-0@10.0.0.5:8080": "team-a/chat", "chat-0@10.0.1.5:8080": "team-b/chat"}
    assert {rec.status.devices[0].cached_groups[0] for rec in state.pods.values() if rec.status} == {
        "team-a/chat", "team-b/chat"}
    decider = Decider(state, RouterMetrics(), "affinity")
    assert decider.group_of("team-b/m") == "team-b/chat"
    with pytest.raises(ModelNotFound):
        decider.group_of("m")  # served in two namespaces: say which


def test_fleet_documents_qualify_ids_by_namespace() -> None:
    card = {"data": [{"id": "m", "object": "model"}]}
    docs = [fleet_api.PodDoc("a", None, "u", "ready", card, tenant="team-a"),
            fleet_api.PodDoc("b", None, "u", "ready", card, tenant="team-b")]
    assert [c["id"] for c in fleet_api.model_cards(docs)] == ["team-a/m", "team-b/m"]
    groups = {"model_groups": [{"group_id": "chat", "models": [{"id": "m", "status": "loaded"}]}]}
    merged = fleet_api.models([fleet_api.PodDoc("a", None, "u", "ready", groups, tenant="team-a"),
                               fleet_api.PodDoc("b", None, "u", "ready", groups, tenant="team-b")])
    assert [(g["group_id"], [m["id"] for m in g["models"]]) for g in merged["model_groups"]] == [
        ("team-a/chat", ["team-a/m"]), ("team-b/chat", ["team-b/m"])]
