"""The operator, CRD and chart on a real control plane (tests/e2e/cluster): helm install,
kubectl apply of deploy/examples/modelgroup.yaml, Ready pods on fake GPU nodes, the router
serving real requests from real pod-server processes, and the operator keeping it so.

How the pieces run (kwok runs no containers, see operator_support):
- the chart is installed as users install it, but with operator.replicas=0 and
  router.replicas=0: no image can run under kwok. Instead `gpufleet operator` and
  `gpufleet router` run here as processes, with the env of the chart's Deployments and a
  token of the chart's ServiceAccounts, so they can do exactly what the chart grants;
- every pod-server pod that kwok marks running gets a real `gpufleet serve` process bound
  to the pod's loopback IP, with the pod's env and ConfigMap, writing its status annotation
  with its own ServiceAccount's token.
The models' namespace enforces the `restricted` Pod Security Standard, so the API server
itself checks the operator's pods.

Against an existing cluster (GPUFLEET_E2E_KUBECONFIG, or KUBECONFIG with GPUFLEET_E2E_EXISTING=1)
nothing is built: kubectl and helm come from GPUFLEET_K8S_BIN or PATH, the operator watches
only the test's namespace, and pods with non-loopback IPs are left to their kubelet (set
GPUFLEET_E2E_POD_SERVER_IMAGE to an image the cluster can pull; routing is then not tested).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from cluster import procs
from cluster.binaries import ensure_binaries
from cluster.kube import Api, ApiError
from operator_support import (
    LocalComponent,
    PodServerFarm,
    install_chart,
    local_control,
    service_account_token,
    try_get,
    which,
)

from gpufleet.api import labels

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "gpufleet"
EXAMPLE = ROOT / "deploy" / "examples" / "modelgroup.yaml"
IMAGE_MODELS = "/opt/gpufleet/demo-models"  # where the pod-server image keeps the demo models
READY_TIMEOUT = 240.0


class Fleet:
    """Everything the tests share: the cluster, the release, the local processes."""

    def __init__(self, cluster: Any, bin_dir: Path | None, workdir: Path) -> None:
        self.c = cluster
        self.api = cluster.api
        self.bin_dir = bin_dir
        self.workdir = workdir
        suffix = uuid.uuid4().hex[:5]
        self.release = f"gf{suffix}"
        self.system_ns = f"{self.release}-system"
        self.ns = f"{self.release}-models"
        self.ns2 = f"{self.release}-team-b"  # a second tenant, served by the same router
        self.operator: LocalComponent | None = None
        self.operator_deployment: dict[str, Any] = {}
        self.router: LocalComponent | None = None
        self.farm: PodServerFarm | None = None
        self.farm2: PodServerFarm | None = None
        self.router_url = ""
        self.health_url = ""
        self.metrics_url = ""
        self.nodes: list[str] = []

    # ---- tools ---------------------------------------------------------------------------

    def run(self, tool: str, *args: str, check: bool = True, stdin: str | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
        argv = [which(tool, self.bin_dir), "--kubeconfig", self.c.kubeconfig, *args]
        result = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"{tool} {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
        return result

    def kubectl(self, *args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
        return self.run("kubectl", *args, **kw)

    def get(self, path: str) -> dict[str, Any] | None:
        return try_get(self.api, path)

    def group(self, name: str, ns: str | None = None) -> dict[str, Any]:
        obj = self.get(f"/apis/gpufleet.io/v1alpha1/namespaces/{ns or self.ns}/modelgroups/{name}")
        assert obj is not None, f"ModelGroup {name} is gone"
        return obj

    def pods(self, group: str, ns: str | None = None) -> list[dict[str, Any]]:
        selector = f"{labels.LABEL_MODEL_GROUP}={group}"
        path = f"/api/v1/namespaces/{ns or self.ns}/pods?labelSelector={selector}"
        items: list[dict[str, Any]] = self.api.get(path)["items"]
        return [p for p in items if not p["metadata"].get("deletionTimestamp")]

    def condition(self, name: str, kind: str, ns: str | None = None) -> dict[str, Any]:
        for cond in (self.group(name, ns).get("status") or {}).get("conditions") or []:
            if cond["type"] == kind:
                return dict(cond)
        return {}

    def ready(self, name: str, ns: str | None = None) -> bool:
        group = self.group(name, ns)
        status = group.get("status") or {}
        return (self.condition(name, "Ready", ns).get("status") == "True"
                and status.get("observedGeneration") == group["metadata"]["generation"])

    def watched(self) -> list[procs.Process]:
        return [p.proc for p in (self.operator, self.router) if p and p.proc]

    def wait(self, check: Any, what: str, timeout: float = 60) -> None:
        try:
            procs.wait_until(check, timeout, what, self.watched(), interval=0.5)
        except procs.StartupError as exc:
            raise AssertionError(f"{exc}\n{self.diagnostics()}") from None

    def diagnostics(self) -> str:
        out = [self.kubectl("get", "mg,sts,pods", "-n", self.ns, "-o", "wide", check=False).stdout]
        if self.operator:
            out.append("operator log (tail):\n" + "\n".join(self.operator.log().splitlines()[-25:]))
        if self.farm and self.farm.errors:
            out.append("pod server farm: " + "\n".join(self.farm.errors[-5:]))
        return "\n".join(out)

    def events(self, name: str) -> list[dict[str, Any]]:
        selector = f"involvedObject.kind=ModelGroup,involvedObject.name={name}"
        path = f"/api/v1/namespaces/{self.ns}/events?fieldSelector={selector}"
        items: list[dict[str, Any]] = self.api.get(path)["items"]
        return items


def _free_port() -> int:
    return procs.free_port()


def _image_sets() -> list[str]:
    """Helm values for a pod-server image an existing cluster can pull, when one is given."""
    if not os.environ.get("GPUFLEET_E2E_POD_SERVER_IMAGE"):
        return []
    repo, _, tag = os.environ["GPUFLEET_E2E_POD_SERVER_IMAGE"].rpartition(":")
    return ["image.registry=", f"podServer.image.repository={repo}", f"podServer.image.tag={tag}"]


@pytest.fixture(scope="module")
def fleet(test_cluster: Any, demo_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    c = test_cluster
    t0 = time.monotonic()
    bin_dir = Path(os.environ["GPUFLEET_K8S_BIN"]) if os.environ.get("GPUFLEET_K8S_BIN") else None
    if bin_dir is None and not c.existing:
        bin_dir = ensure_binaries()
    f = Fleet(c, bin_dir, tmp_path_factory.mktemp("operator-e2e"))
    for i in range(2):
        name = f"{f.release}-gpu-{i}"
        c.add_gpu_node(name, gpus=4, labels={labels.GPU_PRODUCT_LABEL: "NVIDIA-H100-80GB-HBM3"})
        f.nodes.append(name)
    for ns, restricted in ((f.system_ns, True), (f.ns, True), (f.ns2, True)):
        body = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns, "labels": {
            "pod-security.kubernetes.io/enforce": "restricted" if restricted else "baseline"}}}
        c.api.create("/api/v1/namespaces", body)
    install_chart(which("kubectl", bin_dir), which("helm", bin_dir), c.kubeconfig, c.api, f.release, f.system_ns,
                  [f.ns, f.ns2], existing=c.existing, extra_sets=_image_sets())
    control = local_control(c.api, f.release, f.system_ns, f.workdir)
    f.health_url, f.metrics_url, f.router_url = control.health_url, control.metrics_url, control.router_url
    f.operator_deployment, f.operator, f.router = control.operator_deployment, control.operator, control.router
    f.farm = PodServerFarm(c.api, f.ns, f.workdir / "pods", {IMAGE_MODELS: demo_models.parent})
    f.farm2 = PodServerFarm(c.api, f.ns2, f.workdir / "pods2", {IMAGE_MODELS: demo_models.parent})
    with f.operator, f.router, f.farm, f.farm2:
        print(f"\n[e2e] {f.release} installed, operator/router started in {time.monotonic() - t0:.1f}s")
        try:
            yield f
        finally:
            print(f"\n[e2e] pod-server processes started: {len(f.farm.started)}; errors: {f.farm.errors[-3:]}")
            for ns in (f.ns, f.ns2):
                for kind in ("mg", "gpupools"):
                    f.kubectl("delete", kind, "--all", "-n", ns, "--wait=false", check=False)
    f.run("helm", "uninstall", f.release, "-n", f.system_ns, "--wait", "--timeout", "60s", check=False)
    for ns in (f.ns, f.ns2, f.system_ns):
        f.kubectl("delete", "namespace", ns, "--wait=false", check=False)


# ---- the tests, in order: they share one installation ------------------------------------------

def test_chart_installed_least_privilege_workloads(fleet: Fleet) -> None:
    """helm install gave the CRD, the RBAC and the Deployments; their pods would pass the
    `restricted` standard (server-side dry run of a pod from each Deployment's template)."""
    crd = fleet.get("/apis/apiextensions.k8s.io/v1/customresourcedefinitions/modelgroups.gpufleet.io")
    assert crd is not None and crd["spec"]["versions"][0]["subresources"]["scale"]
    for component in ("operator", "router"):
        path = f"/apis/apps/v1/namespaces/{fleet.system_ns}/deployments/{fleet.release}-gpufleet-{component}"
        dep = fleet.api.get(path)
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"dry-run-{component}"},
               "spec": dep["spec"]["template"]["spec"]}
        fleet.api.request("POST", f"/api/v1/namespaces/{fleet.system_ns}/pods?dryRun=All", pod)
    bad = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "dry-run-root"},
           "spec": {"containers": [{"name": "c", "image": "x", "securityContext": {"runAsUser": 0}}]}}
    result = fleet.kubectl("create", "--dry-run=server", "-n", fleet.ns, "-f", "-", stdin=json.dumps(bad), check=False)
    assert result.returncode != 0 and "restricted" in result.stderr  # the namespace does enforce it


INVALID = [
    ("negative-replicas", {"replicas": -1}, "should be greater than or equal to 0"),
    ("gpus-in-resources", {"resources": {"limits": {"nvidia.com/gpu": 2}}}, "set GPUs with spec.gpusPerPod"),
    ("duplicate-ids", {"models": [{"id": "a", "source": "/a"}, {"id": "a", "source": "/b"}]}, "Duplicate value"),
    ("bad-model-id", {"models": [{"id": "no spaces", "source": "/a"}]}, "spec.models[0].id"),
    ("unknown-field", {"gpus": 2}, 'unknown field "spec.gpus"'),
    ("x" * 53, {}, "at most 52 characters"),
    ("visible-devices", {"env": [{"name": "NVIDIA_VISIBLE_DEVICES", "value": "all"}]},
     "*_VISIBLE_DEVICES is set by the GPU runtime"),
]


@pytest.mark.parametrize(("name", "spec", "message"), INVALID, ids=[i[0][:20] for i in INVALID])
def test_invalid_modelgroup_is_rejected_by_the_api_server(fleet: Fleet, name: str, spec: dict[str, Any],
                                                         message: str) -> None:
    doc = {"apiVersion": "gpufleet.io/v1alpha1", "kind": "ModelGroup", "metadata": {"name": name},
           "spec": {"models": [{"id": "m", "source": "/m"}], **spec}}
    result = fleet.kubectl("apply", "-n", fleet.ns, "-f", "-", stdin=yaml.safe_dump(doc), check=False)
    assert result.returncode != 0, result.stdout
    assert message in result.stderr, result.stderr
    assert fleet.get(f"/apis/gpufleet.io/v1alpha1/namespaces/{fleet.ns}/modelgroups/{name}") is None


def test_example_becomes_ready_on_gpu_nodes(fleet: Fleet) -> None:
    t0 = time.monotonic()
    fleet.kubectl("apply", "-n", fleet.ns, "-f", str(EXAMPLE))
    fleet.wait(lambda: fleet.ready("alpha") and fleet.ready("beta"), "ModelGroups alpha and beta Ready",
               READY_TIMEOUT)
    print(f"\n[e2e] example Ready in {time.monotonic() - t0:.1f}s")
    status = fleet.group("alpha")["status"]
    assert (status["replicas"], status["readyReplicas"]) == (2, 2)
    assert {c["type"]: c["status"] for c in status["conditions"]} == {"Ready": "True", "Progressing": "False",
                                                                      "Degraded": "False"}
    pods = fleet.pods("alpha")
    assert sorted(p["metadata"]["name"] for p in pods) == ["alpha-0", "alpha-1"]
    for pod in pods:
        assert pod["spec"]["nodeName"] in fleet.nodes  # placed by kube-scheduler on a GPU node
        limits = pod["spec"]["containers"][0]["resources"]["limits"]
        assert limits["nvidia.com/gpu"] == "1"
        assert labels.STATUS_ANNOTATION not in (pod["metadata"].get("annotations") or {})  # pods are not written
        lease = fleet.api.get(f"/apis/coordination.k8s.io/v1/namespaces/{fleet.ns}/leases/{pod['metadata']['name']}")
        assert [r["uid"] for r in lease["metadata"]["ownerReferences"]] == [pod["metadata"]["uid"]]
        doc = json.loads(lease["metadata"]["annotations"][labels.STATUS_ANNOTATION])  # written by the pod server
        assert doc["pod"] == pod["metadata"]["name"] and doc["ready"] is True
        assert doc["node"] == pod["spec"]["nodeName"] and doc["url"] == f"http://{pod['status']['podIP']}:8000"
    placements = {(p["pod"], p["state"]) for p in status["placements"]}
    assert placements == {("alpha-0", "current"), ("alpha-1", "current")}
    table = fleet.kubectl("get", "mg", "-n", fleet.ns).stdout
    assert "tiny-chat-b,tiny-complete-b" in table and "True" in table, table
    # An event is posted after the change it reports: wait for it rather than assume an order.
    fleet.wait(lambda: {"Created", "Ready"} <= {e["reason"] for e in fleet.events("alpha")},
               "the Created and Ready events", 30)


def served_by(response: httpx.Response) -> str:
    """The pod the router sent the request to (the header may carry "namespace/name")."""
    return response.headers["x-served-by-pod"].rsplit("/", 1)[-1]


def test_router_routes_requests_to_the_groups_pods(fleet: Fleet) -> None:
    pods = fleet.pods("alpha") + fleet.pods("beta")
    if not all(p["status"].get("podIP", "").startswith("127.") for p in pods):
        pytest.skip("pod IPs are not loopback: the local router cannot reach them (a kubelet runs the pods)")
    with httpx.Client(base_url=fleet.router_url, timeout=60) as client:

        def knows_all() -> bool:
            ids = {m["id"] for m in client.get("/v1/models").json()["data"]}
            # Listed namespace-qualified; requests may use the bare id while one namespace serves it.
            if not {f"{fleet.ns}/{m}" for m in ("tiny-chat", "tiny-chat-b", "tiny-complete-b")} <= ids:
                return False
            # kwok marks pods Ready before their server listens, so the router may have
            # ejected them for a while (failed polls): wait until it routes to them again.
            pods = client.get("/api/fleet").json()["pods"]
            return all(pods.get(n, {}).get("state") == "ready" and not pods[n]["ejected"]
                       for n in ("alpha-0", "alpha-1", "beta-0"))

        fleet.wait(knows_all, "router lists every model and routes to every pod", 90)
        for _ in range(3):
            r = client.post("/v1/chat/completions", json={"model": "tiny-chat", "max_tokens": 4,
                                                          "messages": [{"role": "user", "content": "hello"}]})
            assert r.status_code == 200, r.text
            assert served_by(r) in {"alpha-0", "alpha-1"}
            assert r.json()["choices"][0]["message"]["role"] == "assistant"
        r = client.post("/v1/chat/completions", json={"model": "tiny-chat-b", "max_tokens": 4,
                                                      "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200 and served_by(r) == "beta-0", r.text
        r = client.post("/v1/completions", json={"model": "tiny-complete-b", "prompt": "The quick", "max_tokens": 4})
        assert r.status_code == 200 and served_by(r) == "beta-0", r.text
        assert r.headers.get("x-group-switch") == "false"  # beta was already resident: no load on the request path


def test_a_pod_server_identity_can_write_only_its_own_status(fleet: Fleet) -> None:
    """The token a pod server runs with (bound to its pod) cannot change another pod, nor
    its own, nor another pod's status Lease; its own status still reaches the router."""
    pods = {p["metadata"]["name"]: p for p in fleet.pods("alpha")}
    me, other = pods["alpha-0"], pods["alpha-1"]
    token = service_account_token(fleet.api, fleet.ns, me["spec"]["serviceAccountName"], me)
    as_pod = Api(fleet.api.url, token, fleet.api.ca_file, insecure=fleet.api.insecure)
    merge = "application/merge-patch+json"
    evil = {"metadata": {"labels": {labels.LABEL_COMPONENT: labels.COMPONENT_POD_SERVER}},
            "spec": {"containers": [{"name": "pod-server", "image": "attacker.example/evil:1"}]}}
    for target in (other, me):
        with pytest.raises(ApiError) as refused:
            as_pod.request("PATCH", f"/api/v1/namespaces/{fleet.ns}/pods/{target['metadata']['name']}", evil,
                           content_type=merge)
        assert refused.value.status == 403, refused.value
    assert fleet.api.get(f"/api/v1/namespaces/{fleet.ns}/pods/alpha-1")["spec"]["containers"][0]["image"] == \
        other["spec"]["containers"][0]["image"]
    leases = f"/apis/coordination.k8s.io/v1/namespaces/{fleet.ns}/leases"
    forged = {"metadata": {"annotations": {labels.STATUS_ANNOTATION: "{}"}}}
    for name in ("alpha-1", "beta-0"):  # a sibling's Lease, another group's Lease
        with pytest.raises(ApiError) as refused:
            as_pod.request("PATCH", f"{leases}/{name}", forged, content_type=merge)
        assert refused.value.status == 403 and "only the Lease of its own pod (alpha-0)" in str(refused.value)
    with pytest.raises(ApiError) as refused:  # nor a new Lease under another name
        as_pod.create(leases, {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": {"name": "x"}})
    assert refused.value.status == 403, refused.value
    unbound = Api(fleet.api.url, service_account_token(fleet.api, fleet.ns, me["spec"]["serviceAccountName"]),
                  fleet.api.ca_file, insecure=fleet.api.insecure)
    with pytest.raises(ApiError) as refused:  # a token bound to no pod writes no Lease at all
        unbound.request("PATCH", f"{leases}/alpha-0", forged, content_type=merge)
    assert refused.value.status == 403 and "its token names no pod" in str(refused.value)
    # Its own Lease it may write (what the pod server does); the router reads status from it.
    own = fleet.api.get(f"{leases}/alpha-0")["metadata"]["annotations"][labels.STATUS_ANNOTATION]
    as_pod.request("PATCH", f"{leases}/alpha-0", {"metadata": {"annotations": {labels.STATUS_ANNOTATION: own}}},
                   content_type=merge)
    with httpx.Client(base_url=fleet.router_url, timeout=10) as client:
        fleet.wait(lambda: client.get("/api/fleet").json()["pods"]["alpha-0"]["status_from"] == "kubernetes",
                   "the router has alpha-0's status from its Lease", 30)


def test_an_exclusive_lease_is_a_lease_object_every_router_replica_honours(fleet: Fleet) -> None:
    """POST /api/leases makes a coordination.k8s.io Lease in the router's namespace; a second
    router replica (or the same one restarted) sees it, honours it and refuses the device
    to others; releasing it through either frees it everywhere. Neither a pod server's
    identity nor the router's can cross into the other's kind of Lease."""
    router_leases = f"/apis/coordination.k8s.io/v1/namespaces/{fleet.system_ns}/leases"
    merge = "application/merge-patch+json"
    assert fleet.router is not None
    with httpx.Client(base_url=fleet.router_url, timeout=30) as client:
        fleet.wait(lambda: "alpha-0" in client.get("/api/fleet").json()["pods"], "the router knows alpha-0", 90)
        device = next(iter(client.get("/api/fleet").json()["pods"]["alpha-0"]["devices"]))
        target = f"alpha-0/{device}"
        r = client.post("/api/leases", json={"target": target, "ttl_s": 120})
        assert r.status_code == 201, r.text
        lease = r.json()
        obj = fleet.api.get(f"{router_leases}/{lease['id']}")
        assert obj["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "gpufleet-router"
        assert obj["spec"]["holderIdentity"] == lease["id"] and obj["spec"]["leaseDurationSeconds"] == 120
        assert json.loads(obj["metadata"]["annotations"][labels.LEASE_DEVICES_ANNOTATION]) == [target]
        chat = {"model": "tiny-chat", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
        r = client.post("/v1/chat/completions", json={**chat, "exclusive_gpu": target})
        assert r.status_code == 409 and r.json()["error"]["code"] == "device_leased", r.text

        # A second replica (what a restarted router is too): it lists the lease from the API server.
        port = _free_port()
        second = LocalComponent(fleet.api, fleet.router.deployment, fleet.workdir / "router-2",
                                {"HOST": "127.0.0.1", "PORT": str(port)})
        with second, httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as other:

            def second_holds_it() -> bool:
                try:
                    pods = other.get("/api/fleet").json()["pods"]
                    listed = [x["id"] for x in other.get("/api/leases").json()["data"]]
                except httpx.HTTPError:
                    return False
                return "alpha-0" in pods and listed == [lease["id"]]

            fleet.wait(second_holds_it, "the second router replica lists the lease", 60)
            r = other.post("/v1/chat/completions", json={**chat, "exclusive_gpu": target})
            assert r.status_code == 409, r.text
            r = other.post("/api/leases", json={"target": target, "ttl_s": 30})  # the device is taken
            assert r.status_code == 409 and r.json()["error"]["code"] == "device_leased", r.text

            renewed = other.post(f"/api/leases/{lease['id']}/renew", json={"ttl_s": 300})
            assert renewed.status_code == 200 and renewed.json()["ttl_s"] == 300
            fleet.wait(lambda: client.get(f"/api/leases/{lease['id']}").json().get("ttl_s") == 300,
                       "the first replica sees the renewal", 30)

            # Identities: a pod server may not turn its status Lease into a router lease, nor touch
            # the router's; the router may not write a Lease that is not one of its own.
            pod = next(p for p in fleet.pods("alpha") if p["metadata"]["name"] == "alpha-0")
            as_pod = Api(fleet.api.url, service_account_token(fleet.api, fleet.ns, pod["spec"]["serviceAccountName"],
                                                              pod), fleet.api.ca_file, insecure=fleet.api.insecure)
            pod_leases = f"/apis/coordination.k8s.io/v1/namespaces/{fleet.ns}/leases"
            disguise = {"metadata": {"labels": {"app.kubernetes.io/managed-by": "gpufleet-router"}}}
            with pytest.raises(ApiError) as refused:
                as_pod.request("PATCH", f"{pod_leases}/alpha-0", disguise, content_type=merge)
            assert refused.value.status == 403 and "only the gpufleet router" in str(refused.value)
            with pytest.raises(ApiError) as refused:
                as_pod.request("DELETE", f"{router_leases}/{lease['id']}")
            assert refused.value.status == 403
            router_sa = fleet.router.deployment["spec"]["template"]["spec"]["serviceAccountName"]
            as_router = Api(fleet.api.url, service_account_token(fleet.api, fleet.system_ns, router_sa),
                            fleet.api.ca_file, insecure=fleet.api.insecure)
            with pytest.raises(ApiError) as refused:
                as_router.create(router_leases, {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                                                 "metadata": {"name": "not-a-router-lease"}})
            assert refused.value.status == 403 and "only its own leases" in str(refused.value)

            # Released through the second replica: the object goes, and the first replica frees the device.
            assert other.delete(f"/api/leases/{lease['id']}").status_code == 200
            assert try_get(fleet.api, f"{router_leases}/{lease['id']}") is None
            fleet.wait(lambda: client.get("/api/leases").json()["data"] == [], "the first replica drops the lease", 30)

            # Both replicas asked for the device at once: at most one wins, and only its object stays.
            selector = "labelSelector=app.kubernetes.io%2Fmanaged-by%3Dgpufleet-router"
            for _ in range(3):
                with ThreadPoolExecutor(2) as pool:
                    answers = list(pool.map(lambda c: c.post("/api/leases", json={"target": target, "ttl_s": 60}),
                                            (client, other)))
                assert sorted(r.status_code for r in answers) in ([201, 409], [409, 409]), [r.text for r in answers]
                won = [r.json()["id"] for r in answers if r.status_code == 201]
                names = [o["metadata"]["name"] for o in fleet.api.get(f"{router_leases}?{selector}")["items"]]
                assert names == won
                for lid in won:
                    assert client.delete(f"/api/leases/{lid}").status_code == 200
                fleet.wait(lambda: client.get("/api/leases").json()["data"] == []
                           and other.get("/api/leases").json()["data"] == [], "both replicas see it released", 30)
        r = client.post("/api/leases", json={"target": target, "ttl_s": 2})  # and a short one simply expires
        assert r.status_code == 201, r.text
        fleet.wait(lambda: client.get("/api/leases").json()["data"] == [], "the 2 s lease expires", 30)
        if all(p["status"].get("podIP", "").startswith("127.") for p in fleet.pods("alpha")):
            # (kwok marks pods Ready before their server listens: the router may have ejected it a while)
            fleet.wait(lambda: client.get("/api/fleet").json()["pods"]["alpha-0"]["state"] == "ready",
                       "the router routes to alpha-0", 90)
            r = client.post("/v1/chat/completions", json={**chat, "exclusive_gpu": target})
            assert r.status_code == 200 and served_by(r) == "alpha-0", r.text


def test_a_group_with_pull_secrets_runtime_class_volumes_and_a_model_cache_runs(fleet: Fleet) -> None:
    """The pod-template fields of a real GPU cluster, accepted by the API server (the pod
    passes the namespace's `restricted` standard too), scheduled and Ready; the per-pod
    model cache claim survives the pod's replacement."""
    fleet.api.create("/apis/node.k8s.io/v1/runtimeclasses", {
        "apiVersion": "node.k8s.io/v1", "kind": "RuntimeClass", "metadata": {"name": f"{fleet.release}-nvidia"},
        "handler": "nvidia"})
    storage_class = f"{fleet.release}-local"
    fleet.api.create("/api/v1/persistentvolumes", {
        "apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": f"{fleet.release}-pv-0"},
        "spec": {"capacity": {"storage": "10Gi"}, "accessModes": ["ReadWriteOnce"], "storageClassName": storage_class,
                 "persistentVolumeReclaimPolicy": "Retain", "hostPath": {"path": "/tmp/unused"}}})
    fleet.api.create(f"/api/v1/namespaces/{fleet.ns}/secrets", {
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "regcred"}, "type": "kubernetes.io/dockerconfigjson",
        "data": {".dockerconfigjson": "eyJhdXRocyI6e319"}})
    doc = {"apiVersion": "gpufleet.io/v1alpha1", "kind": "ModelGroup", "metadata": {"name": "gamma"}, "spec": {
        "models": [{"id": "tiny-chat-g", "source": f"{IMAGE_MODELS}/tiny-chat", "task": "chat", "dtype": "float32"}],
        "imagePullSecrets": [{"name": "regcred"}],
        "runtimeClassName": f"{fleet.release}-nvidia",
        "podMetadata": {"labels": {"team": "a"}},
        "serviceAccount": {"annotations": {"example.com/identity": "gamma"}},
        "volumes": [{"name": "weights", "emptyDir": {"sizeLimit": "1Gi"}}],
        "volumeMounts": [{"name": "weights", "mountPath": "/weights", "readOnly": True}],
        "loadTimeoutSeconds": 600,
        "scratch": {"sizeLimit": "5Gi"},
        "modelCache": {"size": "10Gi", "storageClassName": storage_class,
                       "init": {"command": ["sh", "-c", "test -e $(MODEL_CACHE_DIR)/ready || true"]}},
        "resources": {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"memory": "4Gi"}},
    }}
    fleet.kubectl("apply", "-n", fleet.ns, "-f", "-", stdin=yaml.safe_dump(doc))
    fleet.wait(lambda: fleet.ready("gamma"), "ModelGroup gamma Ready", READY_TIMEOUT)
    [pod] = fleet.pods("gamma")
    spec = pod["spec"]
    assert spec["runtimeClassName"] == f"{fleet.release}-nvidia" and spec["imagePullSecrets"] == [{"name": "regcred"}]
    assert [c["name"] for c in spec["initContainers"]] == ["fill-model-cache"]
    assert pod["metadata"]["labels"]["team"] == "a"
    claims = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in spec["volumes"]}
    assert claims["model-cache"] == "model-cache-gamma-0"
    claim_path = f"/api/v1/namespaces/{fleet.ns}/persistentvolumeclaims/model-cache-gamma-0"
    claim = fleet.api.get(claim_path)
    assert claim["status"]["phase"] == "Bound"
    sa = fleet.api.get(f"/api/v1/namespaces/{fleet.ns}/serviceaccounts/gamma-pod-server")
    assert sa["metadata"]["annotations"]["example.com/identity"] == "gamma"
    fleet.api.delete(f"/api/v1/namespaces/{fleet.ns}/pods/gamma-0")

    def replaced() -> bool:
        pods = fleet.pods("gamma")
        return bool(pods) and pods[0]["metadata"]["uid"] != pod["metadata"]["uid"] and fleet.ready("gamma")

    fleet.wait(replaced, "gamma-0 replaced and Ready", READY_TIMEOUT)
    assert fleet.api.get(claim_path)["metadata"]["uid"] == claim["metadata"]["uid"]  # the same cache
    fleet.kubectl("delete", "mg", "gamma", "-n", fleet.ns, "--wait=false")


def _tenant_group(name: str, *model_ids: str) -> str:
    models = [{"id": m, "source": f"{IMAGE_MODELS}/tiny-chat", "task": "chat", "dtype": "float32"} for m in model_ids]
    return yaml.safe_dump({"apiVersion": "gpufleet.io/v1alpha1", "kind": "ModelGroup", "metadata": {"name": name},
                           "spec": {"models": models, "resources": {"requests": {"cpu": "1", "memory": "2Gi"}}}})


def test_same_named_groups_of_two_namespaces_are_two_groups(fleet: Fleet) -> None:
    """team-a/chat and team-b/chat, each with a model `tiny-chat-t`: the router lists and
    routes them apart by namespace; a model id claimed twice in one namespace degrades the
    later ModelGroup, which serves only its other models."""
    for ns in (fleet.ns, fleet.ns2):
        fleet.kubectl("apply", "-n", ns, "-f", "-", stdin=_tenant_group("chat", "tiny-chat-t"))
    fleet.wait(lambda: fleet.ready("chat") and fleet.ready("chat", fleet.ns2), "chat Ready in both namespaces",
               READY_TIMEOUT)
    fleet.kubectl("apply", "-n", fleet.ns, "-f", "-", stdin=_tenant_group("chat-dup", "tiny-chat-t", "tiny-chat-u"))
    fleet.wait(lambda: fleet.condition("chat-dup", "Degraded").get("reason") == "ModelIdConflict",
               "chat-dup Degraded for the duplicate model id", 60)
    message = fleet.condition("chat-dup", "Degraded")["message"]
    assert "model id 'tiny-chat-t' is already served by ModelGroup 'chat'" in message, message
    assert fleet.condition("chat", "Degraded")["status"] == "False"
    ips = {ns: fleet.pods("chat", ns)[0]["status"]["podIP"] for ns in (fleet.ns, fleet.ns2)}
    with httpx.Client(base_url=fleet.router_url, timeout=60) as client:
        wanted = {f"{fleet.ns}/tiny-chat-t", f"{fleet.ns2}/tiny-chat-t", f"{fleet.ns}/tiny-chat-u"}

        def listed() -> bool:
            return wanted <= {m["id"] for m in client.get("/v1/models").json()["data"]}

        fleet.wait(listed, "the router lists both namespaces' models", 90)
        for ns, ip in ips.items():
            answers: list[httpx.Response] = []

            def served(ns: str = ns, answers: list[httpx.Response] = answers) -> bool:
                # The router lists a pod's models from its status before it counts the pod ready
                # (its endpoints and health checks converge on their own): until then it answers
                # 503 with Retry-After, as a client would see, and nothing else.
                r = client.post("/v1/chat/completions", json={"model": f"{ns}/tiny-chat-t", "max_tokens": 4,
                                                              "messages": [{"role": "user", "content": "hi"}]})
                answers.append(r)
                return r.status_code != 503

            fleet.wait(served, f"the router serves {ns}/tiny-chat-t", 60)
            assert all("retry-after" in a.headers for a in answers[:-1]), [a.text for a in answers]
            r = answers[-1]
            assert r.status_code == 200, r.text
            assert r.headers["x-served-by-pod"].endswith(f"@{ip}:8000"), (ns, r.headers["x-served-by-pod"])
        r = client.post("/v1/chat/completions", json={"model": "tiny-chat-t", "max_tokens": 4,
                                                      "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 404, r.text  # two namespaces serve it: the client must say which
        group = client.get("/api/fleet").json()["models"][f"{fleet.ns}/tiny-chat-t"]
        assert group == f"{fleet.ns}/chat"  # not chat-dup's
    for name in ("chat", "chat-dup"):
        fleet.kubectl("delete", "mg", name, "-n", fleet.ns, "--wait=false")
    fleet.kubectl("delete", "mg", "chat", "-n", fleet.ns2, "--wait=false")


def test_applying_again_changes_nothing(fleet: Fleet) -> None:
    def snapshot() -> dict[str, str]:
        out = {}
        for kind, path in (("sa", "/api/v1/namespaces/{ns}/serviceaccounts/alpha-pod-server"),
                           ("rb", "/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/rolebindings/alpha-pod-server"),
                           ("cm", "/api/v1/namespaces/{ns}/configmaps/alpha-model-groups"),
                           ("svc", "/api/v1/namespaces/{ns}/services/alpha")):
            obj = fleet.api.get(path.format(ns=fleet.ns))
            out[kind] = obj["metadata"]["resourceVersion"]
        out["sts-generation"] = str(fleet.api.get(f"/apis/apps/v1/namespaces/{fleet.ns}/statefulsets/alpha")
                                    ["metadata"]["generation"])
        out["pods"] = ",".join(sorted(p["metadata"]["uid"] for p in fleet.pods("alpha")))
        return out

    def api_calls() -> dict[str, float]:
        """The operator's own count of its API requests by verb (its reconciler's, not kopf's watches)."""
        text = httpx.get(fleet.metrics_url, timeout=5).text
        return {line.split('verb="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                if line.startswith("gpufleet_operator_api_requests_total{")}

    before, calls = snapshot(), api_calls()
    for _ in range(3):
        assert "unchanged" in fleet.kubectl("apply", "-n", fleet.ns, "-f", str(EXAMPLE)).stdout
    time.sleep(6.5)  # two resync periods of the operator (3 s in these tests)
    assert snapshot() == before
    # Every group was re-checked twice meanwhile, from the watch caches: not one GET, LIST or apply.
    assert {k: v for k, v in api_calls().items() if k in ("get", "list", "apply")} == \
        {k: v for k, v in calls.items() if k in ("get", "list", "apply")}


def test_deleted_pod_comes_back(fleet: Fleet) -> None:
    old = next(p for p in fleet.pods("alpha") if p["metadata"]["name"] == "alpha-0")
    fleet.api.delete(f"/api/v1/namespaces/{fleet.ns}/pods/alpha-0")

    def replaced() -> bool:
        pods = {p["metadata"]["name"]: p for p in fleet.pods("alpha")}
        new = pods.get("alpha-0")
        return bool(new and new["metadata"]["uid"] != old["metadata"]["uid"] and fleet.ready("alpha")
                    and fleet.group("alpha")["status"]["readyReplicas"] == 2)

    fleet.wait(replaced, "alpha-0 recreated and alpha Ready again", READY_TIMEOUT)


HOLD = "gpufleet.io/e2e-hold"
MERGE_PATCH = "application/merge-patch+json"


def _evict(fleet: Fleet, name: str) -> int:
    """What `kubectl drain` does for each pod: the Eviction API, which honours PodDisruptionBudgets."""
    body = {"apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": name, "namespace": fleet.ns}}
    try:
        fleet.api.create(f"/api/v1/namespaces/{fleet.ns}/pods/{name}/eviction", body)
    except ApiError as exc:
        return exc.status
    return 201


def test_evictions_never_take_a_groups_last_ready_pod(fleet: Fleet) -> None:
    pdbs = f"/apis/policy/v1/namespaces/{fleet.ns}/poddisruptionbudgets"

    def allowed(name: str) -> int:
        return int((fleet.api.get(f"{pdbs}/{name}").get("status") or {}).get("disruptionsAllowed", -1))

    fleet.wait(lambda: fleet.ready("alpha") and allowed("alpha") == 1 and allowed("beta") == 0,
               "the disruption controller counted alpha (1 allowed) and beta (0 allowed)", 60)
    assert _evict(fleet, "beta-0") == 429  # its only pod: a drain waits instead of taking the group down
    # kwok readies a replacement pod at once, which the disruption controller may count before the
    # second eviction below; a finalizer holds the evicted pod (terminating, so not healthy) until the
    # test lets it go, as a slow kubelet's graceful shutdown would.
    pod_path = f"/api/v1/namespaces/{fleet.ns}/pods/alpha-0"
    fleet.api.request("PATCH", pod_path, {"metadata": {"finalizers": [HOLD]}}, content_type=MERGE_PATCH)
    try:
        assert _evict(fleet, "alpha-0") == 201  # one of two may go
        assert _evict(fleet, "alpha-1") == 429  # not the last ready one
        assert any(p["metadata"]["name"] == "alpha-1" for p in fleet.pods("alpha"))
    finally:
        fleet.api.request("PATCH", pod_path, {"metadata": {"finalizers": None}}, content_type=MERGE_PATCH)
    fleet.wait(lambda: fleet.ready("alpha") and fleet.group("alpha")["status"]["readyReplicas"] == 2,
               "alpha back to 2 ready pods", READY_TIMEOUT)


def test_hand_edited_children_are_put_back(fleet: Fleet) -> None:
    ns = fleet.ns
    sts = f"/apis/apps/v1/namespaces/{ns}/statefulsets/beta"
    cm = f"/api/v1/namespaces/{ns}/configmaps/beta-model-groups"
    svc = f"/api/v1/namespaces/{ns}/services/beta"
    original = fleet.api.get(cm)["data"]
    fleet.kubectl("scale", "statefulset", "beta", "-n", ns, "--replicas=3")
    fleet.kubectl("patch", "configmap", "beta-model-groups", "-n", ns, "--type=merge",
                  "-p", json.dumps({"data": {"model_groups.json": "{}"}}))
    fleet.api.delete(svc)
    fleet.wait(lambda: fleet.api.get(sts)["spec"]["replicas"] == 1, "StatefulSet replicas put back", 30)
    fleet.wait(lambda: fleet.api.get(cm)["data"] == original, "ConfigMap put back", 30)
    fleet.wait(lambda: fleet.get(svc) is not None, "Service recreated", 30)
    fleet.wait(lambda: "Restored" in [e["reason"] for e in fleet.events("beta")], "the Restored event", 30)


def test_gpus_per_pod_is_immutable(fleet: Fleet) -> None:
    result = fleet.kubectl("patch", "mg", "alpha", "-n", fleet.ns, "--type=merge",
                           "-p", '{"spec": {"gpusPerPod": 2}}', check=False)
    assert result.returncode != 0 and "gpusPerPod is immutable" in result.stderr, result.stderr


def test_scale_subresource(fleet: Fleet) -> None:
    fleet.kubectl("scale", "mg", "beta", "-n", fleet.ns, "--replicas=0")
    fleet.wait(lambda: not fleet.pods("beta") and fleet.condition("beta", "Ready").get("reason") == "ScaledToZero",
               "beta scaled to zero", 60)


def test_deleting_the_modelgroup_removes_what_it_owns(fleet: Fleet) -> None:
    fleet.kubectl("delete", "mg", "alpha", "-n", fleet.ns)
    selector = f"{labels.LABEL_MODEL_GROUP}=alpha"
    paths = [f"/api/v1/namespaces/{fleet.ns}/pods", f"/apis/apps/v1/namespaces/{fleet.ns}/statefulsets",
             f"/api/v1/namespaces/{fleet.ns}/services", f"/api/v1/namespaces/{fleet.ns}/configmaps",
             f"/api/v1/namespaces/{fleet.ns}/serviceaccounts",
             f"/apis/rbac.authorization.k8s.io/v1/namespaces/{fleet.ns}/rolebindings"]

    def gone() -> bool:
        return all(not fleet.api.get(f"{p}?labelSelector={selector}")["items"] for p in paths)

    fleet.wait(gone, "everything of alpha garbage-collected", 60)


def _can(fleet: Fleet, who: str, verb: str, resource: str, namespace: str) -> bool:
    """`kubectl auth can-i` as `who`; resource may be "kind", "kind/name" or "kind:subresource"."""
    resource, _, sub = resource.partition(":")
    args = ["auth", "can-i", verb, resource, f"--as={who}", "-n", namespace]
    if sub:
        args.append(f"--subresource={sub}")
    return fleet.kubectl(*args, check=False).returncode == 0


def test_service_accounts_can_do_their_job_and_nothing_more(fleet: Fleet) -> None:
    """Doing the job is proven above: the operator, the router and every pod server ran with
    the tokens of these ServiceAccounts. Here: nothing more (impersonation)."""
    ns, sys_ns, release = fleet.ns, fleet.system_ns, fleet.release
    operator = f"system:serviceaccount:{sys_ns}:{release}-gpufleet-operator"
    allowed = ["watch modelgroups.gpufleet.io", "patch modelgroups.gpufleet.io:status",
               "update modelgroups.gpufleet.io:finalizers", "create statefulsets.apps", "patch statefulsets.apps",
               "create configmaps", "patch configmaps", "create services", "create serviceaccounts",
               "create rolebindings", "list pods", "watch pods", "watch leases.coordination.k8s.io", "create events",
               "watch configmaps", "watch services", "watch serviceaccounts", "watch rolebindings",
               "watch poddisruptionbudgets.policy", "watch persistentvolumeclaims",
               f"bind clusterroles/{release}-gpufleet-pod-server"]
    denied = ["delete pods", "create pods", "patch pods", "get pods:log", "create pods:exec", "get secrets",
              "list secrets", "delete statefulsets.apps", "update statefulsets.apps", "delete configmaps",
              "delete modelgroups.gpufleet.io", "update modelgroups.gpufleet.io", "create modelgroups.gpufleet.io",
              "update modelgroups.gpufleet.io:status", "create deployments.apps", "create roles",
              "create clusterrolebindings", "bind clusterroles/cluster-admin", "bind clusterroles/admin",
              "escalate clusterroles", "patch nodes", "create namespaces", "impersonate serviceaccounts",
              "create serviceaccounts:token", "patch customresourcedefinitions.apiextensions.k8s.io"]
    pod_server = f"system:serviceaccount:{ns}:beta-pod-server"
    router = f"system:serviceaccount:{sys_ns}:{release}-gpufleet-router"
    expect = [(operator, rule, ns, True) for rule in allowed] + [(operator, rule, ns, False) for rule in denied]
    expect += [(pod_server, "patch leases.coordination.k8s.io", ns, True),
               (pod_server, "create leases.coordination.k8s.io", ns, True),
               (pod_server, "patch leases.coordination.k8s.io", sys_ns, False)]
    pod_server_denied = ["patch pods", "update pods", "delete pods", "create pods", "list pods", "patch pods:status",
                         "get secrets", "delete leases.coordination.k8s.io", "patch modelgroups.gpufleet.io",
                         "create serviceaccounts:token"]
    expect += [(pod_server, rule, ns, False) for rule in pod_server_denied]
    expect += [(router, "watch pods", ns, True), (router, "watch pods", sys_ns, False),
               (router, "watch leases.coordination.k8s.io", ns, True),
               (router, "create leases.coordination.k8s.io", sys_ns, True),  # its exclusive leases
               (router, "delete leases.coordination.k8s.io", sys_ns, True),
               (router, "create leases.coordination.k8s.io", ns, False),
               (router, "patch leases.coordination.k8s.io", ns, False)]
    # ModelGroups: read only (it lists groups at zero pods and holds their requests; issue 20), never written:
    # its waiting demand reaches the operator through GET /api/demand, not through the resources.
    expect += [(router, rule, ns, True) for rule in ["list modelgroups.gpufleet.io", "watch modelgroups.gpufleet.io"]]
    expect += [(router, rule, ns, False) for rule in [
        "patch pods", "get secrets", "patch modelgroups.gpufleet.io", "update modelgroups.gpufleet.io:status",
        "patch modelgroups.gpufleet.io:scale", "patch gpupools.gpufleet.io", "patch gpupools.gpufleet.io:scale",
        "patch statefulsets.apps", "patch statefulsets.apps:scale"]]
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda e: _can(fleet, e[0], *e[1].split(), e[2]), expect))
    wrong = [f"{who.rsplit(':', 1)[-1]} {'cannot' if want else 'can'} {rule} in {where}"
             for (who, rule, where, want), got in zip(expect, answers, strict=True) if got != want]
    assert not wrong, wrong


def test_two_operator_replicas_act_once(fleet: Fleet) -> None:
    """A second operator replica (the chart's env, so the same kopf peering) stands by: a new
    ModelGroup gets each child created once and each event posted once."""
    health = _free_port()
    second = LocalComponent(fleet.api, fleet.operator_deployment, fleet.workdir / "operator-2", {
        "GPUFLEET_OPERATOR_RESYNC_SECONDS": "3", "GPUFLEET_OPERATOR_HEALTH_HOST": "127.0.0.1",
        "GPUFLEET_OPERATOR_HEALTH_PORT": str(health)})
    env = {e["name"]: e.get("value") for e in
           fleet.operator_deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    peering = f"/apis/kopf.dev/v1/clusterkopfpeerings/{env['GPUFLEET_OPERATOR_PEERING']}"
    assert fleet.operator is not None
    with second:
        fleet.wait(lambda: len((fleet.get(peering) or {}).get("status") or {}) >= 2, "both replicas in the peering",
                   60)
        fleet.kubectl("apply", "-n", fleet.ns, "-f", "-", stdin=_tenant_group("delta", "tiny-chat-d"))
        fleet.wait(lambda: fleet.ready("delta"), "ModelGroup delta Ready", READY_TIMEOUT)
        time.sleep(7)  # two resync periods (3 s): a standby replica that acted would have by now
        reasons = [e["reason"] for e in fleet.events("delta")]
        assert sorted(r for r in reasons if r == "Created") == ["Created"] * 6, reasons
        assert reasons.count("Ready") == 1, reasons
        logs = [fleet.operator.log(), second.log()]
        created = [sum('"created child"' in line and '"group": "delta"' in line for line in log.splitlines())
                   for log in logs]
        assert sorted(created) == [0, 6], created  # one replica did all of it
    fleet.kubectl("delete", "mg", "delta", "-n", fleet.ns, "--wait=false")


def test_operator_is_healthy_and_logged_no_errors(fleet: Fleet) -> None:
    assert httpx.get(fleet.health_url, timeout=5).status_code == 200
    assert fleet.operator is not None
    errors = [line for line in fleet.operator.log().splitlines() if '"level": "error"' in line or "Traceback" in line]
    assert not errors, "\n".join(errors[:5])
