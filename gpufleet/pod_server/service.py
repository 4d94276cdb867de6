"""The pod server's core: its devices, the dispatcher, and the documents it publishes."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from gpufleet.api.errors import InvalidRequest, Overloaded, Unavailable
from gpufleet.api.model_groups import ModelGroupsFile
from gpufleet.api.pod_status import DeviceStatus, PodStatus
from gpufleet.pod_server.fast_load import select_loader
from gpufleet.pod_server.group_runtime import GroupRuntime, build_group_runtime
from gpufleet.pod_server.inference import LoadedModel
from gpufleet.pod_server.metrics import PodMetrics
from gpufleet.pod_server.queue_order import QueuePolicy
from gpufleet.pod_server.residency import DeviceResidency, SwitchResult
from gpufleet.pod_server.scheduler import DeviceScheduler, Job, SchedulerHooks
from gpufleet.pod_server.settings import PodServerSettings
from gpufleet.routing.policy import Decision, DeviceState, Outcome, RouteRequest, Snapshot, choose_device

log = logging.getLogger(__name__)


class PodService:
    def __init__(
        self,
        settings: PodServerSettings,
        groups: ModelGroupsFile,
        metrics: PodMetrics,
        *,
        loader: Callable[..., LoadedModel] | None = None,
    ) -> None:
        self.settings = settings
        self.groups = groups
        self.metrics = metrics
        self.pod = settings.pod_name or "local"
        self.changed = asyncio.Event()  # set on any state change; the status publisher waits on it
        self.ready = False
        self.preload_task: asyncio.Task[None] | None = None  # the default group's preload, when there is one
        self.schedulers: dict[str, DeviceScheduler] = {}
        loader = loader or select_loader(settings.load_method)
        policy = QueuePolicy(max_wait_s=settings.switch_max_wait_s, min_residency_s=settings.switch_min_residency_s)
        for device in settings.devices:
            hooks = SchedulerHooks(
                on_switch=self._on_switch, on_load_failed=self._on_load_failed, on_change=self._on_change
            )
            self.schedulers[device] = DeviceScheduler(
                device,
                DeviceResidency(device, settings.max_cpu_cached_models, loader),
                groups,
                max_sequences=settings.max_sequences_per_device,
                workers=settings.num_workers_per_gpu,
                queue_limit=settings.max_queue_per_device,
                load_timeout_s=settings.model_load_timeout_s,
                failed_retry_s=settings.failed_load_retry_s,
                runtime_factory=self._build_runtime,
                policy=policy,
                hooks=hooks,
            )
        for device in settings.devices:
            self.metrics.workers.labels(**metrics.labels(device)).set(settings.num_workers_per_gpu)
            self.metrics.max_sequences.labels(**metrics.labels(device)).set(settings.max_sequences_per_device)

    def _build_runtime(self, device: str, group: str, models: dict[str, LoadedModel]) -> GroupRuntime:
        """Engines for a group that just became current on ``device`` (blocking: a device thread)."""
        return build_group_runtime(
            device, group, models, self.settings, self.schedulers[device].run_blocking, self.metrics
        )

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        for s in self.schedulers.values():
            s.start()
        if self.settings.lazy_load_model:
            self.ready = True
            self._on_change()

    async def preload_default(self) -> None:
        """Make the default group current on every device; the pod is ready once one has it."""
        group = self.groups.default_group
        results = await asyncio.gather(
            *(s.ensure_group(group) for s in self.schedulers.values()), return_exceptions=True
        )
        failures = [r for r in results if isinstance(r, BaseException)]
        for r in failures:
            log.error("default group preload failed", extra={"group": group, "error": str(r)})
        self.ready = len(failures) < len(results)
        self._on_change()

    async def stop(self, timeout_s: float = 30.0) -> None:
        self.ready = False
        await asyncio.gather(*(s.drain_and_stop(timeout_s) for s in self.schedulers.values()))

    # --- dispatch --------------------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        states = []
        for device, s in self.schedulers.items():
            r = s.residency
            states.append(
                DeviceState(
                    pod=self.pod,
                    device=device,
                    node=self.settings.node_name,
                    current_group=r.current_group,
                    cached_groups=frozenset(r.cached_groups()),
                    failed_groups=frozenset(s.failed_groups()),
                    healthy=not s.closing,
                    workers=s.max_sequences,  # sequences that run at once, batched
                    queue_limit=s.queue_limit,
                    load=s.load,
                    switching_to=s.switching_to,
                    switch_s_from_cache=s.switch_s.get("cache"),
                    switch_s_from_disk=s.switch_s.get("disk"),
                    last_switch_at=s.last_switch_at,
                )
            )
        return Snapshot(tuple(states), now=time.monotonic())

    def dispatch(
        self, model_id: str, group: str, exclusive: str | None, weight: int, request_id: str | None = None
    ) -> tuple[str, Job]:
        """Queue a request holding ``weight`` sequence slots on the best device for ``group``."""
        decision = choose_device(RouteRequest(group=group, exclusive=exclusive), self.snapshot())
        log.info(
            "dispatch",
            extra={
                "request_id": request_id,
                "model": model_id,
                "group": group,
                "device": decision.choice.device if decision.choice else None,
                "outcome": decision.outcome.value,
                "reason": decision.reason,
                "candidates": [(c.key, c.cost_s, c.note) for c in decision.candidates],
            },
        )
        if not decision.routed or decision.choice is None:
            self.metrics.rejected.labels(**self.metrics.const, reason=decision.outcome.value).inc()
            raise self._refusal(decision, group, exclusive)
        device = decision.choice.device
        try:
            return device, self.schedulers[device].submit(group, weight)
        except Overloaded:
            self.metrics.rejected.labels(**self.metrics.const, reason="saturated").inc()
            raise

    def _refusal(self, d: Decision, group: str, exclusive: str | None) -> Exception:
        if d.outcome is Outcome.UNKNOWN_TARGET:
            known = ", ".join(self.schedulers)
            return InvalidRequest(
                f"exclusive_gpu {exclusive!r} is not a device of this server (devices: {known})",
                param="exclusive_gpu",
                code="unknown_device",
            )
        if d.outcome is Outcome.SATURATED:
            wait = min(s.retry_after_s() for s in self.schedulers.values())
            return Overloaded(f"every eligible device queue is full for group {group!r}", retry_after_s=wait)
        if d.outcome is Outcome.GROUP_FAILED:
            errors = {e for s in self.schedulers.values() for g, e in s.failed_groups().items() if g == group}
            detail = next(iter(errors), "load failed")
            return Unavailable(
                f"model group {group!r} is unavailable: {detail}", code="model_load_failed", retry_after_s=30
            )
        return Unavailable(f"no device can serve group {group!r}: {d.reason}", retry_after_s=5)

    # --- hooks ------------------------------------------------------------------------------

    def _on_change(self) -> None:
        self.changed.set()
        m = self.metrics
        waiting = running = 0
        for device, s in self.schedulers.items():
            labels = m.labels(device)
            m.queue_depth.labels(**labels).set(s.queued)
            m.running.labels(**labels).set(s.running)
            waiting += s.queued
            running += s.running
        m.vllm_waiting.set(waiting)
        m.vllm_running.set(running)

    def refresh_kv_metrics(self) -> None:
        """KV use is read from the engines when asked for (a scrape), not on every admission."""
        used = total = 0
        for device, s in self.schedulers.items():
            u, t = s.runtime.kv_usage() if s.runtime else (0, 0)
            self.metrics.kv_blocks_used.labels(**self.metrics.labels(device)).set(u)
            self.metrics.kv_blocks_total.labels(**self.metrics.labels(device)).set(t)
            used, total = used + u, total + t
        self.metrics.vllm_kv.set(used / total if total else 0.0)

    def _on_switch(self, device: str, result: SwitchResult) -> None:
        labels = self.metrics.labels(device)
        self.metrics.switches.labels(**labels, group=result.group, source=result.source).inc()
        self.metrics.switch_seconds.labels(**labels, source=result.source).observe(result.seconds)
        self._refresh_residency_metrics()

    def _on_load_failed(self, device: str, group: str, error: str) -> None:
        self.metrics.load_failures.labels(**self.metrics.labels(device), group=group).inc()

    def _refresh_residency_metrics(self) -> None:
        m = self.metrics
        current = []
        for device, s in self.schedulers.items():
            labels = m.labels(device)
            cached = set(s.residency.cached_groups())
            for group in self.groups.groups:
                m.group_current.labels(**labels, group=group).set(1 if s.residency.current_group == group else 0)
                m.group_cached.labels(**labels, group=group).set(1 if group in cached else 0)
            if s.residency.current_group:
                current.append(s.residency.current_group)
        m.vllm_lora.clear()
        m.vllm_lora.labels(
            running_lora_adapters=",".join(sorted(set(current))),
            waiting_lora_adapters="",
            max_lora=str(len(self.schedulers)),
        ).set(time.time())

    # --- documents --------------------------------------------------------------------------

    def status(self) -> PodStatus:
        devices = []
        for device, s in self.schedulers.items():
            r = s.residency
            devices.append(
                DeviceStatus(
                    device=device,
                    current_group=r.current_group,
                    cached_groups=r.cached_groups(),
                    failed_groups=sorted(s.failed_groups()),
                    healthy=not s.closing,
                    workers=s.max_sequences,
                    queue_limit=s.queue_limit,
                    switching_to=s.switching_to,
                    switch_seconds_from_cache=s.switch_s.get("cache"),
                    switch_seconds_from_disk=s.switch_s.get("disk"),
                    last_switch_unix=(time.time() - (time.monotonic() - s.last_switch_at))
                    if s.last_switch_at
                    else None,
                )
            )
        return PodStatus(
            pod=self.pod,
            namespace=self.settings.pod_namespace,
            node=self.settings.node_name,
            url=self.settings.pod_url,
            ready=self.ready,
            devices=devices,
            groups=sorted(self.groups.groups),
            models={m.id: g for g, spec in self.groups.groups.items() for m in spec.models},
            timestamp=time.time(),
        )

    def models_document(self) -> dict[str, Any]:
        out = []
        for group_id, spec in self.groups.groups.items():
            device_info = []
            for device, s in self.schedulers.items():
                r = s.residency
                device_info.append(
                    {
                        "device": device,
                        "has_group": r.current_group == group_id or group_id in r.cache,
                        "is_current": r.current_group == group_id,
                        "is_cached": group_id in r.cache,
                        "load_error": s.failed_groups().get(group_id),
                    }
                )
            loaded_on = [i["device"] for i in device_info if i["is_current"]]
            failed = any(i["load_error"] for i in device_info)
            out.append(
                {
                    "group_id": group_id,
                    "is_default": group_id == self.groups.default_group,
                    "device_info": device_info,
                    "models": [
                        {
                            "id": m.id,
                            "task": m.task,
                            "source": m.source,
                            "dtype": m.dtype,
                            "loaded_on_devices": loaded_on,
                            "cached_on_devices": [i["device"] for i in device_info if i["is_cached"]],
                            "status": "loaded" if loaded_on else ("failed" if failed else "available"),
                        }
                        for m in spec.models
                    ],
                }
            )
        return {"model_groups": out}

    def queue_document(self) -> dict[str, Any]:
        devices: dict[str, Any] = {}
        for device, s in self.schedulers.items():
            used, total = s.runtime.kv_usage() if s.runtime else (0, 0)
            current = s.residency.current_group
            devices[device] = {
                "queue_size": s.queued,
                "waiting_for_switch": sum(1 for j in s.jobs() if j.group != current),
                "queue_limit": s.queue_limit,
                # A device runs up to max_sequences sequences of its current group at once, batched.
                "running_sequences": s.running,
                "max_sequences": s.max_sequences,
                "busy_workers": s.running,
                "idle_workers": max(0, s.max_sequences - s.running),
                "workers": s.max_sequences,
                "kv_blocks_used": used,
                "kv_blocks_total": total,
                "current_group": current,
                "switching_to": s.switching_to,
            }
        return {
            "devices": devices,
            "total_queued": sum(s.queued for s in self.schedulers.values()),
            "total_running": sum(s.running for s in self.schedulers.values()),
        }
