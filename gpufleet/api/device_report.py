"""What a pod reports about its devices' queues, typed: the queue document of ``GET /api/queue``.

A pod reports its devices from two sources, each with one writer:

| field (per device) | queue document (``queue_document`` here) | load report (``load_report.format_load``) |
|---|---|---|
| running, waiting (counts) | ``running_sequences``, ``queue_size`` | ``running``, ``waiting`` |
| which groups wait there | ``waiting_groups`` | no |
| status version (per pod) | ``status_version`` | ``status_version`` |

Every answer carries a load report; the queue document is fetched only from idle pods (a busy
pod's answers carry its counts). So a reader dates each field by the latest source that carries
it: the counts by the newer of the two, ``waiting_groups`` by the queue document alone (a load
report says nothing of which groups wait). One thing links them, which the writer keeps: a device
with nothing queued has no group waiting (``waiting_groups`` is empty exactly when ``queue_size``
is 0), so a newer report of an empty queue clears an older document's waiting groups.

The pod server, the benchmark's emulated pods and the tests' echo backend all write the document
with ``queue_document``; the router reads it with ``QueueDocument.model_validate``. Fields an
older writer left out take their defaults.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from gpufleet.api.load_report import DeviceLoad, LoadReport


class DeviceQueue(BaseModel):
    model_config = ConfigDict(extra="ignore")

    queue_size: int = Field(default=0, ge=0, description="Requests queued here, not yet running.")
    waiting_for_switch: int = Field(default=0, ge=0, description="Of those, requests of a group not current here.")
    queue_limit: int | None = Field(default=None, description="Requests that may queue here; beyond it, 429.")
    running_sequences: int = Field(default=0, ge=0, description="Sequences running in the batch now.")
    max_sequences: int | None = Field(default=None, description="Sequences the batch runs at once.")
    busy_workers: int = Field(default=0, ge=0, description="As running_sequences (older readers read this name).")
    idle_workers: int = Field(default=0, ge=0, description="max_sequences less running_sequences.")
    workers: int | None = Field(default=None, description="As max_sequences (older readers read this name).")
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0
    current_group: str | None = None
    switching_to: str | None = None
    waiting_groups: list[str] = Field(
        default_factory=list, description="The groups of the queued requests, sorted; empty exactly when none is."
    )

    def load(self) -> DeviceLoad:
        """The counts, as a load report carries them."""
        kv = self.kv_blocks_used / self.kv_blocks_total if self.kv_blocks_total else 0.0
        running = max(self.running_sequences, self.busy_workers)  # one count under two names (older writers: one)
        return DeviceLoad(running, self.queue_size, kv)


class QueueDocument(BaseModel):
    model_config = ConfigDict(extra="ignore")

    devices: dict[str, DeviceQueue] = Field(default_factory=dict)
    total_queued: int = 0
    total_running: int = 0
    status_version: int | None = Field(default=None, description="The status document's (bumped on residency changes).")

    def load(self) -> LoadReport:
        """The counts of every device, as a load report carries them."""
        return LoadReport({name: d.load() for name, d in self.devices.items()}, self.status_version)


def device_queue(
    *,
    running: int,
    max_sequences: int,
    queue_limit: int,
    queued_groups: Iterable[str] = (),
    current_group: str | None = None,
    switching_to: str | None = None,
    kv_blocks: tuple[int, int] = (0, 0),
) -> DeviceQueue:
    """One device's entry: ``queued_groups`` is the group of each queued request, in any order
    (its length is the queue's size, so the waiting groups and the count cannot disagree)."""
    groups = list(queued_groups)
    return DeviceQueue(
        queue_size=len(groups),
        waiting_for_switch=sum(1 for g in groups if g != current_group),
        queue_limit=queue_limit,
        running_sequences=running,
        max_sequences=max_sequences,
        busy_workers=running,
        idle_workers=max(0, max_sequences - running),
        workers=max_sequences,
        kv_blocks_used=kv_blocks[0],
        kv_blocks_total=kv_blocks[1],
        current_group=current_group,
        switching_to=switching_to,
        waiting_groups=sorted(set(groups)),
    )


def queue_document(devices: Mapping[str, DeviceQueue], status_version: int) -> dict[str, Any]:
    """The ``GET /api/queue`` document, as JSON-ready data: the one writer of it."""
    doc = QueueDocument(
        devices=dict(devices),
        total_queued=sum(d.queue_size for d in devices.values()),
        total_running=sum(d.running_sequences for d in devices.values()),
        status_version=status_version,
    )
    return doc.model_dump(mode="json")
