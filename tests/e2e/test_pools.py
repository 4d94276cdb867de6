"""GPU pools on a real control plane: one GpuPool's pods serve many ModelGroups.

The same installation as test_operator.py (its ``fleet`` fixture: helm install, the operator
and the router as local processes, a real ``gpufleet serve`` per pod kwok runs), in a module
of its own so the dedicated-group tests there run unchanged. The pod-server farm projects
each pod's ConfigMap as the kubelet does and rewrites it when the ConfigMap changes, which
is how a pool's pods learn of groups joining and leaving (no pod restarts).
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from test_operator import IMAGE_MODELS, READY_TIMEOUT, ROOT, Fleet, fleet, served_by

from gpufleet.api import labels

pytestmark = pytest.mark.e2e
__all__ = ["fleet"]  # the fixture, shared with test_operator (one installation per module)

EXAMPLE = ROOT / "deploy" / "examples" / "gpupool.yaml"
JOIN_TIMEOUT = 60.0  # the bound: a group added to a pool is served within a minute


def _example() -> tuple[dict[str, Any], list[dict[str, Any]]]:
    docs = [d for d in yaml.safe_load_all(EXAMPLE.read_text()) if d]
    pool = next(d for d in docs if d["kind"] == "GpuPool")
    groups = [d for d in docs if d["kind"] == "ModelGroup"]
    return pool, groups


POOL, GROUPS = _example()
POOL_NAME = POOL["metadata"]["name"]


def pool_obj(fleet: Fleet) -> dict[str, Any]:
    obj = fleet.get(f"/apis/gpufleet.io/v1alpha1/namespaces/{fleet.ns}/gpupools/{POOL_NAME}")
    assert obj is not None, "the GpuPool is gone"
    return obj


def pool_pods(fleet: Fleet) -> list[dict[str, Any]]:
    path = f"/api/v1/namespaces/{fleet.ns}/pods?labelSelector={labels.LABEL_POOL}={POOL_NAME}"
    items: list[dict[str, Any]] = fleet.api.get(path)["items"]
    return [p for p in items if not p["metadata"].get("deletionTimestamp")]


def pod_documents(fleet: Fleet) -> dict[str, dict[str, Any]]:
    """Each pool pod's own status document (its Lease), by pod name."""
    out = {}
    for pod in pool_pods(fleet):
        name = pod["metadata"]["name"]
        lease = fleet.get(f"/apis/coordination.k8s.io/v1/namespaces/{fleet.ns}/leases/{name}")
        raw = ((lease or {}).get("metadata", {}).get("annotations") or {}).get(labels.STATUS_ANNOTATION)
        if raw:
            out[name] = json.loads(raw)
    return out


def pool_ready(fleet: Fleet) -> bool:
    obj = pool_obj(fleet)
    status = obj.get("status") or {}
    ready = next((c for c in status.get("conditions") or [] if c["type"] == "Ready"), {})
    return ready.get("status") == "True" and status.get("observedGeneration") == obj["metadata"]["generation"]


def ask(client: httpx.Client, model: str, task: str) -> httpx.Response:
    if task == "completion":
        return client.post("/v1/completions", json={"model": model, "prompt": "The quick", "max_tokens": 4})
    return client.post("/v1/chat/completions", json={"model": model, "max_tokens": 4,
                                                     "messages": [{"role": "user", "content": "hello"}]})


def model_group(name: str, models: list[dict[str, Any]], **spec: Any) -> str:
    return yaml.safe_dump({"apiVersion": "gpufleet.io/v1alpha1", "kind": "ModelGroup", "metadata": {"name": name},
                           "spec": {"pool": POOL_NAME, "models": models, **spec}})


def routable(client: httpx.Client, fleet: Fleet, model_ids: list[str]) -> bool:
    ids = {m["id"] for m in client.get("/v1/models").json()["data"]}
    if not {f"{fleet.ns}/{m}" for m in model_ids} <= ids:
        return False
    pods = client.get("/api/fleet").json()["pods"]
    names = [p["metadata"]["name"] for p in pool_pods(fleet)]
    return bool(names) and all(pods.get(n, {}).get("state") == "ready" and not pods[n]["ejected"] for n in names)


@pytest.fixture(scope="module")
def client(fleet: Fleet) -> Any:
    pods = pool_pods(fleet)
    if pods and not all(p["status"].get("podIP", "").startswith("127.") for p in pods):
        pytest.skip("pod IPs are not loopback: the local router cannot reach them (a kubelet runs the pods)")
    with httpx.Client(base_url=fleet.router_url, timeout=120) as c:
        yield c


def test_pod_settings_on_a_pooled_group_are_refused_by_the_api_server(fleet: Fleet) -> None:
    doc = model_group("pooled-with-image", [{"id": "m", "source": "/m"}], image="example.com/other:1")
    result = fleet.kubectl("apply", "-n", fleet.ns, "-f", "-", stdin=doc, check=False)
    assert result.returncode != 0, result.stdout
    assert "spec.image" in result.stderr and POOL_NAME in result.stderr, result.stderr


def test_a_pool_of_two_pods_serves_three_groups(fleet: Fleet, client: httpx.Client) -> None:
    fleet.kubectl("apply", "-n", fleet.ns, "-f", str(EXAMPLE))
    names = [g["metadata"]["name"] for g in GROUPS]
    fleet.wait(lambda: pool_ready(fleet) and all(fleet.ready(n) for n in names),
               f"GpuPool {POOL_NAME} and its groups Ready", READY_TIMEOUT)
    pods = pool_pods(fleet)
    assert len(pods) == POOL["spec"]["replicas"] == 2
    # No group has pods of its own: every pod-server pod of the namespace is the pool's.
    selector = f"{labels.LABEL_COMPONENT}={labels.COMPONENT_POD_SERVER}"
    all_pods = fleet.api.get(f"/api/v1/namespaces/{fleet.ns}/pods?labelSelector={selector}")["items"]
    assert {p["metadata"]["name"] for p in all_pods} == {p["metadata"]["name"] for p in pods}

    models = [(m["id"], m.get("task", "chat")) for g in GROUPS for m in g["spec"]["models"]]
    fleet.wait(lambda: routable(client, fleet, [m for m, _ in models]), "the router routes to the pool", 90)
    pod_names = {p["metadata"]["name"] for p in pods}
    for model, task in models:
        r = ask(client, model, task)
        assert r.status_code == 200, r.text
        assert served_by(r) in pod_names

    def shown() -> bool:
        """Both statuses say which device holds which group (a group just served is held somewhere)."""
        devices = (pool_obj(fleet).get("status") or {}).get("devices") or []
        held = {d.get("current") for d in devices} | {g for d in devices for g in d.get("cached") or []}
        placements = {n: (fleet.group(n).get("status") or {}).get("placements") or [] for n in names}
        return len(devices) == 2 and set(names) <= held and all(placements.values())

    fleet.wait(shown, "GpuPool and ModelGroup statuses show each group's devices", 60)
    for name in names:
        status = fleet.group(name)["status"]
        assert status["pool"] == POOL_NAME
        assert {p["pod"] for p in status["placements"]} <= pod_names
        assert {p["state"] for p in status["placements"]} <= {"current", "cached"}


def test_a_group_joins_the_pool_without_restarting_a_pod(fleet: Fleet, client: httpx.Client) -> None:
    before = {p["metadata"]["name"]: p["metadata"]["uid"] for p in pool_pods(fleet)}
    started = list(fleet.farm.started) if fleet.farm else []
    source = f"{IMAGE_MODELS}/tiny-chat"  # another id for the same weights: a group of its own
    fleet.kubectl("apply", "-n", fleet.ns, "-f", "-",
                  stdin=model_group("fourth", [{"id": "tiny-chat-4", "source": source, "dtype": "float32"}]))
    fleet.wait(lambda: routable(client, fleet, ["tiny-chat-4"]), "the fourth group listed by the router",
               JOIN_TIMEOUT)
    r = ask(client, "tiny-chat-4", "chat")
    assert r.status_code == 200, r.text
    assert {p["metadata"]["name"]: p["metadata"]["uid"] for p in pool_pods(fleet)} == before
    if fleet.farm:
        assert fleet.farm.started == started  # the same pod-server processes: none restarted
    fleet.wait(lambda: fleet.ready("fourth"), "the fourth group Ready", 60)


def test_a_deleted_group_is_drained_and_freed(fleet: Fleet, client: httpx.Client) -> None:
    fleet.kubectl("delete", "mg", "fourth", "-n", fleet.ns)

    def freed() -> bool:
        docs = pod_documents(fleet)
        for doc in docs.values():
            if "fourth" in doc.get("groups", []):
                return False
            for d in doc.get("devices", []):
                if d.get("current_group") == "fourth" or "fourth" in d.get("cached_groups", []):
                    return False
        return bool(docs)

    fleet.wait(freed, "every pool pod dropped the deleted group from its devices and host cache", JOIN_TIMEOUT)
    fleet.wait(lambda: f"{fleet.ns}/tiny-chat-4" not in {m["id"] for m in client.get("/v1/models").json()["data"]},
               "the router stopped listing the deleted group's model", 30)
    assert ask(client, "tiny-chat-4", "chat").status_code == 404
    first = GROUPS[0]["spec"]["models"][0]
    assert ask(client, first["id"], first.get("task", "chat")).status_code == 200  # the others keep serving


def _huge_model(demo_root: Path) -> str:
    """A model whose checkpoint header claims 400 GB of weights: the fit check reads headers only,
    so a sparse file is enough, and nothing ever loads it."""
    folder = demo_root / "huge-chat"
    folder.mkdir(exist_ok=True)
    config = json.loads((demo_root / "tiny-chat" / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config))
    numel = 100_000_000_000  # float32: 400 GB
    header = json.dumps({"w": {"dtype": "F32", "shape": [numel], "data_offsets": [0, numel * 4]}}).encode()
    with (folder / "model.safetensors").open("wb") as fh:
        fh.write(len(header).to_bytes(8, "little") + header)
        fh.truncate(8 + len(header) + numel * 4)
    return f"{IMAGE_MODELS}/huge-chat"


def test_a_group_too_big_for_the_pools_devices_is_degraded(fleet: Fleet, client: httpx.Client,
                                                           demo_models: Path) -> None:
    source = _huge_model(demo_models.parent)
    fleet.kubectl("apply", "-n", fleet.ns, "-f", "-",
                  stdin=model_group("huge", [{"id": "huge-chat", "source": source, "dtype": "float32"}]))

    def degraded() -> dict[str, Any]:
        return fleet.condition("huge", "Degraded") if fleet.condition("huge", "Degraded").get("status") == "True" \
            else {}

    fleet.wait(lambda: bool(degraded()), "the too-big group Degraded", 90)
    cond = degraded()
    assert "needs" in cond["message"] and "bytes" in cond["message"] and "available" in cond["message"], cond
    assert fleet.condition("huge", "Ready").get("status") == "False"
    assert "huge" in (pool_obj(fleet).get("status") or {}).get("refusedGroups", {})
    # Offered by no pod, so not by the router either: a client is not shown a model it cannot use.
    assert f"{fleet.ns}/huge-chat" not in {m["id"] for m in client.get("/v1/models").json()["data"]}
    for group in GROUPS:  # the others keep serving, and stay Ready
        model = group["spec"]["models"][0]
        assert ask(client, model["id"], model.get("task", "chat")).status_code == 200
        assert fleet.ready(group["metadata"]["name"])
    fleet.kubectl("delete", "mg", "huge", "-n", fleet.ns)


def test_the_new_kind_grows_each_identity_by_exactly_its_job(fleet: Fleet) -> None:
    """The operator may read GpuPools and write their status; nobody else may write them, and a
    pool's pod servers may write only Leases, like a dedicated group's."""
    from test_operator import _can

    ns, sys_ns, release = fleet.ns, fleet.system_ns, fleet.release
    operator = f"system:serviceaccount:{sys_ns}:{release}-gpufleet-operator"
    router = f"system:serviceaccount:{sys_ns}:{release}-gpufleet-router"
    pool_sa = f"system:serviceaccount:{ns}:{POOL_NAME}-pod-server"
    expect = [
        (operator, "watch gpupools.gpufleet.io", True),
        (operator, "patch gpupools.gpufleet.io:status", True),
        (operator, "create gpupools.gpufleet.io", False),
        (operator, "delete gpupools.gpufleet.io", False),
        (operator, "update gpupools.gpufleet.io", False),
        (router, "patch gpupools.gpufleet.io", False),
        (router, "patch gpupools.gpufleet.io:status", False),
        (pool_sa, "patch leases.coordination.k8s.io", True),
        (pool_sa, "list pods", False),
        (pool_sa, "patch gpupools.gpufleet.io", False),
        (pool_sa, "patch modelgroups.gpufleet.io", False),
        (pool_sa, "patch configmaps", False),
    ]
    wrong = [f"{who.rsplit(':', 1)[-1]} {'cannot' if want else 'can'} {rule}"
             for who, rule, want in expect if _can(fleet, who, *rule.split(), ns) != want]
    assert not wrong, wrong


# ---- demand: scale from zero, a hot group, back to zero (issue 20) ------------------------------

ELASTIC_EXAMPLE = ROOT / "deploy" / "examples" / "gpupool-autoscaling.yaml"


def _elastic() -> list[dict[str, Any]]:
    """The example, with delays short enough for a test (the rules are the same)."""
    docs = [d for d in yaml.safe_load_all(ELASTIC_EXAMPLE.read_text()) if d]
    for d in docs:
        if d["kind"] == "GpuPool":
            # One sequence per device: the closed loop below asks for more devices than the pool's two, even
            # when a switch (a model load here) costs many times a request (need = sequences / (1 + s/t)).
            d["spec"]["autoscaling"].update(maxReplicas=2, targetSequencesPerDevice=1, scaleDownDelaySeconds=8)
            d["spec"]["switch"].update(releaseDelaySeconds=3, minResidencySeconds=0)
            d["spec"]["resources"] = {"requests": {"cpu": "100m", "memory": "256Mi"}}
    return docs


def elastic(fleet: Fleet) -> dict[str, Any]:
    obj = fleet.get(f"/apis/gpufleet.io/v1alpha1/namespaces/{fleet.ns}/gpupools/elastic")
    assert obj is not None
    return obj


def elastic_pods(fleet: Fleet) -> list[dict[str, Any]]:
    path = f"/api/v1/namespaces/{fleet.ns}/pods?labelSelector={labels.LABEL_POOL}=elastic"
    return [p for p in fleet.api.get(path)["items"] if not p["metadata"].get("deletionTimestamp")]


def sts_replicas(fleet: Fleet) -> int:
    sts = fleet.get(f"/apis/apps/v1/namespaces/{fleet.ns}/statefulsets/elastic")
    return int((sts or {}).get("spec", {}).get("replicas", -1))


def events_of(fleet: Fleet, name: str, kind: str = "GpuPool") -> list[str]:
    selector = f"involvedObject.name={name},involvedObject.kind={kind}"
    items = fleet.api.get(f"/api/v1/namespaces/{fleet.ns}/events?fieldSelector={selector}")["items"]
    return [f"{e['reason']}: {e['message']}" for e in items]


def test_a_pool_at_zero_answers_its_first_request_then_follows_demand_back_to_zero(
    fleet: Fleet, client: httpx.Client
) -> None:
    docs = _elastic()
    fleet.kubectl("apply", "-n", fleet.ns, "-f", "-", stdin=yaml.safe_dump_all(docs))
    model = f"{fleet.ns}/tiny-chat-burst"
    fleet.wait(lambda: model in {m["id"] for m in client.get("/v1/models").json()["data"]},
               "the router lists the pool's group at zero pods (from the ModelGroup, read-only)", 60)
    fleet.wait(lambda: sts_replicas(fleet) == 0, "the pool's StatefulSet, at zero pods", 60)
    assert elastic_pods(fleet) == []

    # The first request: the client sees the wait (SSE comments), then the pod's answer.
    body = {"model": "tiny-chat-burst", "stream": True, "max_tokens": 8,
            "messages": [{"role": "user", "content": "hello"}]}
    with client.stream("POST", "/v1/chat/completions", json=body, timeout=240) as r:
        assert r.status_code == 200
        lines = [line for line in r.iter_lines() if line]
    assert lines[0] == ": loading", lines[:3]
    data = [line for line in lines if line.startswith("data: ")]
    assert data[-1] == "data: [DONE]" and any('"content"' in line for line in data), lines[-5:]
    assert not any('"error"' in line for line in data), data
    assert sts_replicas(fleet) >= 1
    assert any(e.startswith("ScaledUp: pods 0 -> 1") for e in events_of(fleet, "elastic"))

    # Hot: closed-loop clients keep 12 sequences in flight until the pool holds the group on 2 devices.
    stop = threading.Event()
    failures: list[str] = []

    def load() -> None:
        with httpx.Client(base_url=fleet.router_url, timeout=240) as c:
            while not stop.is_set():
                r = c.post("/v1/chat/completions", json={
                    "model": "tiny-chat-burst", "max_tokens": 48, "ignore_eos": True,
                    "messages": [{"role": "user", "content": "go on"}]})
                if r.status_code != 200:
                    failures.append(f"{r.status_code} {r.text[:200]}")

    def residency() -> dict[str, tuple[int, int]]:
        rows = (elastic(fleet).get("status") or {}).get("residency") or []
        return {r["group"]: (r["current"], r["desired"]) for r in rows}

    workers = [threading.Thread(target=load, daemon=True) for _ in range(12)]
    for w in workers:
        w.start()
    try:
        fleet.wait(lambda: residency().get("burst", (0, 0))[1] == 2 and len(elastic_pods(fleet)) == 2,
                   "the hot group is desired on 2 devices, on 2 pods", 180)
    finally:
        stop.set()
        for w in workers:
            w.join(timeout=240)
    assert failures == []
    assert (elastic(fleet)["status"].get("desiredReplicas")) == 2

    # Cool: the devices are given back, then the pods, down to zero.
    fleet.wait(lambda: sts_replicas(fleet) == 0 and elastic_pods(fleet) == [],
               "the idle pool scaled back to zero pods", 120)
    # Events are posted apart from the change they explain: wait for them rather than assume an order.
    fleet.wait(lambda: any(e.startswith("ScaledDown") and e.endswith("down to zero: idle)")
                           for e in events_of(fleet, "elastic")), "the scale-to-zero event", 60)
    events = events_of(fleet, "elastic")
    assert any("group burst: 2 -> " in e for e in events if e.startswith("ResidencyChanged")), events
    # Listed at zero again, and never a 404 meanwhile.
    assert model in {m["id"] for m in client.get("/v1/models").json()["data"]}
    fleet.kubectl("delete", "-n", fleet.ns, "-f", "-", stdin=yaml.safe_dump_all(docs))
