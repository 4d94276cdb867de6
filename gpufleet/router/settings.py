"""Router settings: environment variables and an optional ``.env``, parsed once in main()."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import NoDecode

from gpufleet.api.labels import COMPONENT_POD_SERVER, LABEL_COMPONENT
from gpufleet.settings_support import ServerSettings, parse_settings, split_csv

PolicyName = Literal["affinity", "round_robin", "least_load", "lru_multiplex", "gie"]


# With static discovery the fleet is a list someone wrote and cannot grow behind the router's back:
# up to this many pods, per-pod series cost little and say much. A Kubernetes fleet grows, and its
# pods' names change with every restart (series that never go away): there they must be asked for.
POD_LABELS_AUTO_MAX = 64


class RouterSettings(ServerSettings):
    """host, port, api_key, max_body_bytes and log_level come from ServerSettings."""

    discovery: Literal["static", "kubernetes"] = Field(
        default="static", description="Where pod servers come from: POD_URLS, or a Kubernetes pod watch."
    )
    pod_urls: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Comma-separated pod-server URLs (static discovery)."
    )
    pod_namespaces: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["default"], description="Namespaces to watch for pod servers (kubernetes discovery)."
    )
    pod_label_selector: str = Field(
        default=f"{LABEL_COMPONENT}={COMPONENT_POD_SERVER}", description="Label selector of pod-server Pods."
    )
    pod_port: int = Field(default=8000, ge=1, le=65535, description="Pod-server port when a Pod names none.")
    pod_api_key: str | None = Field(default=None, description="Bearer key the router sends to pod servers.")
    routing_policy: PolicyName = Field(
        default="affinity", description="affinity|round_robin|least_load|lru_multiplex|gie"
    )
    status_interval_s: float = Field(
        default=1.0,
        gt=0,
        description="How often the router checks which pods need a status poll: new ones, those whose answers "
        "announced a new status version, and idle ones (IDLE_POLL_S).",
    )
    queue_interval_s: float = Field(
        default=1.0, gt=0, description="How often the router checks which pods need a load poll (idle ones)."
    )
    idle_poll_s: float = Field(
        default=90.0,
        gt=0,
        description="A pod that answered nothing for this long is polled (answers carry its load otherwise).",
    )
    poll_timeout_s: float = Field(default=2.0, gt=0, description="Timeout of one status or queue poll.")
    stale_after_s: float = Field(
        default=300.0, gt=0, description="A pod not heard from for this long is 'unknown' (more than IDLE_POLL_S)."
    )
    connect_timeout_s: float = Field(default=2.0, gt=0)
    first_byte_timeout_s: float = Field(
        default=300.0, gt=0, description="Until the pod answers; covers its queue and a group switch."
    )
    idle_timeout_s: float = Field(default=60.0, gt=0, description="Longest silence between two chunks.")
    upstream_keepalive_s: float = Field(
        default=30.0,
        gt=0,
        description="Idle connections to pods are dropped after this; keep it below the pods' KEEP_ALIVE_S.",
    )
    retries: int = Field(default=1, ge=0, le=3, description="Retries on another pod before the first byte.")
    eject_after_failures: int = Field(default=3, ge=1, description="Consecutive failures that eject a pod.")
    eject_cooldown_s: float = Field(default=10.0, gt=0, description="How long an ejected pod sits out (doubles).")
    eject_cooldown_max_s: float = Field(default=120.0, gt=0)
    lease_max_ttl_s: int = Field(default=86400, ge=1, description="Longest TTL an exclusive lease may ask for.")
    lease_namespace: str | None = Field(
        default=None,
        description="Namespace of the router's Lease objects (kubernetes discovery); default: the router's own.",
    )
    scale_wait_seconds: float = Field(
        default=120.0,
        ge=0,
        description="A request for a known group that no device serves now (scaled to zero, its pods starting) "
        "is held this long for one to come; 0: answered 503 at once.",
    )
    scale_wait_queue: int = Field(
        default=256, ge=0, description="Sequences (a request with n choices counts n) held that way at once, in all."
    )
    scale_wait_comment_seconds: float = Field(
        default=1.0,
        ge=0,
        description="A held streaming request gets 200 and an SSE comment (': loading') after this long, and "
        "another every few seconds, so proxies between it and the client keep the connection open.",
    )
    metrics_pod_labels: bool | Literal["auto"] = Field(
        default="auto",
        description="Per-pod and per-device series (pod, gpu labels) on the router's metrics. auto: on with "
        f"static discovery of at most {POD_LABELS_AUTO_MAX} pods, off with kubernetes discovery.",
    )

    _split_urls = field_validator("pod_urls", "pod_namespaces", mode="before")(split_csv)

    @model_validator(mode="after")
    def _check(self) -> RouterSettings:
        self.pod_urls = [u.rstrip("/") for u in self.pod_urls]
        for url in self.pod_urls:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"POD_URLS: {url!r} is not an http(s) URL")
        if self.discovery == "static" and not self.pod_urls:
            raise ValueError("POD_URLS: static discovery needs at least one pod-server URL")
        return self

    @property
    def pod_labels_on(self) -> bool:
        """``METRICS_POD_LABELS`` resolved once, at start-up: a series set never changes while running."""
        if self.metrics_pod_labels == "auto":
            return self.discovery == "static" and len(self.pod_urls) <= POD_LABELS_AUTO_MAX
        return self.metrics_pod_labels


def load_router_settings(**overrides: Any) -> RouterSettings:
    return parse_settings(RouterSettings, **overrides)
