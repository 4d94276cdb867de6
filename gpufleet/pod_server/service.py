"""The pod server's core: its devices, the dispatcher, and the documents it publishes."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from gpufleet.api.errors import Overloaded
from gpufleet.api.load_report import DeviceLoad, format_load
from gpufleet.api.model_groups import GroupSpec, ModelGroupsFile, ModelSpec
from gpufleet.api.pod_status import DeviceStatus, PodStatus
from gpufleet.pod_server.devices import is_cuda
from gpufleet.pod_server.fast_load import select_loader
from gpufleet.pod_server.group_runtime import GroupRuntime, build_group_runtime, kv_budget_bytes
from gpufleet.pod_server.host_cache import HostCache
from gpufleet.pod_server.inference import LoadedModel
from gpufleet.pod_server.memory import (
    Fit,
    GroupNeed,
    MemoryLedger,
    check_fit,
    default_cpu_cache_bytes,
    estimate_group_need,
)
from gpufleet.pod_server.metrics import PodMetrics
from gpufleet.pod_server.queue_order import QueuePolicy
from gpufleet.pod_server.residency import DeviceResidency, SwitchResult
from gpufleet.pod_server.scheduler import DeviceScheduler, InsufficientDeviceMemory, Job, SchedulerHooks
from gpufleet.pod_server.settings import PodServerSettings
from gpufleet.routing.policy import Costs, Decision, Outcome, RouteRequest, Snapshot, honour_choice
from gpufleet.routing.refusal import RefusalContext, refusal_error, retry_after_s

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
        self.device_uuids: dict[str, str | None] = {}  # device -> its GPU's UUID, set from the stats source
        self.changed = asyncio.Event()  # set on any state change; the status publisher waits on it
        self.status_version = 0  # bumped when the status document changes in a way routing cares about
        self.ready = False
        self.preload_task: asyncio.Task[None] | None = None  # the default group's preload, when there is one
        self.schedulers: dict[str, DeviceScheduler] = {}
        loader = loader or select_loader(settings.load_method)
        self._loader = loader
        self.ledger = MemoryLedger(settings.devices, settings.device_memory_caps())
        cache_bytes = settings.max_cpu_cache_gb
        self.host_cache = HostCache(
            settings.max_cpu_cached_models,
            int(cache_bytes * 1e9) if cache_bytes is not None else default_cpu_cache_bytes(),
            self.ledger,
        )
        self._needs: dict[tuple[str, str], GroupNeed] = {}
        self._needs_lock = threading.Lock()
        # One background loader for the pod: prefetches never compete with each other for disk or RAM.
        self._prefetcher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch")
        self._prefetching: set[str] = set()
        self.prefetch_loads = 0
        policy = QueuePolicy(
            max_wait_s=settings.switch_max_wait_s,
            min_residency_s=settings.switch_min_residency_s,
            linger_s=settings.switch_linger_s,
        )
        for device in settings.devices:
            hooks = SchedulerHooks(
                on_switch=self._on_switch, on_load_failed=self._on_load_failed, on_change=self._on_change
            )
            self.schedulers[device] = DeviceScheduler(
                device,
                DeviceResidency(
                    device, settings.max_cpu_cached_models, loader, host_cache=self.host_cache, ledger=self.ledger
                ),
                groups,
                max_sequences=settings.max_sequences_per_device,
                workers=settings.num_workers_per_gpu,
                queue_limit=settings.max_queue_per_device,
                load_timeout_s=settings.model_load_timeout_s,
                failed_retry_s=settings.failed_load_retry_s,
                runtime_factory=self._build_runtime,
                policy=policy,
                hooks=hooks,
                fit_check=self.fit,
                prefetch=self.prefetch if settings.prefetch else None,
            )
        for device in settings.devices:
            self.metrics.workers.labels(**metrics.labels(device)).set(settings.num_workers_per_gpu)
            self.metrics.max_sequences.labels(**metrics.labels(device)).set(settings.max_sequences_per_device)

    def _build_runtime(self, device: str, group: str, models: dict[str, LoadedModel]) -> GroupRuntime:
        """Engines for a group that just became current on ``device`` (blocking: a device thread)."""
        return build_group_runtime(
            device, group, models, self.settings, self.schedulers[device].run_blocking, self.metrics
        )

    # --- memory -----------------------------------------------------------------------------

    def reserve_bytes(self, device: str) -> int:
        gb = self.settings.device_memory_reserve_gb
        return int((gb if gb is not None else (0.5 if is_cuda(device) else 0.0)) * 1e9)

    def need(self, device: str, group: str, spec: GroupSpec) -> GroupNeed:
        """What the group will take on ``device`` (estimated once per device and group; blocking)."""
        key = (device, group)
        with self._needs_lock:
            known = self._needs.get(key)
        if known is None:
            known = estimate_group_need(
                group,
                spec,
                device,
                kv_budget_bytes(device, self.settings.kv_cache_gb),
                self.settings.max_sequences_per_device,
            )
            with self._needs_lock:
                self._needs[key] = known
        return known

    def fit(self, device: str, group: str, spec: GroupSpec) -> Fit:
        """The fit check before a switch (blocking: reads checkpoint headers and the device's memory)."""
        return check_fit(
            self.need(device, group, spec), self.ledger.capacity(device).total_bytes, self.reserve_bytes(device)
        )

    def prefetch(self, device: str, group: str, spec: GroupSpec) -> None:
        """Load a queued group into the host cache in the background, if it fits and the budget allows."""
        if group in self._prefetching or group in self.host_cache or self.schedulers[device].closing:
            return
        self._prefetching.add(group)
        try:
            self._prefetcher.submit(self._prefetch_blocking, device, group, spec)
        except RuntimeError:  # shutting down
            self._prefetching.discard(group)

    def _prefetch_blocking(self, device: str, group: str, spec: GroupSpec) -> None:
        try:
            if not self.fit(device, group, spec).fits:
                return
            need = self.need(device, group, spec)
            if not self.host_cache.room_for(need.weight_bytes, len(spec.models)):
                log.info("prefetch skipped: CPU cache full", extra={"group": group, "bytes": need.weight_bytes})
                return
            pin = any(is_cuda(d) for d in self.schedulers)
            started = time.perf_counter()
            with self.host_cache.group_lock(group):
                if group in self.host_cache:
                    return
                models: dict[str, LoadedModel] = {}
                for m in spec.models:
                    loaded = self._loader(_host_spec(m, device), "cpu")
                    loaded.ensure_host_copy(pin=pin)
                    models[m.id] = loaded
                cached, evicted = self.host_cache.insert(group, models, device=None, prefetched=True)
            self.prefetch_loads += cached
            log.info(
                "group prefetched" if cached else "prefetch not cached: CPU cache full",
                extra={"group": group, "seconds": round(time.perf_counter() - started, 3), "evicted": evicted},
            )
        except Exception as exc:  # a prefetch is a hint: its failure costs only the hint
            log.warning("prefetch failed", extra={"group": group, "error": str(exc)})
        finally:
            self._prefetching.discard(group)

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
        self.status_version += 1
        self._on_change()

    async def stop(self, timeout_s: float = 30.0) -> None:
        self.ready = False
        self._prefetcher.shutdown(wait=False, cancel_futures=True)
        await asyncio.gather(*(s.drain_and_stop(timeout_s) for s in self.schedulers.values()))

    # --- dispatch --------------------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        """This pod's devices as routing sees them, with the switch and service times measured here."""
        states = tuple(
            dataclasses.replace(
                s.device_state(), pod=self.pod, node=self.settings.node_name, uuid=self.device_uuids.get(device)
            )
            for device, s in self.schedulers.items()
        )
        return Snapshot(states, now=time.monotonic(), costs=self.costs())

    def costs(self) -> Costs:
        """Routing costs with this pod's learned service time (the devices' mean of what they learned)."""
        learned = [s.service.seconds for s in self.schedulers.values() if s.service.seconds is not None]
        if not learned:
            return Costs()
        return dataclasses.replace(Costs(), service_s=round(sum(learned) / len(learned), 4))

    def dispatch(
        self,
        model_id: str,
        group: str,
        exclusive: str | None,
        weight: int,
        request_id: str | None = None,
        routed_device: str | None = None,
    ) -> tuple[str, Job]:
        """Queue a request holding ``weight`` sequence slots on the best device for ``group``; the
        device the router chose (``routed_device``) while it is still eligible."""
        decision = honour_choice(RouteRequest(group=group, exclusive=exclusive), self.snapshot(), routed_device)
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
        if d.outcome is Outcome.GROUP_FAILED and all(group in s.unfit for s in self.schedulers.values()):
            s0 = next(iter(self.schedulers.values()))
            return InsufficientDeviceMemory(s0.unfit[group].message(group, s0.device))
        errors = {e for s in self.schedulers.values() for g, e in s.failed_groups().items() if g == group}
        ctx = RefusalContext("this server", tuple(self.schedulers), next(iter(sorted(errors)), None))
        snap = self.snapshot()
        return refusal_error(d, group, exclusive, ctx, retry_after_s(snap.devices, snap.costs))

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

    def refresh_memory_metrics(self) -> None:
        m = self.metrics
        m.cpu_cache_bytes.set(self.host_cache.used_bytes())
        m.model_device_bytes.clear()
        for device in self.schedulers:
            for mid, e in self.ledger.resident(device).items():
                m.model_device_bytes.labels(**m.labels(device), model=mid, kind="weights").set(e.weight_bytes)
                m.model_device_bytes.labels(**m.labels(device), model=mid, kind="kv_cache").set(e.kv_bytes)

    def load_header(self) -> str:
        """This pod's load for the ``endpoint-load-metrics`` header of every answer."""
        devices = {}
        for device, s in self.schedulers.items():
            used, total = s.runtime.kv_usage() if s.runtime else (0, 0)
            devices[device] = DeviceLoad(s.running, s.queued, used / total if total else 0.0)
        return format_load(devices, self.status_version)

    def _on_switch(self, device: str, result: SwitchResult) -> None:
        self.status_version += 1  # residency changed: routers refetch the status document
        labels = self.metrics.labels(device)
        self.metrics.switches.labels(**labels, group=result.group, source=result.source).inc()
        self.metrics.switch_seconds.labels(**labels, source=result.source).observe(result.seconds)
        if result.prefetched:
            self.metrics.prefetched_switches.labels(**labels).inc()
        self._refresh_residency_metrics()

    def _on_load_failed(self, device: str, group: str, error: str) -> None:
        self.status_version += 1
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
            mem = self.ledger.device_document(device)
            devices.append(
                DeviceStatus(
                    device=device,
                    uuid=self.device_uuids.get(device),
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
                    insufficient_memory_groups={g: f.message(g, device) for g, f in s.unfit.items()},
                    memory_total_bytes=mem["memory_total_bytes"],
                    memory_free_bytes=mem["memory_free_bytes"],
                    memory_reserved_bytes=self.reserve_bytes(device),
                    memory_ledger_bytes=mem["memory_ledger_bytes"],
                    prefetched_switches=s.prefetched_switches,
                    restore_error=r.restore_error,
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
            status_version=self.status_version,
            cpu_cache_bytes=self.host_cache.used_bytes(),
            cpu_cache_limit_bytes=self.host_cache.max_bytes,
        )

    def models_document(self) -> dict[str, Any]:
        out = []
        host = self.ledger.host_copies()
        resident = {d: self.ledger.resident(d) for d in self.schedulers}
        for group_id, spec in self.groups.groups.items():
            device_info = []
            for device, s in self.schedulers.items():
                r = s.residency
                cached = group_id in r.cached_groups()
                unfit = s.unfit.get(group_id)
                device_info.append(
                    {
                        "device": device,
                        "has_group": r.current_group == group_id or cached,
                        "is_current": r.current_group == group_id,
                        "is_cached": cached,
                        "load_error": s.failed_groups().get(group_id),
                        "fits": None if unfit is None else False,
                        "needed_bytes": unfit.needed_bytes if unfit else None,
                        "available_bytes": unfit.available_bytes if unfit else None,
                    }
                )
            loaded_on = [i["device"] for i in device_info if i["is_current"]]
            failed = any(i["load_error"] for i in device_info)
            models = []
            for m in spec.models:
                on_devices = {d: e for d, entries in resident.items() if (e := entries.get(m.id)) is not None}
                models.append(
                    {
                        "id": m.id,
                        "task": m.task,
                        "source": m.source,
                        "dtype": m.dtype,
                        "loaded_on_devices": loaded_on,
                        "cached_on_devices": [i["device"] for i in device_info if i["is_cached"]],
                        "status": "loaded" if loaded_on else ("failed" if failed else "available"),
                        # Measured bytes: per device where resident, and its one host copy in the CPU cache.
                        "weight_bytes": next((e.weight_bytes for e in on_devices.values()), None),
                        "host_copy_bytes": host.get(m.id),
                        "memory": [
                            {"device": d, "weight_bytes": e.weight_bytes, "kv_cache_bytes": e.kv_bytes}
                            for d, e in on_devices.items()
                        ],
                    }
                )
            out.append(
                {
                    "group_id": group_id,
                    "is_default": group_id == self.groups.default_group,
                    "device_info": device_info,
                    "models": models,
                }
            )
        return {
            "model_groups": out,
            "cpu_cache": {
                "used_bytes": self.host_cache.used_bytes(),
                "limit_bytes": self.host_cache.max_bytes,
                "max_models": self.host_cache.max_models,
                "groups": self.host_cache.groups(),
            },
        }

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
                "waiting_groups": sorted({j.group for j in s.jobs()}),
            }
        return {
            "devices": devices,
            "total_queued": sum(s.queued for s in self.schedulers.values()),
            "total_running": sum(s.running for s in self.schedulers.values()),
            "status_version": self.status_version,
        }


def _host_spec(spec: ModelSpec, device: str) -> ModelSpec:
    """The spec to load a host copy for ``device`` with: the dtype the device would load it in."""
    if spec.dtype == "auto" and is_cuda(device):
        return spec.model_copy(update={"dtype": "bfloat16"})
    return spec
