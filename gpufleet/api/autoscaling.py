"""``spec.autoscaling``: the pod count follows demand (GpuPool, and dedicated ModelGroups alike).

Set it and the operator owns the StatefulSet's replicas (``spec.replicas`` is then only the
count a new object starts with); leave it unset and ``spec.replicas`` (the scale subresource,
so ``kubectl scale``, an HPA or KEDA) decides, while the operator still exports the same
figures as metrics (``gpufleet_autoscale_*``) for those to read. The rule is
``gpufleet.autoscale.replicas``.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

DEFAULT_TARGET_SEQUENCES_PER_DEVICE = 8


class AutoscalingSpec(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")

    min_replicas: int = Field(
        default=0,
        ge=0,
        le=256,
        description="Fewest pods; 0 lets an idle object scale to zero (the router holds"
        " the first request while a pod comes up).",
    )
    max_replicas: int = Field(default=4, ge=1, le=256, description="Most pods.")
    target_sequences_per_device: int = Field(
        default=DEFAULT_TARGET_SEQUENCES_PER_DEVICE,
        ge=1,
        le=4096,
        description="Sequences (running, queued and waiting at the router) one device should carry; also the"
        " target a pool's residency-from-demand rule uses.",
    )
    scale_up_delay_seconds: float = Field(
        default=0, ge=0, le=3600, description="Demand must ask for more pods this long before they are added."
    )
    scale_down_delay_seconds: float = Field(
        default=300,
        ge=0,
        le=86_400,
        description="Pods are removed only when no recommendation in this window asked for them (also the idle"
        " time before scaling to zero).",
    )

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalingSpec:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"autoscaling: minReplicas ({self.min_replicas}) is above maxReplicas ({self.max_replicas})"
            )
        return self
