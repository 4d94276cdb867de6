"""Pod server settings: environment variables and an optional ``.env``, parsed once in main()."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, Field, field_validator, model_validator
from pydantic_settings import NoDecode

from gpufleet.pod_server.devices import parse_device_list
from gpufleet.pod_server.memory import parse_device_memory
from gpufleet.settings_support import ServerSettings, parse_settings, split_csv


class PodServerSettings(ServerSettings):
    """host, port, api_key, max_body_bytes and log_level come from ServerSettings."""

    devices: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        validation_alias=AliasChoices("DEVICES", "DEVICE"),
        description="Comma-separated devices (cuda:0,cuda:1 or cpu:0,cpu:1). Default: every visible GPU, else cpu.",
    )
    num_workers_per_gpu: int = Field(
        default=1, ge=1, le=64, description="Worker threads per device for its blocking work (embedding batches)."
    )
    max_sequences_per_device: int | None = Field(
        default=None,
        ge=1,
        le=4096,
        description="Sequences batched at once per device (continuous batching); default: 64 on a GPU, 32 on a"
        " CPU device (where the library's step peaks: bench/results/engine_peer_max_seq_32.json).",
    )
    cpu_packed_linear: bool = Field(
        default=True,
        description="On a CPU device, the current group's linear layers run on oneDNN's packed weights "
        "(one more copy of them while current; bench/results/engine_peer.json).",
    )
    kv_cache_gb: float | None = Field(
        default=None,
        gt=0,
        description="KV cache budget per device, shared by the current group's generative models; "
        "default: 30% of a GPU's memory, 0.25 GB on a CPU device.",
    )
    embedding_batch_size: int = Field(default=32, ge=1, le=1024, description="Inputs per embedding forward pass.")
    embedding_batch_wait_ms: float = Field(
        default=2.0, ge=0, le=1000, description="How long an embedding batch waits to fill."
    )
    switch_max_wait_s: float = Field(
        default=5.0, ge=0, description="Another group's oldest request waits at most this before a switch starts."
    )
    switch_min_residency_s: float = Field(
        default=2.0, ge=0, description="A group just switched in is not switched out for waiting work before this."
    )
    switch_linger_s: float = Field(
        default=0.5,
        ge=0,
        le=60,
        description="With nothing queued for the current group, wait this long for more of it before switching.",
    )
    default_group: str | None = Field(default=None, description="Overrides default_group of model_groups.json.")
    max_cpu_cached_models: int = Field(
        default=4, ge=0, le=1024, description="Models parked in each device's CPU cache."
    )
    max_cpu_cache_gb: float | None = Field(
        default=None,
        gt=0,
        description="Bytes of host copies in the pod's CPU cache (shared by its devices); default: half the "
        "host RAM available at start-up.",
    )
    device_memory_gb: str | None = Field(
        default=None,
        description="Caps the memory a device may use, in GB: one number for every device, or per device "
        "(cpu:0=0.06,cuda:1=70). Default: the device's own memory (host RAM for CPU devices).",
    )
    device_memory_reserve_gb: float | None = Field(
        default=None,
        ge=0,
        description="Memory per device kept free beside a group's weights and KV cache (CUDA context, allocator "
        "slack); default: 0.5 GB on a GPU, 0 on a CPU device.",
    )
    prefetch: bool = Field(
        default=True, description="Load groups queued behind the current one into the CPU cache in the background."
    )
    lazy_load_model: bool = Field(default=False, description="Load the default group on first use, not at start-up.")
    model_groups: Path | None = Field(default=None, description="Path of model_groups.json; default: demo models.")
    model_groups_reload_s: float = Field(
        default=0.0,
        ge=0,
        description="Poll model_groups.json (and PLACEMENT) this often and apply changes without a restart; "
        "0: read once at start-up.",
    )
    placement: Path | None = Field(
        default=None,
        description="Path of a pool's placement.json: which group each device of this pod makes current or "
        "caches (by POD_NAME and device index); default: none.",
    )
    max_queue_per_device: int = Field(default=256, ge=1, le=100_000, description="Requests waiting per device.")
    model_load_timeout_s: float = Field(default=300.0, gt=0, description="A group load taking longer fails.")
    max_tokens_default: int = Field(default=64, ge=1, le=4096, description="max_tokens when a request gives none.")
    load_method: Literal["auto", "fast", "from_pretrained"] = Field(
        default="auto", description="How weights are read from disk: auto = fast path on GPUs only."
    )
    failed_load_retry_s: float = Field(default=30.0, ge=0, description="A failed group is retried after this.")
    demo_models_dir: Path = Field(
        default_factory=lambda: Path.home() / ".cache" / "gpufleet" / "demo-models",
        description="Where `gpufleet demo-models` builds the tiny models.",
    )
    torch_threads: int | None = Field(default=None, ge=1, description="torch intra-op threads; default: cores/devices.")
    # Cluster identity, from the downward API.
    pod_name: str | None = None
    pod_namespace: str | None = None
    pod_uid: str | None = Field(default=None, description="This Pod's uid (owner of its status Lease).")
    node_name: str | None = None
    pod_url: str | None = Field(default=None, description="URL the router should use to reach this pod.")
    status_annotation: bool = Field(
        default=False,
        description="Publish the status document in the status annotation of this pod's Lease (named like the pod).",
    )
    status_heartbeat_s: float = Field(default=60.0, gt=0, description="Lease rewrite interval without changes.")

    _split = field_validator("devices", mode="before")(split_csv)

    @model_validator(mode="after")
    def _devices(self) -> PodServerSettings:
        self.devices = parse_device_list(self.devices)
        parse_device_memory(self.device_memory_gb, self.devices)  # refused at start-up, by name
        return self

    def device_memory_caps(self) -> dict[str, int]:
        return parse_device_memory(self.device_memory_gb, self.devices)


def load_settings(**overrides: Any) -> PodServerSettings:
    return parse_settings(PodServerSettings, **overrides)
