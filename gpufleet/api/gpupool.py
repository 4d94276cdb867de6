"""The GpuPool custom resource (gpufleet.io/v1alpha1): one set of GPU pod servers that many
ModelGroups of its namespace share.

A ModelGroup with ``spec.pool`` gets no pods of its own: its models are added to the pool's
``model_groups.json``, and the pool's devices take it current when asked for it (or when the
placement says so), parking other groups in the host cache, as ``gpufleet serve`` does on one
machine. The pod-shaped fields are the same as a dedicated ModelGroup's (``PodServerFields``);
the rest are the pod server's multiplexing settings.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from gpufleet.api.modelgroup import Condition, PodServerFields, Quantity, _Camel

KIND = "GpuPool"
PLURAL = "gpupools"
SINGULAR = "gpupool"
SHORT_NAMES = ("gpool",)


class HostCacheSettings(_Camel):
    """Groups parked in each pod's host memory, off the device, for cheap switches back."""

    models: int = Field(default=4, ge=0, le=1024, description="Models kept in the pod's host cache.")
    size: Quantity | None = Field(
        default=None, description="Bytes of host copies per pod (e.g. 64Gi); default: half the pod's RAM at start."
    )


class SwitchSettings(_Camel):
    """When a device leaves its current group for another (the pod server's queue rule)."""

    linger_seconds: float = Field(
        default=0.5, ge=0, le=60, description="Wait this long for more of the current group before switching."
    )
    max_wait_seconds: float = Field(
        default=5.0, ge=0, le=3600, description="Another group's oldest request waits at most this for a switch."
    )
    min_residency_seconds: float = Field(
        default=2.0, ge=0, le=3600, description="A group just switched in stays at least this long under demand."
    )
    swaps_per_device_per_minute: float = Field(
        default=6.0,
        ge=0,
        le=600,
        description="Residency from demand: devices it may give to another group, per device per minute.",
    )
    release_delay_seconds: float = Field(
        default=60.0,
        ge=0,
        le=86_400,
        description="Residency from demand: a group gives a device back only when demand asked for fewer all this"
        " time (and at least two switches' time).",
    )


class GpuPoolSpec(PodServerFields):
    host_cache: HostCacheSettings = Field(default_factory=HostCacheSettings)
    max_sequences_per_device: int = Field(
        default=64, ge=1, le=4096, description="Sequences batched at once per device (continuous batching)."
    )
    kv_cache: Quantity | None = Field(
        default=None, description="KV cache budget per device (e.g. 20Gi); default: 30% of the GPU's memory."
    )
    switch: SwitchSettings = Field(default_factory=SwitchSettings)


class DeviceResidency(_Camel):
    """One device of the pool and the groups it holds, as its pod server last reported."""

    pod: str
    node: str | None = None
    device: str
    current: str | None = None
    switching_to: str | None = None
    cached: list[str] = Field(default_factory=list)


class GroupResidency(_Camel):
    group: str
    current: int = Field(default=0, description="Devices holding it current now.")
    desired: int = Field(default=0, description="Devices demand (and minResident) ask to hold it current.")
    demand: float = Field(default=0, description="Sequences in flight and waiting at the routers, last round.")


class GpuPoolStatus(_Camel):
    observed_generation: int | None = None
    replicas: int = Field(default=0, description="Pod servers that exist.")
    ready_replicas: int = Field(default=0, description="Pod servers that are ready.")
    selector: str | None = Field(default=None, description="Label selector of the pods (for the scale subresource).")
    groups: str | None = Field(default=None, description="The bound ModelGroups served, comma-separated.")
    conditions: list[Condition] = Field(default_factory=list)
    devices: list[DeviceResidency] = Field(default_factory=list)
    refused_groups: dict[str, str] = Field(
        default_factory=dict, description="Bound ModelGroups the pool does not serve -> why."
    )
    desired_replicas: int | None = Field(
        default=None, description="With spec.autoscaling: the pod count demand asks for (the StatefulSet's)."
    )
    residency: list[GroupResidency] = Field(
        default_factory=list, description="Per bound group: devices holding it current now, and desired by demand."
    )
    last_scale_time: str | None = Field(default=None, description="When the operator last changed the pod count.")
    placement_generation: int | None = None


PoolConditionType = Literal["Ready", "Progressing", "Degraded"]
