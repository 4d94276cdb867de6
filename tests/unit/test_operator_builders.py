"""Pure manifest builders: spec in, manifests out, no cluster."""

from __future__ import annotations

import json
from typing import Any

import kubernetes_validate
import pytest

from gpufleet.api import labels
from gpufleet.api.model_groups import ModelGroupsFile
from gpufleet.api.modelgroup import MODEL_CACHE_DIR, ModelGroupSpec
from gpufleet.operator.builders import (
    LABEL_GROUP_UID,
    BuildOptions,
    ModelGroupRef,
    build_children,
    build_configmap,
    build_disruption_budget,
    build_model_cache_claim,
    build_role_binding,
    build_service,
    build_service_account,
    build_statefulset,
    child_names,
    selector_labels,
)
from gpufleet.operator.drift import drift
from gpufleet.pod_server.settings import PodServerSettings

pytestmark = pytest.mark.unit

OPTIONS = BuildOptions(image="registry.example/pod-server:1", pod_server_cluster_role="rel-pod-server", instance="rel")


def ref(**spec: Any) -> ModelGroupRef:
    body = {"models": [{"id": "tiny-chat", "source": "/models/tiny-chat", "dtype": "float32"}], **spec}
    spec = ModelGroupSpec.model_validate(body)
    return ModelGroupRef(name="alpha", namespace="ml", uid="uid-1", spec=spec, generation=3)


def pod_spec(manifest: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = manifest["spec"]["template"]["spec"]
    return spec


def container(manifest: dict[str, Any]) -> dict[str, Any]:
    c: dict[str, Any] = pod_spec(manifest)["containers"][0]
    return c


def env_of(manifest: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container(manifest)["env"]}


def test_children_are_owned_labelled_and_valid() -> None:
    children = build_children(ref(), OPTIONS)
    assert [c["kind"] for c in children] == ["ServiceAccount", "RoleBinding", "ConfigMap", "Service",
                                             "PodDisruptionBudget", "StatefulSet"]
    for child in children:
        meta = child["metadata"]
        assert meta["namespace"] == "ml"
        assert meta["ownerReferences"] == [
            {"apiVersion": "gpufleet.io/v1alpha1", "kind": "ModelGroup", "name": "alpha", "uid": "uid-1",
             "controller": True, "blockOwnerDeletion": True}
        ]
        assert meta["labels"][labels.LABEL_MODEL_GROUP] == "alpha"
        assert meta["labels"][labels.LABEL_MANAGED_BY] == labels.MANAGED_BY
        assert meta["labels"][labels.LABEL_INSTANCE] == "rel"
        assert len(meta["annotations"][labels.SPEC_HASH_ANNOTATION]) == 16
        kubernetes_validate.validate(child, kubernetes_validate.latest_version(), strict=True)


def test_builders_are_deterministic() -> None:
    assert build_children(ref(), OPTIONS) == build_children(ref(), OPTIONS)


def test_gpu_pinning_and_resources() -> None:
    sts = build_statefulset(ref(gpusPerPod=2, resources={"requests": {"cpu": 2}, "limits": {"memory": "8Gi"}}), OPTIONS)
    res = container(sts)["resources"]
    assert res["limits"] == {"memory": "8Gi", "nvidia.com/gpu": "2"}
    # ephemeral-storage: room on the node for the scratch emptyDir, whose size is limited
    assert res["requests"] == {"cpu": "2", "nvidia.com/gpu": "2", "ephemeral-storage": "20Gi"}
    cache = next(v for v in pod_spec(sts)["volumes"] if v["name"] == "cache")
    assert cache["emptyDir"] == {"sizeLimit": "20Gi"}


def test_statefulset_shape() -> None:
    sts = build_statefulset(ref(replicas=3), OPTIONS)
    spec = sts["spec"]
    assert spec["replicas"] == 3
    assert spec["podManagementPolicy"] == "Parallel"
    assert spec["serviceName"] == child_names("alpha").service
    assert spec["selector"]["matchLabels"] == selector_labels("alpha")
    template_labels = spec["template"]["metadata"]["labels"]
    assert selector_labels("alpha").items() <= template_labels.items()
    assert template_labels[labels.LABEL_COMPONENT] == labels.COMPONENT_POD_SERVER  # what the router selects
    assert pod_spec(sts)["serviceAccountName"] == child_names("alpha").service_account
    assert container(sts)["image"] == "registry.example/pod-server:1"
    assert container(build_statefulset(ref(image="mine:2"), OPTIONS))["image"] == "mine:2"


def test_pod_server_env_matches_its_settings() -> None:
    env = env_of(build_statefulset(ref(workersPerGpu=3, cpuCacheSize=5, queueLimit=9, lazyLoad=True), OPTIONS))
    assert env["POD_NAME"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert env["POD_NAMESPACE"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    assert env["NODE_NAME"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    assert env["POD_IP"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    assert env["POD_URL"] == "http://$(POD_IP):8000"
    assert env["POD_UID"] == {"fieldRef": {"fieldPath": "metadata.uid"}}  # owner of the pod's status Lease
    assert env["STATUS_ANNOTATION"] == "true"
    assert env["DEVICES"] == "cuda:0"  # the pod's GPU, named: without CUDA the server fails, not falls back
    assert env_of(build_statefulset(ref(gpusPerPod=4), OPTIONS))["DEVICES"] == "cuda:0,cuda:1,cuda:2,cuda:3"
    # Every plain value parses with the pod server's own settings.
    plain = {k.lower(): v for k, v in env.items() if isinstance(v, str) and k.lower() in PodServerSettings.model_fields}
    settings = PodServerSettings(**{**plain, "devices": "cpu:0", "pod_url": "http://10.0.0.1:8000"})
    assert (settings.num_workers_per_gpu, settings.max_cpu_cached_models, settings.max_queue_per_device) == (3, 5, 9)
    assert settings.lazy_load_model is True and settings.status_annotation is True
    assert str(settings.model_groups) == "/etc/gpufleet/model_groups.json"


def test_user_env_comes_last_and_cannot_replace_ours() -> None:
    extra = [{"name": "HF_TOKEN", "value": "x"}, {"name": "POD_NAME", "value": "evil"}]
    sts = build_statefulset(ref(env=extra), OPTIONS)
    names = [e["name"] for e in container(sts)["env"]]
    assert names[-1] == "HF_TOKEN" and names.count("POD_NAME") == 1


def test_configmap_is_a_one_group_model_groups_file() -> None:
    cm = build_configmap(ref(), OPTIONS)
    doc = ModelGroupsFile.model_validate(json.loads(cm["data"]["model_groups.json"]))
    assert doc.default_group == "alpha"
    assert [m.id for m in doc.groups["alpha"].models] == ["tiny-chat"]
    assert doc.groups["alpha"].models[0].dtype == "float32"


def test_model_change_rolls_pods_but_replica_change_does_not() -> None:
    def config_hash(r: ModelGroupRef) -> str:
        return str(build_statefulset(r, OPTIONS)["spec"]["template"]["metadata"]["annotations"][
            labels.CONFIG_HASH_ANNOTATION])

    base = config_hash(ref())
    assert config_hash(ref(replicas=5)) == base
    assert config_hash(ref(models=[{"id": "other", "source": "/m"}])) != base


def test_service_is_headless_on_the_pod_port() -> None:
    svc = build_service(ref(), OPTIONS)
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["selector"] == selector_labels("alpha")
    assert svc["spec"]["ports"][0]["port"] == 8000


def test_role_binding_binds_the_chart_role_to_the_group_account() -> None:
    rb = build_role_binding(ref(), OPTIONS)
    assert rb["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "rel-pod-server"}
    assert rb["subjects"] == [{"kind": "ServiceAccount", "name": "alpha-pod-server", "namespace": "ml"}]


def test_restricted_pod_security() -> None:
    spec = pod_spec(build_statefulset(ref(), OPTIONS))
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = container(build_statefulset(ref(), OPTIONS))["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"] == {"drop": ["ALL"]}
    assert all("hostPath" not in v for v in spec["volumes"])


def test_scheduling_fields_pass_through() -> None:
    sts = build_statefulset(
        ref(nodeSelector={"nvidia.com/gpu.product": "L4"},
            tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            affinity={"nodeAffinity": {"x": 1}}),
        OPTIONS,
    )
    spec = pod_spec(sts)
    assert spec["nodeSelector"] == {"nvidia.com/gpu.product": "L4"}
    assert spec["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert spec["affinity"] == {"nodeAffinity": {"x": 1}}


def test_exclusive_keeps_other_groups_off_our_nodes() -> None:
    spec = pod_spec(build_statefulset(ref(exclusive=True, affinity={"podAntiAffinity": {}}), OPTIONS))
    terms = spec["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert terms[0]["topologyKey"] == "kubernetes.io/hostname"
    exprs = {e["key"]: (e["operator"], e["values"]) for e in terms[0]["labelSelector"]["matchExpressions"]}
    # Other namespaces' pod servers too, even a group of the same name: keyed by uid, not name.
    assert terms[0]["namespaceSelector"] == {}
    assert exprs[LABEL_GROUP_UID] == ("NotIn", ["uid-1"])
    assert pod_spec(build_statefulset(ref(), OPTIONS)) is not None
    template_labels = build_statefulset(ref(), OPTIONS)["spec"]["template"]["metadata"]["labels"]
    assert template_labels[LABEL_GROUP_UID] == "uid-1"
    assert "affinity" not in pod_spec(build_statefulset(ref(), OPTIONS))


def test_spec_hash_changes_only_with_content() -> None:
    a = build_statefulset(ref(), OPTIONS)["metadata"]["annotations"][labels.SPEC_HASH_ANNOTATION]
    b = build_statefulset(ref(replicas=2), OPTIONS)["metadata"]["annotations"][labels.SPEC_HASH_ANNOTATION]
    assert a != b


def test_pod_template_fields_under_their_kubernetes_names() -> None:
    """What many GPU clusters need before a pod can run: pull secrets, the NVIDIA runtime
    class, volumes with real weights, a cache that outlives the pod."""
    group = ref(
        imagePullSecrets=[{"name": "regcred"}],
        runtimeClassName="nvidia",
        priorityClassName="gpu-serving",
        podMetadata={"labels": {"team": "a", labels.LABEL_MODEL_GROUP: "evil"}, "annotations": {"x/y": "z"}},
        serviceAccount={"annotations": {"iam.gke.io/gcp-service-account": "sa@p.iam.gserviceaccount.com"}},
        topologySpreadConstraints=[{"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone",
                                    "whenUnsatisfiable": "ScheduleAnyway"}],
        env=[{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}}],
        envFrom=[{"secretRef": {"name": "extra-env"}}],
        volumes=[{"name": "weights", "persistentVolumeClaim": {"claimName": "llama-weights", "readOnly": True}}],
        volumeMounts=[{"name": "weights", "mountPath": "/weights", "readOnly": True}],
        resources={"requests": {"cpu": 4, "rdma/hca_shared_devices_a": 1}, "limits": {"rdma/hca_shared_devices_a": 1}},
        loadTimeoutSeconds=1800,
        scratch={"sizeLimit": "50Gi"},
        modelCache={"size": "200Gi", "storageClassName": "fast-rwo"},
    )
    sts = build_statefulset(group, OPTIONS)
    kubernetes_validate.validate(sts, kubernetes_validate.latest_version(), strict=True)
    spec, c = pod_spec(sts), container(sts)
    assert spec["imagePullSecrets"] == [{"name": "regcred"}]
    assert spec["runtimeClassName"] == "nvidia" and spec["priorityClassName"] == "gpu-serving"
    meta = sts["spec"]["template"]["metadata"]
    assert meta["labels"]["team"] == "a" and meta["labels"][labels.LABEL_MODEL_GROUP] == "alpha"  # ours win
    assert meta["annotations"]["x/y"] == "z" and labels.CONFIG_HASH_ANNOTATION in meta["annotations"]
    assert spec["topologySpreadConstraints"] == [{
        "labelSelector": {"matchLabels": selector_labels("alpha")}, "maxSkew": 1,
        "topologyKey": "topology.kubernetes.io/zone", "whenUnsatisfiable": "ScheduleAnyway"}]
    assert env_of(sts)["HF_TOKEN"] == {"secretKeyRef": {"name": "hf", "key": "token"}}
    assert c["envFrom"] == [{"secretRef": {"name": "extra-env"}}]
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["weights"]["persistentVolumeClaim"] == {"claimName": "llama-weights", "readOnly": True}
    assert volumes["cache"]["emptyDir"] == {"sizeLimit": "50Gi"}
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    assert mounts["weights"] == {"name": "weights", "mountPath": "/weights", "readOnly": True}
    assert mounts["model-cache"]["mountPath"] == MODEL_CACHE_DIR
    assert c["resources"]["requests"]["rdma/hca_shared_devices_a"] == "1"
    assert c["resources"]["requests"]["ephemeral-storage"] == "50Gi"
    assert env_of(sts)["MODEL_LOAD_TIMEOUT_S"] == "1800"
    assert env_of(sts)["HF_HOME"] == f"{MODEL_CACHE_DIR}/huggingface"  # downloads land in the cache
    probe = c["startupProbe"]
    assert probe["periodSeconds"] * probe["failureThreshold"] >= 1800  # no restart while it loads
    # A claim per pod, kept across pod replacement (StatefulSet), removed with the StatefulSet.
    [claim] = sts["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "model-cache"
    assert claim["spec"] == {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "200Gi"}},
                             "storageClassName": "fast-rwo"}
    assert sts["spec"]["persistentVolumeClaimRetentionPolicy"] == {"whenDeleted": "Delete", "whenScaled": "Retain"}
    assert build_model_cache_claim(group, OPTIONS) is None
    sa = build_service_account(group, OPTIONS)
    assert sa["metadata"]["annotations"]["iam.gke.io/gcp-service-account"] == "sa@p.iam.gserviceaccount.com"


def test_a_shared_model_cache_is_one_claim_owned_by_the_group() -> None:
    group = ref(replicas=3, modelCache={"size": "1Ti", "shared": True})
    claim = build_model_cache_claim(group, OPTIONS)
    assert claim is not None and claim["kind"] == "PersistentVolumeClaim"
    kubernetes_validate.validate(claim, kubernetes_validate.latest_version(), strict=True)
    assert claim["metadata"]["name"] == "alpha-model-cache"
    assert claim["metadata"]["ownerReferences"][0]["kind"] == "ModelGroup"  # outlives pods, goes with the group
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    sts = build_statefulset(group, OPTIONS)
    assert "volumeClaimTemplates" not in sts["spec"]
    volumes = {v["name"]: v for v in pod_spec(sts)["volumes"]}
    assert volumes["model-cache"]["persistentVolumeClaim"] == {"claimName": "alpha-model-cache"}
    assert [c["kind"] for c in build_children(group, OPTIONS)].index("PersistentVolumeClaim") < 5  # before the pods


def test_visible_devices_in_env_are_refused() -> None:
    with pytest.raises(ValueError, match="CUDA_VISIBLE_DEVICES is set from gpusPerPod"):
        ref(env=[{"name": "CUDA_VISIBLE_DEVICES", "value": "0,1"}])


@pytest.mark.parametrize(("replicas", "max_unavailable", "budget"), [
    (1, 1, {"minAvailable": 1}),  # one replica: a drain must not take the group down
    (3, 1, {"maxUnavailable": 1}),
    (4, "50%", {"maxUnavailable": "50%"}),
])
def test_disruption_budget(replicas: int, max_unavailable: Any, budget: dict[str, Any]) -> None:
    pdb = build_disruption_budget(ref(replicas=replicas, disruption={"maxUnavailable": max_unavailable}), OPTIONS)
    kubernetes_validate.validate(pdb, kubernetes_validate.latest_version(), strict=True)
    assert pdb["spec"] == {"selector": {"matchLabels": selector_labels("alpha")}, **budget,
                           "unhealthyPodEvictionPolicy": "AlwaysAllow"}


def test_rollout_max_unavailable_only_when_asked() -> None:
    assert build_statefulset(ref(), OPTIONS)["spec"]["updateStrategy"] == {"type": "RollingUpdate"}
    sts = build_statefulset(ref(replicas=4, rollout={"maxUnavailable": 2}), OPTIONS)
    assert sts["spec"]["updateStrategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 2}}


# ---- drift --------------------------------------------------------------------------------

def test_drift_ignores_server_additions_and_canonical_quantities() -> None:
    want = {"spec": {"replicas": 1, "res": {"cpu": "1000m", "mem": "1Gi"}, "env": [{"name": "A", "value": "1"}]}}
    have = {"spec": {"replicas": 1, "res": {"cpu": "1", "mem": "1Gi"}, "env": [{"name": "A", "value": "1"}],
                     "extra": True}, "status": {}}
    assert drift(want, have) == []


def test_a_hash_that_reads_as_a_huge_number_is_compared_as_text() -> None:
    """Found by the pool e2e test: a spec hash such as "1234e56789012345" is a valid Decimal whose
    exponent overflows any arithmetic; every reconcile of that object failed until the hash changed."""
    want = {"metadata": {"annotations": {"gpufleet.io/spec-hash": "1234e56789012345"}}}
    have = {"metadata": {"annotations": {"gpufleet.io/spec-hash": "1234e56789012346"}}}
    assert drift(want, have) == [".metadata.annotations.gpufleet.io/spec-hash"]
    assert drift(want, want) == []
    assert drift({"q": "1e3"}, {"q": "1k"}) == []  # a quantity's decimal exponent still reads as a number


def test_drift_reports_changed_missing_and_resized() -> None:
    want = {"spec": {"replicas": 2, "env": [{"name": "A"}], "data": {"k": "v"}}}
    have = {"spec": {"replicas": 5, "env": [{"name": "A"}, {"name": "B"}]}}
    assert drift(want, have) == [".spec.replicas", ".spec.env", ".spec.data"]
    assert drift({"a": True}, {"a": 1}) == [".a"]


def test_drift_knows_which_false_the_api_server_drops() -> None:
    """A Service stored without publishNotReadyAddresses is what we applied (false is not
    stored); seen as drift, each resync re-applied every Service (found by bench.scale)."""
    assert drift({"spec": {"publishNotReadyAddresses": False}}, {"spec": {}}) == []
    assert drift({"spec": {"publishNotReadyAddresses": False}}, {"spec": {"publishNotReadyAddresses": True}}) == [
        ".spec.publishNotReadyAddresses"
    ]
    # A *bool whose absence means its default (true): removing our false is drift.
    assert drift({"spec": {"automountServiceAccountToken": False}}, {"spec": {}}) == [
        ".spec.automountServiceAccountToken"
    ]


def test_an_init_step_fills_the_model_cache_before_the_server_starts() -> None:
    group = ref(modelCache={"size": "100Gi", "init": {
        "command": ["sh", "-c"], "args": ["test -e $(MODEL_CACHE_DIR)/done || fetch-weights"],
        "envFrom": [{"secretRef": {"name": "hf"}}]}})
    sts = build_statefulset(group, OPTIONS)
    kubernetes_validate.validate(sts, kubernetes_validate.latest_version(), strict=True)
    [init] = pod_spec(sts)["initContainers"]
    assert init["image"] == container(sts)["image"] and init["command"] == ["sh", "-c"]
    assert {"name": "model-cache", "mountPath": MODEL_CACHE_DIR} in init["volumeMounts"]
    assert init["envFrom"] == [{"secretRef": {"name": "hf"}}]
    assert init["securityContext"]["allowPrivilegeEscalation"] is False  # passes `restricted` too
    assert "initContainers" not in pod_spec(build_statefulset(ref(), OPTIONS))
