"""The pod server's core: its devices, the dispatcher, and the documents it publishes.

The groups it serves may change while it runs (``apply_groups``, from a reloaded
model_groups.json): a removed group keeps its spec while its queued or running jobs need it,
then leaves every device, cache and map; a changed group serves new work from its new spec
while its running work finishes on the old engines.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from gpufleet.api.device_report import device_queue, queue_document
from gpufleet.api.errors import ModelNotFound, Overloaded
from gpufleet.api.headers import ROUTING_HEADERS_VERSION
from gpufleet.api.load_report import DeviceLoad, format_load
from gpufleet.api.model_groups import GroupSpec, ModelGroupsFile, ModelSpec
from gpufleet.api.placement import PoolPlacement
from gpufleet.api.pod_status import DeviceStatus, PodStatus
from gpufleet.pod_server.devices import is_cuda
from gpufleet.pod_server.fast_load import select_loader
from gpufleet.pod_server.fit_checks import FitChecks
from gpufleet.pod_server.group_reload import GroupsDiff, diff_groups
from gpufleet.pod_server.group_runtime import GroupRuntime, build_group_runtime, max_sequences
from gpufleet.pod_server.host_cache import HostCache
from gpufleet.pod_server.inference import LoadedModel
from gpufleet.pod_server.memory import (
    Fit,
    GroupNeed,
    MemoryLedger,
    default_cpu_cache_bytes,
)
from gpufleet.pod_server.metrics import PodMetrics
from gpufleet.pod_server.placing import Placer
from gpufleet.pod_server.queue_order import QueuePolicy
from gpufleet.pod_server.residency import DeviceResidency, SwitchResult
from gpufleet.pod_server.scheduler import DeviceScheduler, InsufficientDeviceMemory, Job, SchedulerHooks
from gpufleet.pod_server.settings import PodServerSettings
from gpufleet.pod_server.tokenizers import TokenizerCache
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
        refused: Mapping[str, str] | None = None,
        groups_hash: str | None = None,
    ) -> None:
        self.settings = settings
        self.groups = groups  # what new requests may ask for
        self.refused_groups: dict[str, str] = dict(refused or {})  # groups of the file not served -> why
        self.groups_hash = groups_hash  # of the model_groups.json bytes served
        self.config_error: str | None = None  # why the last reload failed as a whole
        self.placement: PoolPlacement | None = None
        # Removed groups whose queued or running jobs still need their spec; freed once those are gone.
        self._retiring: dict[str, GroupSpec] = {}
        self._served: Mapping[str, GroupSpec] = dict(groups.groups)  # groups + retiring: what the devices serve
        self._collect_scheduled = False
        self.groups_listeners: list[Callable[[ModelGroupsFile], None]] = []  # told of every applied file
        self.metrics = metrics
        self.pod = settings.pod_name or "local"
        self.device_uuids: dict[str, str | None] = {}  # device -> its GPU's UUID, set from the stats source
        self.changed = asyncio.Event()  # set on any state change; the status publisher waits on it
        self.status_version = 0  # bumped when the status document changes in a way routing cares about
        self.ready = False
        self.preload_task: asyncio.Task[None] | None = None  # the default group's preload, when there is one
        self.schedulers: dict[str, DeviceScheduler] = {}
        # One tokenizer per model for the whole pod: validation, the loaders and the engines share it,
        # and it goes when the model's group leaves the pod (``_publish_specs``).
        self.tokenizers = TokenizerCache()
        self.tokenizers.retain(m for g in self._served.values() for m in g.models)
        loader = loader or select_loader(settings.load_method, self.tokenizers.tokenizer)
        self._loader = loader
        self.ledger = MemoryLedger(settings.devices, settings.device_memory_caps())
        cache_bytes = settings.max_cpu_cache_gb
        self.host_cache = HostCache(
            settings.max_cpu_cached_models,
            int(cache_bytes * 1e9) if cache_bytes is not None else default_cpu_cache_bytes(),
            self.ledger,
        )
        self.fits = FitChecks(settings, self.ledger)
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
                on_switch=self._on_switch,
                on_load_failed=self._on_load_failed,
                on_change=self._on_change,
                on_drop=self._on_drop,
            )
            self.schedulers[device] = DeviceScheduler(
                device,
                DeviceResidency(
                    device, settings.max_cpu_cached_models, loader, host_cache=self.host_cache, ledger=self.ledger
                ),
                groups,
                max_sequences=max_sequences(device, settings.max_sequences_per_device),
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
        self._placer = Placer(self.pod, self.schedulers, self.prefetch)
        for device in settings.devices:
            self.metrics.workers.labels(**metrics.labels(device)).set(settings.num_workers_per_gpu)
            self.metrics.max_sequences.labels(**metrics.labels(device)).set(self.schedulers[device].max_sequences)

    def _build_runtime(self, device: str, group: str, models: dict[str, LoadedModel]) -> GroupRuntime:
        """Engines for a group that just became current on ``device`` (blocking: a device thread)."""
        return build_group_runtime(
            device, group, models, self.settings, self.schedulers[device].run_blocking, self.metrics
        )

    # --- memory -----------------------------------------------------------------------------

    def reserve_bytes(self, device: str) -> int:
        return self.fits.reserve_bytes(device)

    def need(self, device: str, group: str, spec: GroupSpec) -> GroupNeed:
        """What the group will take on ``device`` (estimated once per device, group and spec; blocking)."""
        return self.fits.need(device, group, spec)

    def fit(self, device: str, group: str, spec: GroupSpec) -> Fit:
        """The fit check before a switch (blocking: reads checkpoint headers and the device's memory)."""
        return self.fits.fit(device, group, spec)

    def prefetch(self, device: str, group: str, spec: GroupSpec) -> None:
        """Load a queued group into the host cache in the background, if it fits and the budget allows."""
        if group in self._prefetching or self.host_cache.holds(group, spec) or self.schedulers[device].closing:
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
                if self.host_cache.holds(group, spec):
                    return
                models: dict[str, LoadedModel] = {}
                for m in spec.models:
                    loaded = self._loader(_host_spec(m, device), "cpu")
                    loaded.ensure_host_copy(pin=pin)
                    models[m.id] = loaded
                if self._served.get(group) != spec:  # reloaded meanwhile: this copy is of no use now
                    return
                cached, evicted = self.host_cache.insert(group, models, device=None, prefetched=True, spec=spec)
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
        self.check_fits()

    async def preload_default(self) -> None:
        """Make the default group current on every device the placement does not name; the pod is
        ready once one has it (at once when there is nothing to preload)."""
        group = self.groups.default_group
        targets = [s for i, s in enumerate(self.schedulers.values()) if not self._placer.names(self.placement, i)]
        if group is None or not targets:
            self.ready = True
            self.status_version += 1
            self._on_change()
            return
        results = await asyncio.gather(*(s.ensure_group(group) for s in targets), return_exceptions=True)
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

    # --- configuration changes (event loop) -----------------------------------------------------

    def apply_groups(self, new: ModelGroupsFile, refused: Mapping[str, str], groups_hash: str | None) -> GroupsDiff:
        """Serve ``new`` from now on (a reloaded model_groups.json); nothing unchanged restarts.

        New requests see ``new`` at once. A removed group keeps its spec for its queued and running
        jobs, and is freed once they are gone; a changed group's queued jobs wait for its new spec,
        loaded once its running jobs (on the old engines) have finished and the old copy is dropped."""
        diff = diff_groups(self.groups, new)
        for g in diff.removed:
            if self._has_work(g):
                self._retiring[g] = self.groups.groups[g]
        for g in (*diff.added, *diff.changed):
            self._retiring.pop(g, None)  # back in the file: its new spec wins
        old = self.groups
        self.groups, self.refused_groups, self.groups_hash = new, dict(refused), groups_hash
        self._publish_specs()
        for g in (*diff.added, *diff.changed):
            self._reset_group(g)  # a failure or misfit of another spec says nothing of this one
        for g in diff.removed:
            if g not in self._retiring:
                self._forget_group(g, old.groups[g])
        for listener in self.groups_listeners:
            listener(new)
        self.host_cache.discard_stale(self._served)
        log.info(
            "model groups reloaded",
            extra={
                "added": list(diff.added),
                "removed": list(diff.removed),
                "changed": list(diff.changed),
                "refused": self.refused_groups,
                "retiring": sorted(self._retiring),
                "groups_hash": groups_hash,
            },
        )
        self.status_version += 1
        self._refresh_residency_metrics()
        self._on_change()
        self.check_fits()
        self.honour_placement()
        return diff

    def apply_placement(self, placement: PoolPlacement) -> None:
        self.placement = placement
        log.info("placement applied", extra={"generation": placement.generation})
        self.status_version += 1
        self.honour_placement()
        self.changed.set()

    def honour_placement(self) -> None:
        self._placer.honour(self.placement, self.groups.groups)

    def set_config_error(self, error: str | None) -> None:
        if error != self.config_error:
            self.config_error = error
            self.status_version += 1
            self.changed.set()

    def _has_work(self, group: str) -> bool:
        return any(
            any(j.group == group for j in s.jobs()) or (s.residency.current_group == group and s.running > 0)
            for s in self.schedulers.values()
        )

    def _publish_specs(self) -> None:
        # Replaced whole, never mutated: device and prefetch threads read it without a lock.
        self._served = {**self._retiring, **self.groups.groups}
        self.tokenizers.retain(m for g in self._served.values() for m in g.models)
        for s in self.schedulers.values():
            s.specs = self._served
            s.wake()  # a stale current group is dropped once idle

    def _collect_retired(self) -> None:
        """Free the removed groups whose last job has ended."""
        self._collect_scheduled = False
        done = {g: spec for g, spec in self._retiring.items() if not self._has_work(g)}
        if not done:
            return
        for g in done:
            del self._retiring[g]
        self._publish_specs()
        for g, spec in done.items():
            self._forget_group(g, spec)
        self.host_cache.discard_stale(self._served)
        log.info("removed groups retired", extra={"groups": sorted(done)})
        self.status_version += 1
        self._refresh_residency_metrics()
        self.changed.set()

    def _reset_group(self, group: str) -> None:
        for s in self.schedulers.values():
            s.unfit.pop(group, None)
            s.failed.pop(group, None)

    def _forget_group(self, group: str, spec: GroupSpec) -> None:
        """Drop what the pod knew of a group it serves no more (its copies go as devices release them)."""
        self._reset_group(group)
        self.fits.forget(group)
        served_models = {m.id for g in self._served.values() for m in g.models}
        self.metrics.forget_group(group, [m.id for m in spec.models if m.id not in served_models])

    def _on_drop(self, device: str, group: str) -> None:
        # A device let go of a stale copy: the cached one may now have no user left.
        self.host_cache.discard_stale(self._served)
        self.status_version += 1
        self._refresh_residency_metrics()

    # --- fit known before any request -------------------------------------------------------

    def check_fits(self) -> None:
        """Record, in the background, on every device the served groups that can never fit there,
        so the status names them before any request asks (reads checkpoint headers: the prefetch
        thread, never the event loop). A group whose fit cannot be estimated is not recorded."""
        loop = asyncio.get_running_loop()
        with contextlib.suppress(RuntimeError):  # shutting down
            self._prefetcher.submit(self._check_fits_blocking, loop, dict(self.groups.groups))

    def _check_fits_blocking(self, loop: asyncio.AbstractEventLoop, specs: dict[str, GroupSpec]) -> None:
        for device, group, spec, fit in self.fits.unfit(list(self.schedulers), specs):
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(self._record_unfit, device, group, spec, fit)

    def _record_unfit(self, device: str, group: str, spec: GroupSpec, fit: Fit) -> None:
        s = self.schedulers[device]
        if self._served.get(group) != spec or group in s.unfit:
            return  # reloaded meanwhile, or known already
        s.unfit[group] = fit
        log.warning("group does not fit", extra={"device": device, "group": group, "error": fit.message(group, device)})
        self.status_version += 1
        self._on_change()

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
        if self.groups.group_of(model_id) != group:
            # Validated before a reload took the model away (or into another group): as if unknown.
            raise ModelNotFound(f"model {model_id!r} does not exist", param="model")
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
        if self._retiring and not self._collect_scheduled:
            # Not from inside the scheduler's own bookkeeping: the next loop turn looks.
            self._collect_scheduled = True
            asyncio.get_running_loop().call_soon(self._collect_retired)
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
            for group in self._served:
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

    def unservable_groups(self) -> set[str]:
        """Groups that no device of this pod can ever hold (too big for each), by the fit checks so far."""
        return set.intersection(*(set(s.unfit) for s in self.schedulers.values())) if self.schedulers else set()

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
            refused_groups=dict(self.refused_groups),
            config_error=self.config_error,
            groups_hash=self.groups_hash,
            placement_generation=self.placement.generation if self.placement is not None else None,
            routing_headers=ROUTING_HEADERS_VERSION,
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
        """``GET /api/queue``, through the one writer of that document (gpufleet.api.device_report)."""
        devices = {
            device: device_queue(
                running=s.running,
                # A device runs up to max_sequences sequences of its current group at once, batched.
                max_sequences=s.max_sequences,
                queue_limit=s.queue_limit,
                queued_groups=[j.group for j in s.jobs()],
                current_group=s.residency.current_group,
                switching_to=s.switching_to,
                kv_blocks=s.runtime.kv_usage() if s.runtime else (0, 0),
            )
            for device, s in self.schedulers.items()
        }
        return queue_document(devices, self.status_version)


def _host_spec(spec: ModelSpec, device: str) -> ModelSpec:
    """The spec to load a host copy for ``device`` with: the dtype the device would load it in."""
    if spec.dtype == "auto" and is_cuda(device):
        return spec.model_copy(update={"dtype": "bfloat16"})
    return spec
