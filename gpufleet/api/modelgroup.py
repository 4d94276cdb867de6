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

from gpufleet.api.labels import GPU_RESOURCE
from gpufleet.api.model_groups import NAME_PATTERN, DType, Task

DEFAULT_IMAGE = "ghcr.io/gpufleet/pod-server:0.1.0"
# A StatefulSet's pods carry a controller-revision-hash label "<name>-<10 chars>" that must
# fit the 63-character label limit, so ModelGroup names (= StatefulSet names) stop at 52.
MAX_NAME_LENGTH = 52


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


class ModelGroupSpec(_Camel):
    models: list[ModelSource] = Field(min_length=1, max_length=32, description="The group's models; ids are unique.")
    replicas: int = Field(default=1, ge=0, le=256, description="GPU pods that keep this group resident.")
    gpus_per_pod: int = Field(
        default=1, ge=1, le=16, description="GPUs per pod server; 1 means one pod per GPU. Immutable."
    )
    workers_per_gpu: int = Field(default=1, ge=1, le=64)
    cpu_cache_size: int = Field(default=2, ge=0, le=64, description="Models kept in the pod's CPU cache.")
    queue_limit: int = Field(default=64, ge=1, le=10_000, description="Bounded queue per GPU.")
    lazy_load: bool = False
    exclusive: bool = Field(
        default=False,
        description="These GPUs serve no other group: no other group's pod server is scheduled on the same nodes.",
    )
    image: str | None = Field(
        default=None, min_length=1, max_length=512, description="Pod server image; default: the operator's."
    )
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    node_selector: dict[str, str] = Field(default_factory=dict)
    affinity: dict[str, Any] | None = None
    tolerations: list[Toleration] = Field(default_factory=list)
    resources: ResourceRequirements = Field(
        default_factory=ResourceRequirements,
        description=f"CPU/memory of the pod server; {GPU_RESOURCE} comes from gpusPerPod.",
    )
    env: list[dict[str, Any]] = Field(default_factory=list, description="Extra container env entries.")

    @model_validator(mode="after")
    def _check(self) -> ModelGroupSpec:
        ids = [m.id for m in self.models]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise ValueError(f"duplicate model ids: {', '.join(dupes)}")
        if GPU_RESOURCE in self.resources.limits or GPU_RESOURCE in self.resources.requests:
            raise ValueError(f"set GPUs with gpusPerPod, not resources ({GPU_RESOURCE})")
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
