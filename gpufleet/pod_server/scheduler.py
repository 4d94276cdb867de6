"""One device's bounded queue, its workers, and the rule that a switch waits for in-flight work.

Workers are asyncio tasks; the blocking model work runs on the device's own thread pool
(one thread per worker) so a slow device never stalls the event loop or another device.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from gpufleet.api.errors import Overloaded, Unavailable
from gpufleet.api.model_groups import ModelGroupsFile
from gpufleet.pod_server.inference import LoadedModel
from gpufleet.pod_server.residency import DeviceResidency, GroupLoadError, SwitchResult

log = logging.getLogger(__name__)

Work = Callable[[dict[str, LoadedModel]], Any]


@dataclass
class Job:
    group: str
    work: Work
    future: asyncio.Future[Any]
    enqueued_at: float = field(default_factory=time.monotonic)
    started_at: float | None = None
    switched: bool = False  # this job made its group current (a group switch)


@dataclass
class SchedulerHooks:
    on_switch: Callable[[str, SwitchResult], None] = lambda device, result: None
    on_load_failed: Callable[[str, str, str], None] = lambda device, group, error: None
    on_change: Callable[[], None] = lambda: None


class DeviceScheduler:
    def __init__(
        self,
        device: str,
        residency: DeviceResidency,
        groups: ModelGroupsFile,
        *,
        workers: int,
        queue_limit: int,
        load_timeout_s: float,
        failed_retry_s: float,
        hooks: SchedulerHooks | None = None,
    ) -> None:
        self.device = device
        self.residency = residency
        self.groups = groups
        self.workers = workers
        self.queue_limit = queue_limit
        self.load_timeout_s = load_timeout_s
        self.failed_retry_s = failed_retry_s
        self.hooks = hooks or SchedulerHooks()
        self._queue: asyncio.Queue[Job] = asyncio.Queue(maxsize=queue_limit)
        self._executor = ThreadPoolExecutor(max_workers=workers + 1, thread_name_prefix=f"dev-{device}")
        self._cond = asyncio.Condition()
        self._tasks: list[asyncio.Task[None]] = []
        self.active = 0  # requests running on the device
        self.acquiring = 0  # taken off the queue, waiting for their group (or switching to it)
        self.switching_to: str | None = None
        self._switch_waiters = 0
        self.failed: dict[str, tuple[float, str]] = {}  # group -> (monotonic time, error)
        self.last_switch_at: float | None = None
        self.switch_s: dict[str, float] = {}  # "cache" / "disk" -> last measured seconds
        self.service_ewma_s = 0.25
        self.closing = False

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._worker(i), name=f"{self.device}-w{i}") for i in range(self.workers)]

    async def drain_and_stop(self, timeout_s: float) -> None:
        """Stop taking work, let accepted jobs finish (bounded), then stop the workers."""
        self.closing = True
        deadline = time.monotonic() + timeout_s
        while self.load and time.monotonic() < deadline:
            await asyncio.sleep(0.05)  # shutdown polling with a deadline, not synchronisation
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        while not self._queue.empty():
            job = self._queue.get_nowait()
            if not job.future.done():
                job.future.set_exception(Unavailable("server is shutting down", retry_after_s=1))
        self._executor.shutdown(wait=False, cancel_futures=True)

    # --- state for the dispatcher and the /api surface -------------------------------------

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    @property
    def load(self) -> int:
        # Requests a worker holds while a switch runs count too, or a switching device looks idle.
        return self.queued + self.acquiring + self.active

    def failed_groups(self) -> dict[str, str]:
        now = time.monotonic()
        return {g: err for g, (at, err) in self.failed.items() if now - at < self.failed_retry_s}

    def retry_after_s(self) -> float:
        return max(1.0, self.load * self.service_ewma_s / max(1, self.workers))

    # --- submitting ------------------------------------------------------------------------

    def submit(self, group: str, work: Work) -> Job:
        if self.closing:
            raise Unavailable("server is shutting down", retry_after_s=1)
        job = Job(group, work, asyncio.get_running_loop().create_future())
        try:
            self._queue.put_nowait(job)
        except asyncio.QueueFull:
            raise Overloaded(
                f"queue of {self.device} is full ({self.queue_limit} waiting)", retry_after_s=self.retry_after_s()
            ) from None
        self.hooks.on_change()
        return job

    # --- workers ---------------------------------------------------------------------------

    async def _worker(self, index: int) -> None:
        while True:
            job = await self._queue.get()
            if job.future.cancelled():
                continue
            self.acquiring += 1
            try:
                job.switched = await self._acquire(job.group)
            except Exception as exc:
                if not job.future.done():
                    job.future.set_exception(exc)
                self.hooks.on_change()
                continue
            finally:
                self.acquiring -= 1
            job.started_at = time.monotonic()
            try:
                result = await asyncio.get_running_loop().run_in_executor(
                    self._executor, job.work, self.residency.current
                )
                if not job.future.done():
                    job.future.set_result(result)
            except Exception as exc:
                log.exception("request failed on device", extra={"device": self.device, "group": job.group})
                if not job.future.done():
                    job.future.set_exception(exc)
            finally:
                spent = time.monotonic() - job.started_at
                self.service_ewma_s = 0.8 * self.service_ewma_s + 0.2 * spent
                await self._release()

    async def _acquire(self, group: str) -> bool:
        """Wait until ``group`` is current and hold a slot; True when this call switched groups."""
        if group in self.failed_groups():
            raise self._failed_error(group)
        async with self._cond:
            waiting_to_switch = False
            try:
                while True:
                    resident = self.switching_to is None and self.residency.current_group == group
                    if resident and waiting_to_switch:  # someone else brought our group in
                        waiting_to_switch = False
                        self._switch_waiters -= 1
                    # Once a switch is wanted the current group takes no new work, so a steady
                    # stream of requests for the old group cannot starve the switch.
                    if resident and self._switch_waiters == 0:
                        self.active += 1
                        return False
                    if not resident and self.switching_to is None and self.active == 0:
                        self.switching_to = group
                        break
                    if not resident and not waiting_to_switch:
                        waiting_to_switch = True
                        self._switch_waiters += 1
                    await self._cond.wait()
            finally:
                if waiting_to_switch:
                    self._switch_waiters -= 1
        self.hooks.on_change()
        try:
            switched = await self._switch(group)
        finally:
            async with self._cond:
                self.switching_to = None
                self._cond.notify_all()
            self.hooks.on_change()
        async with self._cond:
            self.active += 1
        return switched

    async def _switch(self, group: str) -> bool:
        spec = self.groups.groups[group]
        loop = asyncio.get_running_loop()
        try:
            result = await asyncio.wait_for(
                loop.run_in_executor(self._executor, self.residency.make_current, group, spec),
                timeout=self.load_timeout_s,
            )
        except (GroupLoadError, TimeoutError) as exc:
            msg = str(exc) if isinstance(exc, GroupLoadError) else f"loading group {group!r} timed out"
            self.failed[group] = (time.monotonic(), msg)
            log.error("group load failed", extra={"device": self.device, "group": group, "error": msg})
            self.hooks.on_load_failed(self.device, group, msg)
            raise self._failed_error(group) from None
        self.failed.pop(group, None)
        if result.source != "current":
            self.last_switch_at = time.monotonic()
            self.switch_s[result.source] = result.seconds
            log.info(
                "group switch",
                extra={
                    "device": self.device,
                    "group": group,
                    "source": result.source,
                    "seconds": round(result.seconds, 4),
                    "evicted": list(result.evicted),
                },
            )
            self.hooks.on_switch(self.device, result)
        return result.source != "current"

    def _failed_error(self, group: str) -> Unavailable:
        _, err = self.failed[group]
        return Unavailable(f"model group {group!r} is unavailable: {err}", code="model_load_failed", retry_after_s=30)

    async def _release(self) -> None:
        async with self._cond:
            self.active -= 1
            self._cond.notify_all()
        self.hooks.on_change()

    async def ensure_group(self, group: str) -> None:
        """Make ``group`` current now (start-up preload), without holding a worker afterwards."""
        await self._acquire(group)
        await self._release()
