"""The demand document: what each group asks of the fleet, as one router sees it.

One writer: the router serves it at ``GET /api/demand`` (read-only, like the rest of
``/api``). One reader: the operator's scaler (``gpufleet.autoscale``), which fetches it from
every router it is given and adds the counts up. This is how the router's waiting requests
reach the scaler without the router holding any write access to the custom resources.

``in_flight`` counts the sequences this router has sent to pods and not yet seen answered
(running or queued at the pod); ``waiting`` counts the ones it holds itself because no pod
serves their group yet (scale from zero). A request with ``n`` choices counts ``n``.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

DEMAND_PATH = "/api/demand"
SCHEMA_VERSION = 1


class GroupDemand(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    namespace: str | None = Field(default=None, description="The group's namespace (Kubernetes); None elsewhere.")
    group: str = Field(description="The group's name (the ModelGroup's name on Kubernetes).")
    in_flight: int = Field(default=0, ge=0, description="Sequences sent to pods and not yet answered.")
    waiting: int = Field(default=0, ge=0, description="Sequences held at the router until a pod serves the group.")
    oldest_wait_seconds: float = Field(default=0.0, ge=0, description="How long the oldest waiting one has waited.")
    service_seconds: float | None = Field(
        default=None, gt=0, description="Mean time a request of this group holds its device (learned from answers)."
    )

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.group}" if self.namespace else self.group


class DemandReport(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: int = SCHEMA_VERSION
    router: str = Field(description="Which router wrote it (its pod name or host).")
    timestamp: float = Field(description="Unix time the document was made.")
    groups: list[GroupDemand] = Field(default_factory=list, description="Every group with demand, or known at zero.")


def merge(reports: list[DemandReport]) -> dict[str, GroupDemand]:
    """Several routers' documents as one: counts added, the oldest wait and the slowest service kept."""
    out: dict[str, GroupDemand] = {}
    for report in reports:
        for g in report.groups:
            prev = out.get(g.key)
            if prev is None:
                out[g.key] = g
                continue
            services = [s for s in (prev.service_seconds, g.service_seconds) if s is not None]
            out[g.key] = GroupDemand(
                namespace=g.namespace,
                group=g.group,
                in_flight=prev.in_flight + g.in_flight,
                waiting=prev.waiting + g.waiting,
                oldest_wait_seconds=max(prev.oldest_wait_seconds, g.oldest_wait_seconds),
                service_seconds=max(services) if services else None,
            )
    return out
