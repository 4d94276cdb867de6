"""Operator settings: GPUFLEET_OPERATOR_* environment variables, parsed once in main()."""

from __future__ import annotations

import json
from typing import Annotated, Any

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from gpufleet.api.modelgroup import DEFAULT_IMAGE, PodTemplateFields
from gpufleet.operator.builders import RUN_AS_USER, BuildOptions
from gpufleet.settings_support import parse_settings, split_csv


class OperatorSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GPUFLEET_OPERATOR_", extra="ignore")

    namespaces: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Comma-separated namespaces to watch; empty: all namespaces."
    )
    pod_server_image: str = Field(default=DEFAULT_IMAGE, min_length=1, description="Default pod server image.")
    pod_server_cluster_role: str = Field(
        default="gpufleet-pod-server",
        min_length=1,
        description="ClusterRole (pods get/patch) bound to each group's ServiceAccount in its namespace.",
    )
    pod_server_log_level: str = "INFO"
    pod_server_run_as_user: int | None = Field(
        default=RUN_AS_USER, ge=1, description="UID of the pod servers; empty: the platform assigns one (OpenShift)."
    )
    pod_server_defaults: Annotated[dict[str, Any], NoDecode] = Field(
        default_factory=dict,
        description="JSON object: defaults of a ModelGroup's pod-template fields (runtimeClassName, "
        "imagePullSecrets, tolerations, ...) that a ModelGroup overrides field by field.",
    )
    instance: str | None = Field(default=None, description="app.kubernetes.io/instance label of what we create.")
    resync_seconds: float = Field(default=30.0, ge=1.0, le=3600.0, description="How often each group is re-checked.")
    field_manager: str = Field(default="gpufleet-operator", min_length=1)
    health_host: str = "0.0.0.0"
    health_port: int = Field(default=8080, ge=0, le=65535, description="Port of GET /healthz; 0: no endpoint.")
    metrics_port: int = Field(
        default=0, ge=0, le=65535, description="Port of GET /metrics (Prometheus, on health_host); 0: none."
    )
    log_level: str = "INFO"
    peering: str | None = Field(
        default=None,
        description="kopf peering name: replicas sharing it elect one that acts; empty: standalone (one replica).",
    )

    demand_urls: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated base URLs of the routers whose demand documents (GET /api/demand) drive"
        " residency and spec.autoscaling; empty: nothing scales from demand.",
    )
    autoscale_seconds: float = Field(
        default=5.0, ge=0.5, le=600.0, description="How often demand is fetched and the scaling rules run."
    )

    _split = field_validator("namespaces", "demand_urls", mode="before")(split_csv)

    @field_validator("pod_server_run_as_user", mode="before")
    @classmethod
    def _uid(cls, value: Any) -> Any:
        return None if value in ("", "null", "none") else value

    @field_validator("pod_server_defaults", mode="before")
    @classmethod
    def _defaults(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = json.loads(value or "{}")
        PodTemplateFields.model_validate(value)  # only pod-template fields, each well-formed
        return value

    def build_options(self) -> BuildOptions:
        return BuildOptions(
            image=self.pod_server_image,
            pod_server_cluster_role=self.pod_server_cluster_role,
            instance=self.instance,
            log_level=self.pod_server_log_level,
            defaults=dict(self.pod_server_defaults),
            run_as_user=self.pod_server_run_as_user,
        )


def load_settings(**overrides: Any) -> OperatorSettings:
    return parse_settings(OperatorSettings, **{k: v for k, v in overrides.items() if v is not None})
