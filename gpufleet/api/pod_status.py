"""The status document each pod server publishes about itself.

Locally the router reads it from ``GET /api/status``; in a cluster the pod server also
writes it, JSON-encoded, to its own Pod's ``STATUS_ANNOTATION`` when it changes (plus a
slow heartbeat), so that API-server writes grow with state changes, not with traffic.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

SCHEMA_VERSION = 1


class DeviceStatus(BaseModel):
    model_config = ConfigDict(extra="ignore")

    device: str = Field(description="Device name on the pod, e.g. 'cuda:0' or 'cpu:1'.")
    uuid: str | None = Field(
        default=None, description="The physical GPU's NVML UUID ('GPU-...'), a stable exclusive target; None on CPU."
    )
    current_group: str | None = None
    cached_groups: list[str] = Field(default_factory=list, description="Groups parked in this device's CPU cache.")
    failed_groups: list[str] = Field(default_factory=list, description="Groups whose last load failed here.")
    healthy: bool = True
    workers: int = Field(default=1, ge=1)
    queue_limit: int = Field(default=64, ge=1)
    switching_to: str | None = None
    # Measured seconds to make a group current from each place; the router weighs switches with these.
    switch_seconds_from_cache: float | None = None
    switch_seconds_from_disk: float | None = None
    last_switch_unix: float | None = None
    # Memory (issue 9). Groups that can never fit here are also listed in failed_groups, so that
    # routing's eligibility stops sending them to this device without knowing why.
    insufficient_memory_groups: dict[str, str] = Field(
        default_factory=dict, description="Groups that can never fit on this device -> why (bytes needed, available)."
    )
    memory_total_bytes: int | None = Field(default=None, description="Memory a group may use here (capped).")
    memory_free_bytes: int | None = None
    memory_reserved_bytes: int | None = Field(default=None, description="Kept free beside a group (reserve).")
    memory_ledger_bytes: int | None = Field(default=None, description="Weights + KV of the resident models.")
    prefetched_switches: int = Field(default=0, description="Switches that found their group prefetched.")
    restore_error: str | None = Field(default=None, description="Why no group is current after a failed switch.")


class PodStatus(BaseModel):
    model_config = ConfigDict(extra="ignore")

    schema_version: int = SCHEMA_VERSION
    pod: str
    namespace: str | None = None
    node: str | None = None
    url: str | None = Field(default=None, description="Where the pod server listens, if it knows.")
    ready: bool = False
    devices: list[DeviceStatus] = Field(default_factory=list)
    groups: list[str] = Field(default_factory=list, description="Every group this pod can serve.")
    models: dict[str, str] = Field(default_factory=dict, description="Model id -> group id.")
    timestamp: float = Field(description="Unix time the document was made.")
    status_version: int = Field(
        default=0, description="Bumped when residency changes; answers carry it in endpoint-load-metrics."
    )
    cpu_cache_bytes: int | None = Field(default=None, description="Bytes of host copies in the pod's CPU cache.")
    cpu_cache_limit_bytes: int | None = None
    # The configuration a pod serves, reloaded while it runs (MODEL_GROUPS_RELOAD_S, PLACEMENT).
    refused_groups: dict[str, str] = Field(
        default_factory=dict,
        description="Groups of model_groups.json this pod does not serve -> why (a malformed entry, or a model id "
        "another group keeps).",
    )
    config_error: str | None = Field(
        default=None,
        description="Why the last reload of model_groups.json or placement.json failed as a whole; the "
        "configuration before it keeps serving.",
    )
    groups_hash: str | None = Field(
        default=None,
        description="Short sha256 of the model_groups.json bytes served now (gpufleet.api.model_groups."
        "groups_digest): a writer can tell when the pod has picked up what it wrote.",
    )
    placement_generation: int | None = Field(
        default=None, description="The generation of the placement.json honoured now; None without one."
    )
    routing_headers: int = Field(
        default=0,
        description="Version of the router's decision headers (gpufleet.api.headers) this pod reads; 0: none"
        " (the router then rewrites the body where the client's would not do).",
    )

    def state_key(self) -> tuple[object, ...]:
        """What counts as a change worth an API write (everything but the timestamp)."""
        return (
            self.ready,
            self.url,
            tuple(
                (d.device, d.current_group, tuple(d.cached_groups), tuple(d.failed_groups), d.healthy, d.switching_to)
                for d in self.devices
            ),
            tuple(sorted(self.refused_groups.items())),
            self.groups_hash,
            self.config_error,
            self.placement_generation,
        )
