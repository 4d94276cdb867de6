"""The ModelGroup custom resource (gpufleet.io/v1alpha1): spec and status.

The CRD in ``crds/modelgroup.yaml`` is generated from these models
(``gpufleet crd``) and a test checks the two agree. Rules the API server enforces with
CEL or list types (unique model ids, no ``nvidia.com/gpu`` in ``resources``) are also
checked here, so the operator refuses a spec that slipped past an outdated CRD.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, model_validator
from pydantic.alias_generators import to_camel

from gpufleet.api.autoscaling import AutoscalingSpec
from gpufleet.api.labels import GPU_RESOURCE
from gpufleet.api.model_groups import NAME_PATTERN, DType, Task

DEFAULT_IMAGE = "ghcr.io/gpufleet/pod-server:0.1.0"
# A StatefulSet's pods carry a controller-revision-hash label "<name>-<10 chars>" that must
# fit the 63-character label limit, so ModelGroup names (= StatefulSet names) stop at 52.
MAX_NAME_LENGTH = 52
MODEL_CACHE_DIR = "/var/cache/gpufleet/models"
# CUDA_VISIBLE_DEVICES, NVIDIA_VISIBLE_DEVICES, ...: the device plugin sets these for the GPUs
# the pod was given; a ModelGroup overriding them would make the pod use GPUs it does not hold.
VISIBLE_DEVICES_SUFFIX = "_VISIBLE_DEVICES"


class _Camel(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


class ModelSource(_Camel):
    id: str = Field(pattern=NAME_PATTERN, max_length=63, description="Name clients use in the `model` field.")
    source: str = Field(
        min_length=1, max_length=1024, description="Path inside the image/volume, or a Hugging Face id."
    )
    task: Task = "chat"
    dtype: DType = "auto"
    context_length: int | None = Field(default=None, ge=8, le=1_048_576)


class Toleration(_Camel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="allow")
    key: str | None = None
    operator: Literal["Exists", "Equal"] | None = None
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = None


# A Kubernetes quantity, written as a string ("500m", "8Gi") or an integer (2).
Quantity = Annotated[str | int, WithJsonSchema({"x-kubernetes-int-or-string": True})]


class ResourceRequirements(_Camel):
    requests: dict[str, Quantity] = Field(default_factory=dict)
    limits: dict[str, Quantity] = Field(default_factory=dict)


class _Open(_Camel):
    """A Kubernetes type whose common fields are typed here and the rest kept as given
    (checked by the API server when the operator applies the pod template)."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="allow")


DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
ENV_NAME = r"^[-._a-zA-Z][-._a-zA-Z0-9]*$"


class LocalObjectReference(_Camel):
    name: str = Field(min_length=1, max_length=253, pattern=DNS_SUBDOMAIN)


class EnvVar(_Camel):
    name: str = Field(min_length=1, max_length=256, pattern=ENV_NAME)
    value: str | None = None
    value_from: dict[str, Any] | None = Field(default=None, description="A core/v1 EnvVarSource.")


class ObjectKeyRef(_Camel):
    name: str = Field(min_length=1, max_length=253, pattern=DNS_SUBDOMAIN)
    optional: bool | None = None


class EnvFromSource(_Camel):
    prefix: str | None = Field(default=None, max_length=256)
    config_map_ref: ObjectKeyRef | None = None
    secret_ref: ObjectKeyRef | None = None


class Volume(_Open):
    """A core/v1 Volume: a name and one volume source (persistentVolumeClaim, secret, csi, ...)."""

    name: str = Field(min_length=1, max_length=63, pattern=DNS_LABEL)


class VolumeMount(_Camel):
    name: str = Field(min_length=1, max_length=63, pattern=DNS_LABEL)
    mount_path: str = Field(min_length=1, max_length=4096, pattern=r"^/")
    read_only: bool | None = None
    sub_path: str | None = None
    mount_propagation: Literal["None", "HostToContainer", "Bidirectional"] | None = None


class TopologySpreadConstraint(_Open):
    max_skew: int = Field(ge=1)
    topology_key: str = Field(min_length=1, max_length=316)
    when_unsatisfiable: Literal["DoNotSchedule", "ScheduleAnyway"]
    label_selector: dict[str, Any] | None = Field(
        default=None, description="Default: this ModelGroup's pods (the operator fills it in)."
    )


class PodMetadata(_Camel):
    labels: dict[str, str] = Field(default_factory=dict, description="Extra labels of the pods (ours win).")
    annotations: dict[str, str] = Field(default_factory=dict, description="Extra annotations of the pods.")


class ServiceAccountSettings(_Camel):
    annotations: dict[str, str] = Field(
        default_factory=dict, description="Annotations of the group's ServiceAccount (e.g. cloud workload identity)."
    )


class CacheInit(_Camel):
    """A step run before the pod server in each pod, with the cache mounted (e.g. download
    the weights if missing); it should be idempotent: it runs again in every new pod."""

    image: str | None = Field(default=None, min_length=1, max_length=512, description="Default: the pod server's.")
    command: list[str] = Field(min_length=1, max_length=64)
    args: list[str] = Field(default_factory=list, max_length=256)
    env: list[EnvVar] = Field(default_factory=list, max_length=64)
    env_from: list[EnvFromSource] = Field(default_factory=list, max_length=16)


class ModelCache(_Camel):
    """A PersistentVolumeClaim for weights that survives pod replacement."""

    size: Quantity = Field(description="Requested storage, e.g. 200Gi.")
    storage_class_name: str | None = Field(default=None, max_length=253, description="Default: the cluster's.")
    shared: bool = Field(
        default=False,
        description="One claim for all the group's pods (needs a ReadWriteMany class); else one claim per pod.",
    )
    access_modes: list[Literal["ReadWriteOnce", "ReadOnlyMany", "ReadWriteMany", "ReadWriteOncePod"]] = Field(
        default_factory=list, description="Default: ReadWriteMany if shared, else ReadWriteOnce."
    )
    init: CacheInit | None = Field(default=None, description="Fills the cache before the pod server starts.")


class Scratch(_Camel):
    """The pod's writable emptyDir (downloads, HOME): limited, and requested from the node."""

    size_limit: Quantity = Field(default="20Gi", description="The emptyDir's sizeLimit and ephemeral-storage request.")


class DisruptionSettings(_Camel):
    max_unavailable: Quantity = Field(
        default=1, description="PodDisruptionBudget: pods that voluntary disruptions (drains) may take at once."
    )


class RolloutSettings(_Camel):
    max_unavailable: Quantity = Field(
        default=1, description="StatefulSet rolling update: pods replaced at once (a number or a percentage)."
    )


class PodTemplateFields(_Camel):
    """The pod-template fields of a ModelGroup, under their Kubernetes names; the chart's
    podServer.defaults sets any of them for every ModelGroup, which a ModelGroup overrides."""

    image_pull_secrets: list[LocalObjectReference] = Field(default_factory=list, max_length=16)
    runtime_class_name: str | None = Field(
        default=None, max_length=253, pattern=DNS_SUBDOMAIN, description="E.g. nvidia, on clusters that need it."
    )
    priority_class_name: str | None = Field(default=None, max_length=253)
    pod_metadata: PodMetadata = Field(default_factory=PodMetadata)
    service_account: ServiceAccountSettings = Field(default_factory=ServiceAccountSettings)
    node_selector: dict[str, str] = Field(default_factory=dict)
    affinity: dict[str, Any] | None = None
    tolerations: list[Toleration] = Field(default_factory=list)
    topology_spread_constraints: list[TopologySpreadConstraint] = Field(default_factory=list, max_length=16)
    resources: ResourceRequirements = Field(
        default_factory=ResourceRequirements,
        description=f"Resources of the pod server (cpu, memory, any extended resource); {GPU_RESOURCE} comes from"
        " gpusPerPod.",
    )
    env: list[EnvVar] = Field(default_factory=list, max_length=256, description="Extra container env entries.")
    env_from: list[EnvFromSource] = Field(default_factory=list, max_length=64)
    volumes: list[Volume] = Field(default_factory=list, max_length=64, description="Extra pod volumes.")
    volume_mounts: list[VolumeMount] = Field(
        default_factory=list, max_length=64, description="Extra mounts in the pod server."
    )
    load_timeout_seconds: int | None = Field(
        default=None, ge=10, le=86_400, description="A group load taking longer fails. Default: 300."
    )
    scratch: Scratch | None = None
    model_cache: ModelCache | None = Field(
        default=None, description=f"Weights cache, mounted at {MODEL_CACHE_DIR}; `source` may name paths in it."
    )


# The top-level spec fields that chart-level defaults may set.
DEFAULTABLE_FIELDS = tuple(PodTemplateFields.model_fields)


class PodServerFields(PodTemplateFields):
    """Everything that shapes the pod servers: shared by a dedicated ModelGroup (its own pods)
    and a GpuPool (pods that serve many ModelGroups)."""

    replicas: int = Field(default=1, ge=0, le=256, description="GPU pods that keep this group resident.")
    gpus_per_pod: int = Field(
        default=1, ge=1, le=16, description="GPUs per pod server; 1 means one pod per GPU. Immutable."
    )
    workers_per_gpu: int = Field(default=1, ge=1, le=64)
    queue_limit: int = Field(default=64, ge=1, le=10_000, description="Bounded queue per GPU.")
    exclusive: bool = Field(
        default=False,
        description="These GPUs serve no other group: no other group's pod server, in any namespace, is scheduled"
        " on the same nodes.",
    )
    image: str | None = Field(
        default=None, min_length=1, max_length=512, description="Pod server image; default: the operator's."
    )
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    disruption: DisruptionSettings = Field(default_factory=DisruptionSettings)
    rollout: RolloutSettings = Field(default_factory=RolloutSettings)
    autoscaling: AutoscalingSpec | None = Field(
        default=None,
        description="Pods follow demand between minReplicas and maxReplicas (the operator then owns the pod"
        " count; replicas is only where it starts). Unset: replicas decides (kubectl scale, an HPA, KEDA).",
    )

    @model_validator(mode="after")
    def _check_pods(self) -> PodServerFields:
        if GPU_RESOURCE in self.resources.limits or GPU_RESOURCE in self.resources.requests:
            raise ValueError(f"set GPUs with gpusPerPod, not resources ({GPU_RESOURCE})")
        visible = sorted(e.name for e in self.env if e.name.endswith(VISIBLE_DEVICES_SUFFIX))
        if visible:
            raise ValueError(f"env: {', '.join(visible)} is set from gpusPerPod by the GPU runtime, not here")
        return self


# The pod-shaped fields a pooled ModelGroup may not set (its pods are the pool's), with the
# value each takes when unset: the API server fills in defaults before it validates, so a
# field with a default counts as set only when it differs from that default.
POD_FIELD_DEFAULTS: dict[str, Any] = {
    to_camel(name): (None if info.default_factory is not None else info.default)
    for name, info in PodServerFields.model_fields.items()
} | {"cpuCacheSize": 2, "lazyLoad": False}


class ModelGroupSpec(PodServerFields):
    cpu_cache_size: int = Field(default=2, ge=0, le=64, description="Models kept in the pod's CPU cache.")
    lazy_load: bool = False
    models: list[ModelSource] = Field(min_length=1, max_length=32, description="The group's models; ids are unique.")
    pool: str | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_NAME_LENGTH,
        pattern=DNS_LABEL,
        description="A GpuPool of this namespace whose pods serve this group (no pods of its own); pod-shaped"
        " fields are then the pool's and may not be set here. Unset: dedicated pods, as set here.",
    )
    min_resident: int = Field(
        default=0,
        ge=0,
        le=256,
        description="Pooled groups: devices of the pool that keep this group current or cached at all times"
        " (0: loaded only on demand).",
    )
    max_resident: int | None = Field(
        default=None,
        ge=1,
        le=256,
        description="Pooled groups: most devices of the pool that demand may make hold this group current"
        " (unset: any).",
    )
    priority: int = Field(
        default=0, ge=-1000, le=1000, description="Pooled groups: higher is placed first when devices are scarce."
    )

    @model_validator(mode="after")
    def _check(self) -> ModelGroupSpec:
        ids = [m.id for m in self.models]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise ValueError(f"duplicate model ids: {', '.join(dupes)}")
        if self.pool is None and (self.min_resident or self.priority or self.max_resident is not None):
            raise ValueError("minResident, maxResident and priority apply to pooled groups only: set spec.pool")
        if self.max_resident is not None and self.max_resident < self.min_resident:
            raise ValueError(f"maxResident ({self.max_resident}) is below minResident ({self.min_resident})")
        if self.pool is not None:
            given = {name for name in self.model_fields_set if to_camel(name) in POD_FIELD_DEFAULTS}
            pod_fields = sorted(
                to_camel(name)
                for name in given
                if getattr(self, name) != type(self).model_fields[name].get_default(call_default_factory=True)
            )
            if pod_fields:
                raise ValueError(
                    f"spec.{pod_fields[0]} is a pod setting: a pooled ModelGroup runs on GpuPool {self.pool!r}'s"
                    " pods; set it on the pool"
                )
        return self


ConditionType = Literal["Ready", "Progressing", "Degraded"]


class Condition(_Camel):
    type: ConditionType
    status: Literal["True", "False", "Unknown"]
    reason: str
    message: str = ""
    last_transition_time: str
    observed_generation: int | None = None


class Placement(_Camel):
    pod: str
    node: str | None = None
    device: str
    state: Literal["current", "cached"]


class ModelGroupStatus(_Camel):
    observed_generation: int | None = None
    replicas: int = Field(default=0, description="Pod servers that exist.")
    ready_replicas: int = Field(default=0, description="Pod servers that are ready with this group loaded.")
    selector: str | None = Field(default=None, description="Label selector of the pods (for the scale subresource).")
    models: str | None = Field(default=None, description="The group's model ids, comma-separated (for kubectl get).")
    conditions: list[Condition] = Field(default_factory=list)
    placements: list[Placement] = Field(default_factory=list)
    service: str | None = None
    pool: str | None = Field(default=None, description="The GpuPool whose pods serve this group, when pooled.")
    residency: int | None = Field(default=None, description="Pooled: devices of the pool holding it current now.")
    desired_residency: int | None = Field(
        default=None, description="Pooled: devices demand asks to hold it current (gpufleet.autoscale.residency)."
    )
    desired_replicas: int | None = Field(
        default=None,
        description="The pod count demand asks for, with spec.autoscaling (pooled: the pool's, with its own).",
    )
