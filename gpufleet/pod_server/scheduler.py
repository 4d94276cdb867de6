"""One device's bounded queue, its admission into the running batch, and its group switches.

A request is a :class:`Job`: queued, then admitted (it gets the current group's runtime and
holds ``weight`` of the device's sequence slots), then finished by whoever consumes it. What
runs next is decided by ``queue_order.next_action`` (serve the current group's work, batched,
before switching; bounded waits so no group starves); this module is the I/O around it: one
pump task per device, switches on the device's own thread pool, engines started and stopped
with the group.

The specs it serves (``specs``) are replaced when model_groups.json is reloaded. A current group
whose spec is no longer the one served (removed, or changed) is *stale*: it admits no new work,
its running work finishes on its old engines, and then it is dropped from the device.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from gpufleet.api.errors import Overloaded, Unavailable
from gpufleet.api.model_groups import GroupSpec, ModelGroupsFile
from gpufleet.pod_server.group_runtime import GroupRuntime
from gpufleet.pod_server.inference import LoadedModel
from gpufleet.pod_server.memory import Fit
from gpufleet.pod_server.queue_order import Action, GroupQueue, QueuePolicy, QueueState, next_action, switch_deadline
from gpufleet.pod_server.residency import DeviceResidency, SwitchResult
from gpufleet.routing.policy import Costs, DeviceState
from gpufleet.routing.refusal import retry_after_s
from gpufleet.routing.service_time import ServiceTime

log = logging.getLogger(__name__)

RuntimeFactory = Callable[[str, str, dict[str, LoadedModel]], GroupRuntime]
FitCheck = Callable[[str, str, GroupSpec], Fit]  # (device, group, spec) -> fit; blocking (reads headers)
Prefetch = Callable[[str, str, GroupSpec], None]  # (device, group, spec): load into the host cache in the background


class InsufficientDeviceMemory(Unavailable):
    """A group that can never fit on this device (weights + KV cache + reserve > its memory)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, code="insufficient_device_memory")


@dataclass(eq=False)
class Job:
    group: str
    weight: int  # sequence slots it holds while running (0: only waits for its group, e.g. preload)
    admitted: asyncio.Future[GroupRuntime]
    enqueued_at: float = field(default_factory=time.monotonic)
    started_at: float | None = None
    alone: bool = False  # nothing else ran on the device when it started: its time teaches the service time
    switched: bool = False  # this job's group was switched in for it
    _release: Callable[[Job], None] | None = None

    def finish(self) -> None:
        """Give the job's slots back (idempotent); a queued job leaves the queue."""
        release, self._release = self._release, None
        if release is not None:
            release(self)


@dataclass
class SchedulerHooks:
    on_switch: Callable[[str, SwitchResult], None] = lambda device, result: None
    on_load_failed: Callable[[str, str, str], None] = lambda device, group, error: None
    on_change: Callable[[], None] = lambda: None
    on_drop: Callable[[str, str], None] = lambda device, group: None  # a stale group left the device


class DeviceScheduler:
    def __init__(
        self,
        device: str,
        residency: DeviceResidency,
        groups: ModelGroupsFile,
        *,
        max_sequences: int,
        workers: int,
        queue_limit: int,
        load_timeout_s: float,
        failed_retry_s: float,
        runtime_factory: RuntimeFactory,
        policy: QueuePolicy | None = None,
        hooks: SchedulerHooks | None = None,
        fit_check: FitCheck | None = None,
        prefetch: Prefetch | None = None,
    ) -> None:
        self.device = device
        self.residency = residency
        # Group -> the spec served now; the pod replaces the whole mapping on a reload (never mutates it).
        self.specs: Mapping[str, GroupSpec] = dict(groups.groups)
        self.max_sequences = max_sequences
        self.workers = workers
        self.queue_limit = queue_limit
        self.load_timeout_s = load_timeout_s
        self.failed_retry_s = failed_retry_s
        self.policy = policy or QueuePolicy()
        self.hooks = hooks or SchedulerHooks()
        self._runtime_factory = runtime_factory
        self._fit_check = fit_check
        self._prefetch = prefetch
        self.unfit: dict[str, Fit] = {}  # groups that can never fit on this device
        self.prefetched_switches = 0  # switches that found their group prefetched
        self._switch_thread: asyncio.Future[SwitchResult] | None = None  # a switch still running on a thread
        # The device's blocking work: switches, engine start/stop, embedding forward passes.
        self.executor = ThreadPoolExecutor(max_workers=workers + 1, thread_name_prefix=f"dev-{device}")
        self._queue: list[Job] = []
        self._wake = asyncio.Event()
        self._pump: asyncio.Task[None] | None = None
        self._closing_runtimes: set[asyncio.Future[None]] = set()  # engine stops under way (see _close_runtime)
        self.runtime: GroupRuntime | None = None
        self.running = 0  # slots held by admitted jobs
        self.switching_to: str | None = None
        self.current_since: float | None = None
        self.failed: dict[str, tuple[float, str]] = {}  # group -> (monotonic time, error)
        self.last_switch_at: float | None = None
        self.switch_count = 0
        self.switch_s: dict[str, float] = {}  # "cache" / "disk" -> last measured seconds
        self.service = ServiceTime()  # a request's time on this device alone (routing's cost model)
        self.closing = False

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        self._pump = asyncio.create_task(self._run(), name=f"{self.device}-pump")

    async def drain_and_stop(self, timeout_s: float) -> None:
        """Stop taking work, let admitted jobs finish (bounded), refuse what is queued, free the engines."""
        self.closing = True
        self._fail_queued(lambda job: True, Unavailable("server is shutting down", retry_after_s=1))
        deadline = time.monotonic() + timeout_s
        while self.running and time.monotonic() < deadline:
            await asyncio.sleep(0.05)  # shutdown polling with a deadline, not synchronisation
        if self._pump is not None:
            self._pump.cancel()
            await asyncio.gather(self._pump, return_exceptions=True)
        # An engine stop the pump began (a switch, a stale group's drop) ends whole: cut short, its step
        # thread would run on and keep the process from exiting.
        await asyncio.gather(*self._closing_runtimes, return_exceptions=True)
        if self.runtime is not None:
            runtime, self.runtime = self.runtime, None
            await runtime.close()
        self.executor.shutdown(wait=False, cancel_futures=True)

    # --- state for the dispatcher and the /api surface -------------------------------------

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def load(self) -> int:
        return self.queued + self.running

    def jobs(self) -> list[Job]:
        return list(self._queue)

    def failed_groups(self) -> dict[str, str]:
        """Groups this device will not take now: failed loads (retried later) and groups that never fit."""
        now = time.monotonic()
        out = {g: err for g, (at, err) in self.failed.items() if now - at < self.failed_retry_s}
        out.update({g: fit.message(g, self.device) for g, fit in self.unfit.items()})
        return out

    def current_is_stale(self) -> bool:
        """The current group was loaded from a spec no longer served (removed or changed since)."""
        r = self.residency
        return r.current_group is not None and self.specs.get(r.current_group) != r.current_spec

    def retry_after_s(self) -> float:
        return retry_after_s([self.device_state()], self.service.costs(Costs()))

    def device_state(self) -> DeviceState:
        """This device as routing sees it (the pod's dispatcher builds its snapshot from these)."""
        r = self.residency
        return DeviceState(
            pod="",
            device=self.device,
            current_group=r.current_group,
            cached_groups=frozenset(r.cached_groups()),
            failed_groups=frozenset(self.failed_groups()),
            healthy=not self.closing,
            workers=self.max_sequences,  # sequences that run at once, batched
            queue_limit=self.queue_limit,
            load=self.load,
            waiting=self.queued,
            waiting_groups=frozenset(j.group for j in self._queue),
            switching_to=self.switching_to,
            switch_s_from_cache=self.switch_s.get("cache"),
            switch_s_from_disk=self.switch_s.get("disk"),
            last_switch_at=self.last_switch_at,
        )

    def queue_state(self, now: float | None = None) -> QueueState:
        by_group: dict[str, GroupQueue] = {}
        for job in self._queue:
            if job.group not in by_group:
                by_group[job.group] = GroupQueue(job.group, 0, job.enqueued_at, max(1, job.weight))
            g = by_group[job.group]
            by_group[job.group] = GroupQueue(g.group, g.waiting + 1, g.oldest_at, g.head_weight)
        return QueueState(
            # A stale group takes no new work: to the queue rule the device holds nothing it can use.
            current_group=None if self.current_is_stale() else self.residency.current_group,
            running=self.running,
            capacity=self.max_sequences,
            queues=tuple(by_group.values()),
            now=time.monotonic() if now is None else now,
            current_since=self.current_since,
        )

    # --- submitting ------------------------------------------------------------------------

    def submit(self, group: str, weight: int = 1) -> Job:
        if self.closing:
            raise Unavailable("server is shutting down", retry_after_s=1)
        if group in self.failed_groups():
            raise self._failed_error(group)
        if len(self._queue) >= self.queue_limit:
            raise Overloaded(
                f"queue of {self.device} is full ({self.queue_limit} waiting)", retry_after_s=self.retry_after_s()
            )
        job = Job(group, weight, asyncio.get_running_loop().create_future(), _release=self._release)
        self._queue.append(job)
        self._changed()
        return job

    def place(self, group: str) -> Job:
        """Queue one zero-weight job that makes ``group`` current in its turn (a placement): no one
        awaits it; it finishes itself once admitted, and a failure only is logged. Like any job it
        waits behind the queue rule, so it never interrupts a running batch."""
        job = self.submit(group, weight=0)

        def settle(admitted: asyncio.Future[GroupRuntime]) -> None:
            if not admitted.cancelled() and (exc := admitted.exception()) is not None:
                log.warning("placement not honoured", extra={"device": self.device, "group": group, "error": str(exc)})
            job.finish()

        job.admitted.add_done_callback(settle)
        return job

    def wake(self) -> None:
        """Have the pump look again (the served specs changed)."""
        self._wake.set()

    def _release(self, job: Job) -> None:
        if job.started_at is None:  # still queued: a client that left costs nothing more
            with contextlib.suppress(ValueError):
                self._queue.remove(job)
            if not job.admitted.done():
                job.admitted.cancel()
        else:
            self.running -= job.weight
            # A zero-weight job (preload, placement) ran nothing: its time says nothing of a request's.
            if job.alone and not job.switched and job.weight > 0:
                self.service.observe(time.monotonic() - job.started_at)
        self._changed()

    def _changed(self) -> None:
        self._wake.set()
        self.hooks.on_change()

    # --- the pump ----------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            if self.running == 0 and self.current_is_stale():
                await self._drop_current()
                continue
            state = self.queue_state()
            step = next_action(state, self.policy)
            if step.action is Action.ADMIT:
                self._admit()
                continue
            if step.action is Action.SWITCH and step.group is not None:
                await self._switch(step.group)
                continue
            self._prefetch_waiting(state.current_group)
            deadline = switch_deadline(state, self.policy)
            left = None if deadline is None else deadline - time.monotonic()
            # A deadline long past changes nothing until work finishes, which wakes us: no busy wait. One
            # just past may still be a float short of the rule's own comparison: look once more.
            timeout = None if left is None or left < -0.01 else max(0.0, left) + 0.001
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)

    def _admit(self) -> None:
        runtime = self.runtime
        group = self.residency.current_group
        assert runtime is not None and group is not None
        for job in list(self._queue):
            if job.group != group:
                continue
            if self.running > 0 and self.running + job.weight > self.max_sequences:
                break  # in arrival order: a big request is not overtaken forever by small ones
            self._queue.remove(job)
            if job.admitted.done():  # cancelled meanwhile
                continue
            job.started_at = time.monotonic()
            job.alone = self.running == 0
            self.running += job.weight
            job.admitted.set_result(runtime)
        self.hooks.on_change()
        self._prefetch_waiting(group)

    def _prefetch_waiting(self, current: str | None) -> None:
        """Ask for the groups queued behind the current one to be loaded into the host cache."""
        if self._prefetch is None:
            return
        for job in self._queue:
            if job.group != current and job.group not in self.residency.host_cache:
                spec = self.specs.get(job.group)
                if spec is not None and job.group not in self.failed_groups():
                    self._prefetch(self.device, job.group, spec)

    async def _switch(self, group: str) -> None:
        """Make ``group`` current (nothing is running). On failure its queued jobs get the error."""
        spec = self.specs.get(group)
        if spec is None or group in self.failed_groups():
            self._fail_queued(lambda job: job.group == group, self._failed_error(group) if spec else None)
            return
        loop = asyncio.get_running_loop()
        if self._fit_check is not None:
            try:
                fit = await loop.run_in_executor(self.executor, self._fit_check, self.device, group, spec)
            except Exception as exc:  # an estimate that cannot be made must not block the load
                log.warning("fit check failed", extra={"device": self.device, "group": group, "error": str(exc)})
            else:
                if self.specs.get(group) != spec:
                    return  # reloaded meanwhile: the pump decides again, on the spec served now
                if not fit.fits:
                    # Decided before anything moves: the current group keeps serving.
                    self.unfit[group] = fit
                    msg = fit.message(group, self.device)
                    log.error("group does not fit", extra={"device": self.device, "group": group, "error": msg})
                    self.hooks.on_load_failed(self.device, group, msg)
                    self._fail_queued(lambda job: job.group == group, InsufficientDeviceMemory(msg))
                    return
        self.switching_to = group
        self.hooks.on_change()
        abort = threading.Event()
        started = time.perf_counter()
        try:
            if self.runtime is not None:
                runtime, self.runtime = self.runtime, None
                await self._close_runtime(runtime)  # frees the KV caches before the weights move
                self.residency.ledger.clear_kv(self.device)
            switch = loop.run_in_executor(self.executor, self.residency.make_current, group, spec, abort)
            self._switch_thread = switch
            try:
                result = await asyncio.wait_for(asyncio.shield(switch), timeout=self.load_timeout_s)
            except TimeoutError:
                abort.set()  # the thread rolls back as soon as its blocking load returns
                self._fail_queued(
                    lambda job: job.group == group,
                    Unavailable(f"model group {group!r} is unavailable: loading timed out", code="model_load_failed"),
                )
                # One load per device at a time: wait for the abandoned one before anything else.
                with contextlib.suppress(Exception):
                    await switch
                raise
            finally:
                self._switch_thread = None
            models = self.residency.current
            self.runtime = await loop.run_in_executor(self.executor, self._runtime_factory, self.device, group, models)
            self._record_kv()
            # What a waiting request sees, and what routing must price: the old engine stopped, the
            # weights moved, the new engine started. The weights alone are a fraction of it on CPU.
            weights_s, result = result.seconds, dataclasses.replace(result, seconds=time.perf_counter() - started)
        except Exception as exc:  # a group that cannot load degrades only itself
            if self.specs.get(group) != spec:
                # Reloaded meanwhile: the failure was the old spec's, and the queued jobs want the new one.
                log.warning("superseded group load failed", extra={"device": self.device, "group": group})
                await self._restore_runtime()
                return
            msg = f"loading group {group!r} timed out" if isinstance(exc, TimeoutError) else str(exc)
            self.failed[group] = (time.monotonic(), msg)
            log.error("group load failed", extra={"device": self.device, "group": group, "error": msg})
            self.hooks.on_load_failed(self.device, group, msg)
            self._fail_queued(lambda job: job.group == group, self._failed_error(group))
            await self._restore_runtime()
            return
        finally:
            self.switching_to = None
            self.hooks.on_change()
        self.failed.pop(group, None)
        self.current_since = time.monotonic()
        if result.source != "current":
            self.last_switch_at = self.current_since
            self.switch_count += 1
            self.switch_s[result.source] = result.seconds
            if result.prefetched:
                self.prefetched_switches += 1
            for job in self._queue:
                if job.group == group:
                    job.switched = True
            log.info(
                "group switch",
                extra={
                    "device": self.device,
                    "group": group,
                    "source": result.source,
                    "prefetched": result.prefetched,
                    "seconds": round(result.seconds, 4),
                    "weights_seconds": round(weights_s, 4),
                    "evicted": list(result.evicted),
                },
            )
            self.hooks.on_switch(self.device, result)

    async def _drop_current(self) -> None:
        """Free the device of its stale group once nothing of it runs: its engines stop, its weights
        leave the device (back to a cached host copy, if any: the pod drops stale copies)."""
        group = self.residency.current_group
        assert group is not None
        try:
            if self.runtime is not None:
                runtime, self.runtime = self.runtime, None
                await self._close_runtime(runtime)
            self.residency.ledger.clear_kv(self.device)
            # A failed engine stop is not retried (the runtime is gone), and the residency lets go of
            # the group before it parks the models: the pump never loops on a stale group.
            await asyncio.get_running_loop().run_in_executor(self.executor, self.residency.drop_current)
        except Exception as exc:
            log.error("dropping a stale group failed", extra={"device": self.device, "group": group, "error": str(exc)})
        self.current_since = None
        log.info("stale group dropped", extra={"device": self.device, "group": group})
        self.hooks.on_drop(self.device, group)
        self.hooks.on_change()

    async def _close_runtime(self, runtime: GroupRuntime) -> None:
        """Stop a group's engines; a cancelled caller (the pump, at shutdown) does not cut the stop
        short: drain_and_stop waits for it."""
        closing = asyncio.ensure_future(runtime.close())
        self._closing_runtimes.add(closing)
        closing.add_done_callback(self._closing_runtimes.discard)
        await asyncio.shield(closing)

    def _record_kv(self) -> None:
        if self.runtime is None:
            return
        for mid, engine in self.runtime.engines.items():
            self.residency.ledger.set_kv(self.device, mid, engine.sizing.bytes)

    async def _restore_runtime(self) -> None:
        """After a failed switch, serve whatever group the device still holds."""
        group = self.residency.current_group
        if group is None or self.runtime is not None:
            return
        try:
            self.runtime = await asyncio.get_running_loop().run_in_executor(
                self.executor, self._runtime_factory, self.device, group, self.residency.current
            )
            self._record_kv()
        except Exception as exc:
            log.error("engine restart failed", extra={"device": self.device, "group": group, "error": str(exc)})

    def _fail_queued(self, which: Callable[[Job], bool], error: Exception | None) -> None:
        err = error or Unavailable("model group is unknown", retry_after_s=30)
        for job in [j for j in self._queue if which(j)]:
            self._queue.remove(job)
            job._release = None
            if not job.admitted.done():
                job.admitted.set_exception(err)
        self.hooks.on_change()

    def _failed_error(self, group: str) -> Unavailable:
        if group in self.unfit:
            return InsufficientDeviceMemory(self.unfit[group].message(group, self.device))
        err = self.failed.get(group, (0.0, "load failed"))[1]
        return Unavailable(f"model group {group!r} is unavailable: {err}", code="model_load_failed", retry_after_s=30)

    async def ensure_group(self, group: str) -> None:
        """Make ``group`` current now (start-up preload), holding nothing afterwards."""
        job = self.submit(group, weight=0)
        try:
            await job.admitted
        finally:
            job.finish()

    def run_blocking(self, fn: Callable[[], Any]) -> Awaitable[Any]:
        return asyncio.get_running_loop().run_in_executor(self.executor, fn)
