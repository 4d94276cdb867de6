"""Pure builders: the spec of an owner of pod servers in, the manifests of everything it owns out.

Two kinds own pod servers: a dedicated ModelGroup (its own pods, serving only it) and a
GpuPool (pods that serve every ModelGroup bound to the pool). The same builders make both
(``ModelGroupRef`` and ``PoolRef`` say what differs: labels, the ConfigMap's files, a few
env entries, whether a new ConfigMap rolls the pods).

No I/O and no Kubernetes client here (the dask-kubernetes ``build_*_spec`` / CloudNativePG
``pkg/specs`` style): the reconciler applies what these return, and unit tests check them
without a cluster. Every child carries an owner reference to its owner, so deleting the
owner lets the garbage collector remove all of it, and a spec-hash annotation, so the
reconciler can tell "the spec changed" from "someone edited the child by hand".

Why a StatefulSet for the pod servers (not a Deployment, not bare pods):
- Bare pods would make the operator re-implement a controller: recreating deleted pods,
  rolling updates, surge/unavailability accounting. kube-controller-manager already does
  that, and keeps doing it while the operator is down.
- A Deployment's rolling update surges by default: the new pod needs a free GPU before the
  old one gives its GPU back, which on a full fleet never happens. A StatefulSet replaces
  pods in place (one down, then its successor up), needing no spare GPUs.
- Stable names (``<group>-0``, ``<group>-1``) keep status placements, metrics labels and logs
  readable across restarts; a deleted pod comes back with the same name.
- ``podManagementPolicy: Parallel``: pod servers do not depend on each other, so they start
  and are replaced together, not one by one.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, ClassVar

from gpufleet.api import gpupool, labels
from gpufleet.api.gpupool import GpuPoolSpec
from gpufleet.api.model_groups import ModelGroupsFile
from gpufleet.api.modelgroup import DEFAULT_IMAGE, MODEL_CACHE_DIR, ModelGroupSpec, PodServerFields
from gpufleet.api.placement import PLACEMENT_FILE, PoolPlacement
from gpufleet.operator.drift import quantity

Manifest = dict[str, Any]

POD_SERVER_PORT = 8000
MODEL_GROUPS_DIR = "/etc/gpufleet"
MODEL_GROUPS_FILE = "model_groups.json"
CACHE_DIR = "/var/cache/gpufleet"  # writable emptyDir: Hugging Face downloads, HOME
RUN_AS_USER = 10001  # the images' non-root user (deploy/docker)
MODEL_CACHE_VOLUME = "model-cache"
DEFAULT_LOAD_TIMEOUT_S = 300
STARTUP_PROBE_PERIOD_S = 5
# Pods of a group carry its ModelGroup's uid: unique across namespaces, unlike the name.
LABEL_GROUP_UID = f"{labels.DOMAIN}/model-group-uid"
LABEL_POOL_UID = f"{labels.DOMAIN}/pool-uid"  # the same, on a GpuPool's pods
API_VERSION = f"{labels.API_GROUP}/{labels.API_VERSION}"
# A pool's pods re-read their ConfigMap's files this often (the kubelet refreshes the files
# themselves within about a minute of a change).
MODEL_GROUPS_RELOAD_S = 2


@dataclass(frozen=True)
class BuildOptions:
    """Operator-wide inputs of the builders (from OperatorSettings)."""

    image: str = DEFAULT_IMAGE  # pod server image when the spec names none
    pod_server_cluster_role: str = "gpufleet-pod-server"  # bound to each group's ServiceAccount
    instance: str | None = None  # app.kubernetes.io/instance of the installation (the Helm release)
    log_level: str = "INFO"
    # Chart-level defaults of the pod-template fields (camelCase, as in a spec); a field a
    # ModelGroup sets replaces the default as a whole.
    defaults: Mapping[str, Any] = field(default_factory=dict)
    run_as_user: int | None = RUN_AS_USER  # None: the platform assigns the UID (OpenShift)


@dataclass(frozen=True)
class ModelGroupRef:
    """The identity of one dedicated ModelGroup object, plus its parsed spec."""

    name: str
    namespace: str
    uid: str
    spec: ModelGroupSpec
    generation: int | None = None

    kind: ClassVar[str] = labels.KIND
    uid_label: ClassVar[str] = LABEL_GROUP_UID

    def selector(self) -> dict[str, str]:
        return selector_labels(self.name)

    def config_files(self) -> dict[str, str]:
        return {MODEL_GROUPS_FILE: _json_text(model_groups_document(self.name, self.spec))}

    def config_hash(self) -> str | None:
        """A new model_groups.json rolls the pods: a dedicated pod server reads it once at start."""
        return content_hash(model_groups_document(self.name, self.spec))

    def cpu_cached_models(self) -> int:
        return self.spec.cpu_cache_size

    def lazy_load(self) -> bool:
        return self.spec.lazy_load

    def extra_env(self) -> list[Manifest]:
        return []


@dataclass(frozen=True)
class BoundGroup:
    """A ModelGroup bound to a pool, as the pool serves it (ids an earlier group claims dropped)."""

    name: str
    spec: ModelGroupSpec


@dataclass(frozen=True)
class PoolRef:
    """The identity of one GpuPool object, its parsed spec, the groups it serves and their placement."""

    name: str
    namespace: str
    uid: str
    spec: GpuPoolSpec
    groups: tuple[BoundGroup, ...] = ()
    placement: PoolPlacement = field(default_factory=PoolPlacement)
    generation: int | None = None

    kind: ClassVar[str] = gpupool.KIND
    uid_label: ClassVar[str] = LABEL_POOL_UID

    def selector(self) -> dict[str, str]:
        return pool_selector_labels(self.name)

    def config_files(self) -> dict[str, str]:
        return {
            MODEL_GROUPS_FILE: _json_text(pool_model_groups_document(self.groups)),
            PLACEMENT_FILE: _json_text(self.placement.model_dump(mode="json")),
        }

    def config_hash(self) -> str | None:
        """None: the pool's pods re-read their files while running; bound groups come and go
        without a restart."""
        return None

    def cpu_cached_models(self) -> int:
        return self.spec.host_cache.models

    def lazy_load(self) -> bool:
        return True  # no group is preloaded: the placement and demand decide

    def extra_env(self) -> list[Manifest]:
        spec = self.spec
        env: list[Manifest] = [
            {"name": "PLACEMENT", "value": f"{MODEL_GROUPS_DIR}/{PLACEMENT_FILE}"},
            {"name": "MODEL_GROUPS_RELOAD_S", "value": str(MODEL_GROUPS_RELOAD_S)},
            {"name": "MAX_SEQUENCES_PER_DEVICE", "value": str(spec.max_sequences_per_device)},
            {"name": "SWITCH_LINGER_S", "value": _number(spec.switch.linger_seconds)},
            {"name": "SWITCH_MAX_WAIT_S", "value": _number(spec.switch.max_wait_seconds)},
            {"name": "SWITCH_MIN_RESIDENCY_S", "value": _number(spec.switch.min_residency_seconds)},
        ]
        if spec.host_cache.size is not None:
            env.append({"name": "MAX_CPU_CACHE_GB", "value": quantity_gb(spec.host_cache.size)})
        if spec.kv_cache is not None:
            env.append({"name": "KV_CACHE_GB", "value": quantity_gb(spec.kv_cache)})
        return env


# What owns pod servers: the builders below take either.
PodServerOwner = ModelGroupRef | PoolRef


def quantity_gb(value: str | int) -> str:
    """A Kubernetes quantity in the pod server's GB (10**9 bytes): "64Gi" -> "68.719476736"."""
    parsed = quantity(str(value))
    if parsed is None or parsed <= 0:
        raise ValueError(f"{value!r} is not a positive quantity (e.g. 64Gi)")
    return _number(parsed / Decimal(10**9))


def _number(value: float | Decimal) -> str:
    text = format(Decimal(str(value)).normalize(), "f")
    return text


def _json_text(doc: Any) -> str:
    return json.dumps(doc, indent=2, sort_keys=True) + "\n"


@dataclass(frozen=True)
class ChildNames:
    statefulset: str
    service: str
    configmap: str
    service_account: str
    role_binding: str
    disruption_budget: str
    model_cache: str  # the shared claim (a per-pod claim is "<model_cache>-<pod>")


def child_names(group: str) -> ChildNames:
    return ChildNames(
        statefulset=group,
        service=group,
        configmap=f"{group}-model-groups",
        service_account=f"{group}-pod-server",
        role_binding=f"{group}-pod-server",
        disruption_budget=group,
        model_cache=f"{group}-model-cache",
    )


def selector_labels(group: str) -> dict[str, str]:
    """The pods' immutable selector: one group's pod servers."""
    return {labels.LABEL_COMPONENT: labels.COMPONENT_POD_SERVER, labels.LABEL_MODEL_GROUP: group}


def selector_string(group: str) -> str:
    return _selector_string(selector_labels(group))


def pool_selector_labels(pool: str) -> dict[str, str]:
    """The pool pods' immutable selector; they carry no model-group label (they serve many)."""
    return {labels.LABEL_COMPONENT: labels.COMPONENT_POD_SERVER, labels.LABEL_POOL: pool}


def pool_selector_string(pool: str) -> str:
    return _selector_string(pool_selector_labels(pool))


def _selector_string(match: Mapping[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(match.items()))


def common_labels(ref: PodServerOwner, options: BuildOptions) -> dict[str, str]:
    out = {
        labels.LABEL_NAME: "gpufleet",
        labels.LABEL_MANAGED_BY: labels.MANAGED_BY,
        **ref.selector(),
    }
    if options.instance:
        out[labels.LABEL_INSTANCE] = options.instance
    return out


def owner_reference(ref: PodServerOwner) -> Manifest:
    return {
        "apiVersion": API_VERSION,
        "kind": ref.kind,
        "name": ref.name,
        "uid": ref.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def content_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def _metadata(ref: PodServerOwner, name: str, options: BuildOptions) -> Manifest:
    return {
        "name": name,
        "namespace": ref.namespace,
        "labels": common_labels(ref, options),
        "ownerReferences": [owner_reference(ref)],
    }


def _finish(manifest: Manifest) -> Manifest:
    """Stamp the spec-hash annotation: a digest of everything else in the manifest."""
    digest = content_hash(manifest)
    manifest["metadata"].setdefault("annotations", {})[labels.SPEC_HASH_ANNOTATION] = digest
    return manifest


def _models(spec: ModelGroupSpec) -> list[dict[str, Any]]:
    models = []
    for m in spec.models:
        entry: dict[str, Any] = {"id": m.id, "source": m.source, "task": m.task, "dtype": m.dtype}
        if m.context_length is not None:
            entry["context_length"] = m.context_length
        models.append(entry)
    return models


def model_groups_document(group: str, spec: ModelGroupSpec) -> dict[str, Any]:
    """The one-group model_groups.json the pod servers of this ModelGroup read."""
    doc = {"default_group": group, "groups": {group: {"models": _models(spec)}}}
    ModelGroupsFile.model_validate(doc)  # the pod server's own contract; raises if we break it
    return doc


def pool_model_groups_document(groups: Sequence[BoundGroup]) -> dict[str, Any]:
    """The model_groups.json of a pool's pods: every group it serves (group id = ModelGroup
    name), maybe none; no default group (nothing is preloaded but what the placement asks)."""
    doc = {"groups": {g.name: {"models": _models(g.spec)} for g in sorted(groups, key=lambda g: g.name)}}
    ModelGroupsFile.model_validate(doc)
    return doc


def build_configmap(ref: PodServerOwner, options: BuildOptions) -> Manifest:
    return _finish(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": _metadata(ref, child_names(ref.name).configmap, options),
            "data": ref.config_files(),
        }
    )


def build_service(ref: PodServerOwner, options: BuildOptions) -> Manifest:
    """Headless: the StatefulSet's governing Service (stable pod DNS names), and a way to
    reach the owner's pods directly. Clients normally go through the router."""
    return _finish(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": _metadata(ref, child_names(ref.name).service, options),
            "spec": {
                "clusterIP": "None",
                "selector": ref.selector(),
                "ports": [{"name": "http", "port": POD_SERVER_PORT, "targetPort": "http", "protocol": "TCP"}],
                "publishNotReadyAddresses": False,
            },
        }
    )


def build_service_account(ref: PodServerOwner, options: BuildOptions) -> Manifest:
    metadata = _metadata(ref, child_names(ref.name).service_account, options)
    if ref.spec.service_account.annotations:  # e.g. cloud workload identity
        metadata["annotations"] = dict(ref.spec.service_account.annotations)
    return _finish({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": metadata})


def build_disruption_budget(ref: PodServerOwner, options: BuildOptions) -> Manifest:
    """Drains and other evictions take at most maxUnavailable of the group's pods at once,
    and never the last ready one of a one-replica group (maxUnavailable 1 allows evicting
    it only while it is the one unavailable: with a single ready pod, 0 may go)."""
    spec = ref.spec
    budget: Manifest = {"selector": {"matchLabels": ref.selector()}}
    if spec.replicas <= 1:
        budget["minAvailable"] = spec.replicas  # one replica: an eviction would be an outage
    else:
        budget["maxUnavailable"] = spec.disruption.max_unavailable
    # Pods that are not ready yet (loading, failing) may always be evicted: a broken group
    # must not block a node drain.
    budget["unhealthyPodEvictionPolicy"] = "AlwaysAllow"
    return _finish(
        {
            "apiVersion": "policy/v1",
            "kind": "PodDisruptionBudget",
            "metadata": _metadata(ref, child_names(ref.name).disruption_budget, options),
            "spec": budget,
        }
    )


def _cache_claim_spec(ref: PodServerOwner) -> Manifest:
    cache = ref.spec.model_cache
    assert cache is not None
    modes = list(cache.access_modes) or (["ReadWriteMany"] if cache.shared else ["ReadWriteOnce"])
    claim: Manifest = {"accessModes": modes, "resources": {"requests": {"storage": str(cache.size)}}}
    if cache.storage_class_name:
        claim["storageClassName"] = cache.storage_class_name
    return claim


def build_model_cache_claim(ref: PodServerOwner, options: BuildOptions) -> Manifest | None:
    """The shared model cache: one claim for all the owner's pods, owned by the owner
    (so it outlives every pod, and goes with the owner)."""
    cache = ref.spec.model_cache
    if cache is None or not cache.shared:
        return None
    return _finish(
        {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": _metadata(ref, child_names(ref.name).model_cache, options),
            "spec": _cache_claim_spec(ref),
        }
    )


def build_role_binding(ref: PodServerOwner, options: BuildOptions) -> Manifest:
    """Lets the pod servers publish their status Leases: binds the chart's ClusterRole
    (leases create/patch; an admission policy narrows it to the pod's own Lease) in this
    namespace only. The operator needs just `bind` on that one
    ClusterRole to create this, not the pod permissions themselves."""
    names = child_names(ref.name)
    return _finish(
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": _metadata(ref, names.role_binding, options),
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": options.pod_server_cluster_role,
            },
            "subjects": [{"kind": "ServiceAccount", "name": names.service_account, "namespace": ref.namespace}],
        }
    )


def _field_env(name: str, path: str) -> Manifest:
    return {"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}}


def pod_server_env(ref: PodServerOwner, options: BuildOptions) -> list[Manifest]:
    """The pod server's settings (gpufleet/pod_server/settings.py) from the spec and the
    downward API. DEVICES names the pod's GPUs explicitly: the NVIDIA device plugin makes
    exactly the allocated GPUs visible, as cuda:0..N-1, and a pod server that cannot see
    them fails its start-up instead of quietly serving on the CPU."""
    spec = ref.spec
    env: list[Manifest] = [
        _field_env("POD_NAME", "metadata.name"),
        _field_env("POD_NAMESPACE", "metadata.namespace"),
        _field_env("POD_UID", "metadata.uid"),
        _field_env("NODE_NAME", "spec.nodeName"),
        _field_env("POD_IP", "status.podIP"),
        {"name": "POD_URL", "value": f"http://$(POD_IP):{POD_SERVER_PORT}"},
        {"name": "STATUS_ANNOTATION", "value": "true"},  # publish the status document to the pod's Lease
        {"name": "DEVICES", "value": ",".join(f"cuda:{i}" for i in range(spec.gpus_per_pod))},
        {"name": "HOST", "value": "0.0.0.0"},
        {"name": "PORT", "value": str(POD_SERVER_PORT)},
        {"name": "MODEL_GROUPS", "value": f"{MODEL_GROUPS_DIR}/{MODEL_GROUPS_FILE}"},
        {"name": "NUM_WORKERS_PER_GPU", "value": str(spec.workers_per_gpu)},
        {"name": "MAX_CPU_CACHED_MODELS", "value": str(ref.cpu_cached_models())},
        {"name": "MAX_QUEUE_PER_DEVICE", "value": str(spec.queue_limit)},
        {"name": "LAZY_LOAD_MODEL", "value": "true" if ref.lazy_load() else "false"},
        {"name": "LOG_LEVEL", "value": options.log_level},
        {"name": "HOME", "value": CACHE_DIR},
        {"name": "HF_HOME", "value": f"{MODEL_CACHE_DIR if spec.model_cache else CACHE_DIR}/huggingface"},
        {"name": "MODEL_LOAD_TIMEOUT_S", "value": str(load_timeout_s(spec))},
        *ref.extra_env(),
    ]
    ours = {e["name"] for e in env}
    # The user's entries come last so they may use $(VAR) of ours; they cannot replace ours.
    env.extend(e.model_dump(by_alias=True, exclude_none=True) for e in spec.env if e.name not in ours)
    return env


def load_timeout_s(spec: PodServerFields) -> int:
    return spec.load_timeout_seconds or DEFAULT_LOAD_TIMEOUT_S


def _resources(spec: PodServerFields) -> Manifest:
    gpus = str(spec.gpus_per_pod)
    requests = {k: str(v) for k, v in spec.resources.requests.items()}
    limits = {k: str(v) for k, v in spec.resources.limits.items()}
    # The node must have room for the scratch emptyDir (else the kubelet evicts the pod).
    requests.setdefault("ephemeral-storage", str(_scratch_limit(spec)))
    # Extended resources cannot be overcommitted: requests, if given, must equal limits.
    limits[labels.GPU_RESOURCE] = gpus
    requests[labels.GPU_RESOURCE] = gpus
    return {"requests": requests, "limits": limits}


def _scratch_limit(spec: PodServerFields) -> str | int:
    return spec.scratch.size_limit if spec.scratch else "20Gi"


def _affinity(ref: PodServerOwner) -> Manifest | None:
    affinity: Manifest = json.loads(json.dumps(ref.spec.affinity)) if ref.spec.affinity else {}
    if ref.spec.exclusive:
        # No other owner's pod server on our nodes, from any namespace (namespaceSelector {};
        # the owner's uid, not its name, tells ours from a same-named owner elsewhere; pods
        # without our uid label, a pool's or a dedicated group's, count as others).
        # Required anti-affinity is symmetric in the scheduler, so other owners' pods also
        # stay off the nodes our pods run on.
        term = {
            "labelSelector": {
                "matchExpressions": [
                    {"key": labels.LABEL_COMPONENT, "operator": "In", "values": [labels.COMPONENT_POD_SERVER]},
                    {"key": ref.uid_label, "operator": "NotIn", "values": [ref.uid]},
                ]
            },
            "namespaceSelector": {},
            "topologyKey": "kubernetes.io/hostname",
        }
        anti = affinity.setdefault("podAntiAffinity", {})
        anti.setdefault("requiredDuringSchedulingIgnoredDuringExecution", []).append(term)
    return affinity or None


def _http_probe(path: str, period: int, failures: int) -> Manifest:
    return {
        "httpGet": {"path": path, "port": "http"},
        "periodSeconds": period,
        "timeoutSeconds": 5,
        "failureThreshold": failures,
    }


def _startup_failures(spec: PodServerFields) -> int:
    """The startup probe allows the whole load time-out (plus a minute to start) before
    the kubelet restarts a pod server that does not answer yet."""
    return max(12, -(-(load_timeout_s(spec) + 60) // STARTUP_PROBE_PERIOD_S))


def build_pod_template(ref: PodServerOwner, options: BuildOptions) -> Manifest:
    spec = ref.spec
    names = child_names(ref.name)
    mounts: list[Manifest] = [
        {"name": "model-groups", "mountPath": MODEL_GROUPS_DIR, "readOnly": True},
        {"name": "cache", "mountPath": CACHE_DIR},
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "dshm", "mountPath": "/dev/shm"},
    ]
    volumes: list[Manifest] = [
        {"name": "model-groups", "configMap": {"name": names.configmap}},
        {"name": "cache", "emptyDir": {"sizeLimit": str(_scratch_limit(spec))}},
        {"name": "tmp", "emptyDir": {"sizeLimit": "1Gi"}},
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "2Gi"}},
    ]
    if spec.model_cache is not None:
        mounts.append({"name": MODEL_CACHE_VOLUME, "mountPath": MODEL_CACHE_DIR})
        if spec.model_cache.shared:
            volumes.append({"name": MODEL_CACHE_VOLUME, "persistentVolumeClaim": {"claimName": names.model_cache}})
        # else: the StatefulSet's volumeClaimTemplates give each pod its own claim
    mounts.extend(m.model_dump(by_alias=True, exclude_none=True) for m in spec.volume_mounts)
    volumes.extend(v.model_dump(by_alias=True, exclude_none=True) for v in spec.volumes)
    container: Manifest = {
        "name": "pod-server",
        "image": spec.image or options.image,
        "imagePullPolicy": spec.image_pull_policy,
        "args": ["serve"],
        # A start-up failure (no visible GPU, a bad setting) reaches the pod's status, and from
        # there the owner's Degraded condition: the last log lines become the message.
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "ports": [{"name": "http", "containerPort": POD_SERVER_PORT, "protocol": "TCP"}],
        "env": pod_server_env(ref, options),
        "resources": _resources(spec),
        # Loading a group can take minutes: liveness waits until the server answers at all.
        "startupProbe": _http_probe("/health", STARTUP_PROBE_PERIOD_S, _startup_failures(spec)),
        "livenessProbe": _http_probe("/health", 10, 3),
        "readinessProbe": _http_probe("/ready", 5, 2),
        "volumeMounts": mounts,
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
    }
    pod_spec: Manifest = {
        "serviceAccountName": names.service_account,
        "automountServiceAccountToken": True,  # the status Lease needs the API
        "terminationGracePeriodSeconds": 45,  # the pod server drains for up to 30 s
        "securityContext": {
            "runAsNonRoot": True,
            **(
                {"runAsUser": options.run_as_user, "runAsGroup": options.run_as_user, "fsGroup": options.run_as_user}
                if options.run_as_user is not None
                else {}
            ),
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": volumes,
    }
    cache_init = spec.model_cache.init if spec.model_cache else None
    if cache_init is not None:
        init: Manifest = {
            "name": "fill-model-cache",
            "image": cache_init.image or container["image"],
            "imagePullPolicy": spec.image_pull_policy,
            "command": list(cache_init.command),
            "env": [
                {"name": "MODEL_CACHE_DIR", "value": MODEL_CACHE_DIR},
                {"name": "HOME", "value": CACHE_DIR},
                *(e.model_dump(by_alias=True, exclude_none=True) for e in cache_init.env),
            ],
            "volumeMounts": [
                {"name": MODEL_CACHE_VOLUME, "mountPath": MODEL_CACHE_DIR},
                {"name": "cache", "mountPath": CACHE_DIR},
                {"name": "tmp", "mountPath": "/tmp"},
            ],
            "securityContext": dict(container["securityContext"]),
            "terminationMessagePolicy": "FallbackToLogsOnError",
        }
        if cache_init.args:
            init["args"] = list(cache_init.args)
        if cache_init.env_from:
            init["envFrom"] = [e.model_dump(by_alias=True, exclude_none=True) for e in cache_init.env_from]
        pod_spec["initContainers"] = [init]
    if spec.env_from:
        container["envFrom"] = [e.model_dump(by_alias=True, exclude_none=True) for e in spec.env_from]
    if spec.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": s.name} for s in spec.image_pull_secrets]
    if spec.runtime_class_name:
        pod_spec["runtimeClassName"] = spec.runtime_class_name
    if spec.priority_class_name:
        pod_spec["priorityClassName"] = spec.priority_class_name
    if spec.topology_spread_constraints:
        pod_spec["topologySpreadConstraints"] = [
            {
                "labelSelector": {"matchLabels": ref.selector()},
                **c.model_dump(by_alias=True, exclude_none=True),
            }
            for c in spec.topology_spread_constraints
        ]
    if spec.node_selector:
        pod_spec["nodeSelector"] = dict(spec.node_selector)
    if spec.tolerations:
        pod_spec["tolerations"] = [t.model_dump(by_alias=True, exclude_none=True) for t in spec.tolerations]
    affinity = _affinity(ref)
    if affinity:
        pod_spec["affinity"] = affinity
    # The user's labels and annotations first: ours win (selectors, routing trust depend on them).
    pod_labels = {**spec.pod_metadata.labels, **common_labels(ref, options), ref.uid_label: ref.uid}
    annotations = dict(spec.pod_metadata.annotations)
    config_hash = ref.config_hash()
    if config_hash is not None:
        # A dedicated group's new model_groups.json rolls its pods: the server reads it once at
        # start. A pool's pods carry no such hash: its files change without a restart.
        annotations[labels.CONFIG_HASH_ANNOTATION] = config_hash
    return {
        "metadata": {"labels": pod_labels, "annotations": annotations},
        "spec": pod_spec,
    }


def build_statefulset(ref: PodServerOwner, options: BuildOptions) -> Manifest:
    names = child_names(ref.name)
    spec = ref.spec
    update: Manifest = {"type": "RollingUpdate"}
    if str(spec.rollout.max_unavailable) != "1":
        # Only when asked: the field needs the MaxUnavailableStatefulSet feature; 1 is the default.
        update["rollingUpdate"] = {"maxUnavailable": spec.rollout.max_unavailable}
    sts_spec: Manifest = {
        "replicas": spec.replicas,
        "serviceName": names.service,
        "podManagementPolicy": "Parallel",
        "updateStrategy": update,
        "revisionHistoryLimit": 5,
        "selector": {"matchLabels": ref.selector()},
        "template": build_pod_template(ref, options),
    }
    if spec.model_cache is not None and not spec.model_cache.shared:
        # One claim per pod ("model-cache-<pod>"): it survives pod replacement, so a new pod
        # finds the weights its predecessor fetched; removed with the StatefulSet.
        sts_spec["volumeClaimTemplates"] = [
            {
                "metadata": {"name": MODEL_CACHE_VOLUME, "labels": ref.selector()},
                "spec": _cache_claim_spec(ref),
            }
        ]
        sts_spec["persistentVolumeClaimRetentionPolicy"] = {"whenDeleted": "Delete", "whenScaled": "Retain"}
    return _finish(
        {
            "apiVersion": "apps/v1",
            "kind": "StatefulSet",
            "metadata": _metadata(ref, names.statefulset, options),
            "spec": sts_spec,
        }
    )


def build_children(ref: PodServerOwner, options: BuildOptions) -> list[Manifest]:
    """Everything one owner of pod servers owns, in the order to apply it (pods' dependencies first)."""
    claim = build_model_cache_claim(ref, options)
    return [
        build_service_account(ref, options),
        build_role_binding(ref, options),
        build_configmap(ref, options),
        build_service(ref, options),
        *([claim] if claim is not None else []),
        build_disruption_budget(ref, options),
        build_statefulset(ref, options),
    ]
