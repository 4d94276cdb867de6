"""The JSON documents an emulated pod answers with, in the pod server's own shapes (pure).

The status document goes through gpufleet.api.pod_status.PodStatus, the contract the
router parses, so a field the contract renames breaks the emulator here, not silently.
"""

from __future__ import annotations

import time
from typing import Any

from bench.scale.layout import EmulatedPod, model_ids
from gpufleet.api.device_report import device_queue, queue_document
from gpufleet.api.pod_status import DeviceStatus, PodStatus

WORKERS = 16  # sequences a device runs at once (the pod server's max_sequences)
QUEUE_LIMIT = 64
MEMORY_TOTAL_GB = 80.0


def status_doc(
    pod: EmulatedPod, url: str, groups: list[str], models: dict[str, str], status_version: int = 0
) -> dict[str, Any]:
    doc = PodStatus(
        pod=pod.name,
        node=pod.node,
        url=url,
        ready=True,
        devices=[
            DeviceStatus(
                device=d.device,
                current_group=d.current_group,
                cached_groups=list(d.cached_groups),
                workers=WORKERS,
                queue_limit=QUEUE_LIMIT,
                switch_seconds_from_cache=0.5,
                switch_seconds_from_disk=5.0,
            )
            for d in pod.devices
        ],
        groups=list(groups),
        models=dict(models),
        timestamp=time.time(),
        status_version=status_version,
    )
    return doc.model_dump(mode="json", exclude_none=True)


def queue_doc(pod: EmulatedPod, status_version: int = 0) -> dict[str, Any]:
    """Through the pod server's own writer; nothing queues on an emulated device (``queued`` stays 0),
    so no group waits."""
    devices = {
        d.device: device_queue(
            running=d.running,
            max_sequences=WORKERS,
            queue_limit=QUEUE_LIMIT,
            current_group=d.current_group,
            kv_blocks=(0, 1024),
        )
        for d in pod.devices
    }
    return queue_document(devices, status_version)


def gpu_stats_doc(pod: EmulatedPod) -> dict[str, Any]:
    devices = {}
    for d in pod.devices:
        util = min(100.0, 100.0 * d.running / WORKERS)
        used = 20.0 + (40.0 if d.current_group else 0.0)
        devices[d.device] = {
            "utilization": util,
            "memory_used": used,
            "memory_total": MEMORY_TOTAL_GB,
            "memory_percent": round(100.0 * used / MEMORY_TOTAL_GB, 1),
            "peak_utilization": util,
        }
    doc: dict[str, Any] = {"available": True, "devices": devices}
    doc.update(devices[pod.devices[0].device])  # the single-device fields old clients read
    return doc


def models_doc(pod: EmulatedPod, groups: list[str]) -> dict[str, Any]:
    out = []
    for g in groups:
        info = [
            {
                "device": d.device,
                "has_group": d.current_group == g or g in d.cached_groups,
                "is_current": d.current_group == g,
                "is_cached": g in d.cached_groups,
                "load_error": None,
                "fits": None,
            }
            for d in pod.devices
        ]
        loaded = [i["device"] for i in info if i["is_current"]]
        cached = [i["device"] for i in info if i["is_cached"]]
        models = [
            {
                "id": m,
                "task": "chat" if m.endswith("-chat") else "completion",
                "source": f"/models/{m}",
                "dtype": "auto",
                "loaded_on_devices": loaded,
                "cached_on_devices": cached,
                "status": "loaded" if loaded else "available",
            }
            for m in model_ids(g)
        ]
        out.append({"group_id": g, "is_default": g == groups[0], "device_info": info, "models": models})
    return {"model_groups": out, "cpu_cache": {"used_bytes": 0, "limit_bytes": None, "groups": []}}


def model_cards(models: dict[str, str]) -> dict[str, Any]:
    data = [
        {
            "id": m,
            "object": "model",
            "created": 0,
            "owned_by": "gpufleet",
            "group": g,
            "task": "chat" if m.endswith("-chat") else "completion",
        }
        for m, g in models.items()
    ]
    return {"object": "list", "data": data}
