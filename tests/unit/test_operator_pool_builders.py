"""A GpuPool's children: the same builders as a dedicated ModelGroup's, with a pool's labels,
files and env, and a pod template that the bound groups never change."""

from __future__ import annotations

import json
from typing import Any

import kubernetes_validate
import pytest

from gpufleet.api import labels
from gpufleet.api.gpupool import GpuPoolSpec
from gpufleet.api.model_groups import ModelGroupsFile
from gpufleet.api.modelgroup import ModelGroupSpec
from gpufleet.api.placement import DevicePlacement, PodPlacement, PoolPlacement
from gpufleet.operator.builders import (
    LABEL_GROUP_UID,
    LABEL_POOL_UID,
    BoundGroup,
    BuildOptions,
    PoolRef,
    build_children,
    build_configmap,
    build_statefulset,
    pool_selector_labels,
    quantity_gb,
)
from gpufleet.operator.reconcile import InvalidSpec, parse_pool_spec, parse_spec
from gpufleet.pod_server.settings import PodServerSettings
from tests.unit.test_helm_chart import restricted_violations

pytestmark = pytest.mark.unit

OPTIONS = BuildOptions(image="registry.example/pod-server:1", pod_server_cluster_role="rel-pod-server", instance="rel")


def bound(name: str, *ids: str, **spec: Any) -> BoundGroup:
    models = [{"id": i, "source": f"/models/{i}"} for i in ids or (name,)]
    return BoundGroup(name, ModelGroupSpec.model_validate({"pool": "shared", "models": models, **spec}))


def pool(groups: tuple[BoundGroup, ...] = (), placement: PoolPlacement | None = None, **spec: Any) -> PoolRef:
    return PoolRef("shared", "ml", "pool-uid", GpuPoolSpec.model_validate(spec), groups,
                   placement or PoolPlacement(), generation=2)


def template(sts: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = sts["spec"]["template"]
    return out


def env_of(sts: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in template(sts)["spec"]["containers"][0]["env"]}


def test_children_are_owned_by_the_pool_labelled_and_valid() -> None:
    children = build_children(pool((bound("chat"),)), OPTIONS)
    assert [c["kind"] for c in children] == ["ServiceAccount", "RoleBinding", "ConfigMap", "Service",
                                             "PodDisruptionBudget", "StatefulSet"]
    for child in children:
        meta = child["metadata"]
        assert meta["namespace"] == "ml"
        assert meta["ownerReferences"] == [
            {"apiVersion": "gpufleet.io/v1alpha1", "kind": "GpuPool", "name": "shared", "uid": "pool-uid",
             "controller": True, "blockOwnerDeletion": True}
        ]
        assert meta["labels"][labels.LABEL_POOL] == "shared"
        assert labels.LABEL_MODEL_GROUP not in meta["labels"]
        assert meta["labels"][labels.LABEL_MANAGED_BY] == labels.MANAGED_BY
        kubernetes_validate.validate(child, kubernetes_validate.latest_version(), strict=True)
    names = {c["kind"]: c["metadata"]["name"] for c in children}
    assert names == {"ServiceAccount": "shared-pod-server", "RoleBinding": "shared-pod-server",
                     "ConfigMap": "shared-model-groups", "Service": "shared", "PodDisruptionBudget": "shared",
                     "StatefulSet": "shared"}
    role_binding = children[1]
    assert role_binding["roleRef"]["name"] == "rel-pod-server"  # the same ClusterRole as a dedicated group's
    assert role_binding["subjects"] == [{"kind": "ServiceAccount", "name": "shared-pod-server", "namespace": "ml"}]


def test_pool_pods_carry_the_pool_label_and_no_model_group_label() -> None:
    sts = build_statefulset(pool(replicas=2, gpusPerPod=2), OPTIONS)
    pod_labels = template(sts)["metadata"]["labels"]
    assert pod_labels[labels.LABEL_COMPONENT] == labels.COMPONENT_POD_SERVER  # what the router selects
    assert pod_labels[labels.LABEL_MANAGED_BY] == labels.MANAGED_BY
    assert pod_labels[labels.LABEL_POOL] == "shared"
    assert pod_labels[LABEL_POOL_UID] == "pool-uid"
    assert labels.LABEL_MODEL_GROUP not in pod_labels and LABEL_GROUP_UID not in pod_labels
    assert sts["spec"]["selector"]["matchLabels"] == pool_selector_labels("shared")
    assert sts["spec"]["replicas"] == 2 and sts["spec"]["serviceName"] == "shared"
    container = template(sts)["spec"]["containers"][0]
    assert container["resources"]["limits"][labels.GPU_RESOURCE] == "2"
    assert restricted_violations(template(sts)["spec"]) == []


def test_no_config_hash_and_the_files_are_mounted_as_a_folder() -> None:
    sts = build_statefulset(pool(), OPTIONS)
    assert labels.CONFIG_HASH_ANNOTATION not in template(sts)["metadata"]["annotations"]
    spec = template(sts)["spec"]
    volume = next(v for v in spec["volumes"] if v["name"] == "model-groups")
    assert volume == {"name": "model-groups", "configMap": {"name": "shared-model-groups"}}
    mount = next(m for m in spec["containers"][0]["volumeMounts"] if m["name"] == "model-groups")
    assert mount == {"name": "model-groups", "mountPath": "/etc/gpufleet", "readOnly": True}  # no subPath:
    # the kubelet refreshes a ConfigMap volume's files in place only when the whole folder is mounted


def test_the_statefulset_is_byte_identical_when_only_the_groups_change() -> None:
    empty = build_statefulset(pool(), OPTIONS)
    placement = PoolPlacement(generation=4, pods={"shared-0": PodPlacement(devices={"0": DevicePlacement(
        current="chat", cached=("beta",))})})
    many = build_statefulset(pool((bound("chat"), bound("beta", "b1", "b2", minResident=1)), placement), OPTIONS)
    assert json.dumps(empty, sort_keys=True) == json.dumps(many, sort_keys=True)
    # ... while the ConfigMap does change, and its spec hash with it (the reconciler applies it).
    a, b = build_configmap(pool(), OPTIONS), build_configmap(pool((bound("chat"),)), OPTIONS)
    assert a["data"] != b["data"]
    assert a["metadata"]["annotations"] != b["metadata"]["annotations"]


def test_env_of_a_pool_pod() -> None:
    ref = pool(
        gpusPerPod=2,
        hostCache={"models": 6, "size": "64Gi"},
        maxSequencesPerDevice=32,
        kvCache="20G",
        switch={"lingerSeconds": 0.25, "maxWaitSeconds": 10, "minResidencySeconds": 3},
        env=[{"name": "HF_TOKEN", "value": "x"}],
    )
    env = env_of(build_statefulset(ref, OPTIONS))
    assert env["MODEL_GROUPS"] == "/etc/gpufleet/model_groups.json"
    assert env["PLACEMENT"] == "/etc/gpufleet/placement.json"
    assert env["MODEL_GROUPS_RELOAD_S"] == "2"
    assert env["LAZY_LOAD_MODEL"] == "true"  # nothing preloaded: the placement and demand decide
    assert env["MAX_CPU_CACHED_MODELS"] == "6"
    assert env["MAX_CPU_CACHE_GB"] == "68.719476736"  # 64Gi in the pod server's GB (10**9 bytes)
    assert env["MAX_SEQUENCES_PER_DEVICE"] == "32"
    assert env["KV_CACHE_GB"] == "20"
    assert (env["SWITCH_LINGER_S"], env["SWITCH_MAX_WAIT_S"], env["SWITCH_MIN_RESIDENCY_S"]) == ("0.25", "10", "3")
    # Everything a dedicated group's pod gets, too.
    assert env["DEVICES"] == "cuda:0,cuda:1"
    assert env["STATUS_ANNOTATION"] == "true"
    assert env["POD_NAME"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert env["POD_UID"] == {"fieldRef": {"fieldPath": "metadata.uid"}}
    assert env["POD_URL"] == "http://$(POD_IP):8000"
    assert env["HF_TOKEN"] == "x"
    # Every plain value the pod server knows parses with its own settings.
    plain = {k.lower(): v for k, v in env.items() if isinstance(v, str) and k.lower() in PodServerSettings.model_fields}
    settings = PodServerSettings(**{**plain, "devices": "cpu:0", "pod_url": "http://10.0.0.1:8000"})
    assert settings.max_cpu_cached_models == 6 and settings.max_sequences_per_device == 32
    assert settings.lazy_load_model is True and settings.switch_linger_s == 0.25
    defaults = env_of(build_statefulset(pool(), OPTIONS))
    assert "MAX_CPU_CACHE_GB" not in defaults and "KV_CACHE_GB" not in defaults  # the pod server's defaults


@pytest.mark.parametrize(("given", "gb"), [("64Gi", "68.719476736"), ("500M", "0.5"), (2_000_000_000, "2"),
                                            ("1.5G", "1.5")])
def test_quantities_in_gb(given: str | int, gb: str) -> None:
    assert quantity_gb(given) == gb


def test_a_pool_with_an_unreadable_quantity_is_an_invalid_spec() -> None:
    with pytest.raises(InvalidSpec, match=r"spec.kvCache: 'lots' is not a positive quantity"):
        parse_pool_spec({"spec": {"kvCache": "lots"}})


def test_the_configmap_lists_every_bound_group_and_the_placement() -> None:
    placement = PoolPlacement(generation=3, pods={"shared-1": PodPlacement(devices={"0": DevicePlacement(
        current="beta")})})
    cm = build_configmap(pool((bound("chat", "tiny-chat"), bound("beta", "b1", "b2")), placement), OPTIONS)
    doc = ModelGroupsFile.model_validate(json.loads(cm["data"]["model_groups.json"]))
    assert doc.default_group is None and "default_group" not in json.loads(cm["data"]["model_groups.json"])
    assert {g: [m.id for m in spec.models] for g, spec in doc.groups.items()} == {
        "chat": ["tiny-chat"], "beta": ["b1", "b2"]}
    assert PoolPlacement.model_validate_json(cm["data"]["placement.json"]) == placement
    empty = build_configmap(pool(), OPTIONS)  # no group bound yet: a valid, empty file
    assert ModelGroupsFile.model_validate(json.loads(empty["data"]["model_groups.json"])).groups == {}


def test_exclusive_pools_keep_other_pod_servers_off_their_nodes_by_uid() -> None:
    spec = template(build_statefulset(pool(exclusive=True), OPTIONS))["spec"]
    [term] = spec["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    exprs = {e["key"]: (e["operator"], e["values"]) for e in term["labelSelector"]["matchExpressions"]}
    # Dedicated groups' pods have no pool-uid label: NotIn matches them, so they stay away too.
    assert exprs[LABEL_POOL_UID] == ("NotIn", ["pool-uid"])


def test_chart_defaults_apply_to_pools_but_not_to_pooled_groups() -> None:
    defaults = {"runtimeClassName": "nvidia", "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}]}
    spec = parse_pool_spec({"spec": {"replicas": 2}}, defaults)
    assert spec.runtime_class_name == "nvidia" and spec.tolerations
    pooled = parse_spec({"spec": {"pool": "shared", "models": [{"id": "m", "source": "/m"}]}}, defaults)
    assert pooled.runtime_class_name is None and pooled.tolerations == []
    dedicated = parse_spec({"spec": {"models": [{"id": "m", "source": "/m"}]}}, defaults)
    assert dedicated.runtime_class_name == "nvidia"
