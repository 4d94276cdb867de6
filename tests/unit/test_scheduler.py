"""A device's queue: admission into the batch, switches only between batches, refusals, cancellation."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from gpufleet.api.errors import Overloaded, Unavailable
from gpufleet.api.model_groups import GroupSpec, ModelGroupsFile, ModelSpec, load_model_groups
from gpufleet.pod_server.group_runtime import GroupRuntime
from gpufleet.pod_server.inference import LoadedModel, load_model
from gpufleet.pod_server.queue_order import QueuePolicy
from gpufleet.pod_server.residency import DeviceResidency
from gpufleet.pod_server.scheduler import DeviceScheduler

pytestmark = pytest.mark.unit


def _runtime(device: str, group: str, models: dict[str, LoadedModel]) -> GroupRuntime:
    # Engines are tested on their own (test_engine.py); here the group's models are enough.
    return GroupRuntime(device, group, models)


def _scheduler(
    groups: ModelGroupsFile, *, max_sequences: int = 4, queue_limit: int = 8, policy: QueuePolicy | None = None
) -> DeviceScheduler:
    return DeviceScheduler(
        "cpu:0",
        DeviceResidency("cpu:0", 4, load_model),
        groups,
        max_sequences=max_sequences,
        workers=1,
        queue_limit=queue_limit,
        load_timeout_s=60,
        failed_retry_s=60,
        runtime_factory=_runtime,
        policy=policy,
    )


async def test_switch_waits_for_running_work_and_serves_its_batch(demo_models: Path) -> None:
    s = _scheduler(load_model_groups(demo_models))
    s.start()
    await s.ensure_group("alpha")
    first = s.submit("alpha")
    runtime = await first.admitted
    assert runtime.group == "alpha"
    beta = [s.submit("beta") for _ in range(3)]
    late_alpha = s.submit("alpha")
    # The current group's queued work joins the running batch; beta waits for both to finish.
    assert (await late_alpha.admitted).group == "alpha"
    assert not any(j.admitted.done() for j in beta) and s.residency.current_group == "alpha"
    first.finish()
    await asyncio.sleep(0)
    assert s.residency.current_group == "alpha"  # late_alpha still runs
    late_alpha.finish()
    runtimes = await asyncio.wait_for(asyncio.gather(*(j.admitted for j in beta)), 60)
    assert {r.group for r in runtimes} == {"beta"}
    assert all(j.switched for j in beta) and not first.switched
    assert s.running == 3  # the three beta jobs run together
    for j in beta:
        j.finish()
    assert s.running == 0
    await s.drain_and_stop(5)


async def test_batch_limit_holds_the_rest_in_the_queue(demo_models: Path) -> None:
    s = _scheduler(load_model_groups(demo_models), max_sequences=2)
    s.start()
    await s.ensure_group("alpha")
    jobs = [s.submit("alpha") for _ in range(3)]
    await asyncio.wait_for(asyncio.gather(jobs[0].admitted, jobs[1].admitted), 10)
    assert not jobs[2].admitted.done() and s.queued == 1 and s.running == 2
    jobs[0].finish()
    await asyncio.wait_for(jobs[2].admitted, 10)
    for j in jobs:
        j.finish()
    await s.drain_and_stop(5)


async def test_a_cancelled_queued_job_leaves_at_once(demo_models: Path) -> None:
    s = _scheduler(load_model_groups(demo_models), max_sequences=1)
    s.start()
    await s.ensure_group("alpha")
    holder = s.submit("alpha")
    await holder.admitted
    waiting = [s.submit("alpha") for _ in range(3)]
    assert s.queued == 3
    for j in waiting:
        j.finish()  # what a handler does when its client goes away
    assert s.queued == 0 and all(j.admitted.cancelled() for j in waiting)
    holder.finish()
    assert s.running == 0
    await s.drain_and_stop(5)


async def test_full_queue_refuses_with_retry_after(demo_models: Path) -> None:
    s = _scheduler(load_model_groups(demo_models), queue_limit=1)  # not started: nothing drains
    s.submit("alpha")
    with pytest.raises(Overloaded) as info:
        s.submit("alpha")
    assert int(info.value.headers()["Retry-After"]) >= 1
    await s.drain_and_stop(0)


async def test_failed_group_answers_503_and_others_keep_working(demo_models: Path, tmp_path: Path) -> None:
    groups = load_model_groups(demo_models)
    (tmp_path / "config.json").write_text("{broken")
    bad = ModelGroupsFile(
        default_group="alpha",
        groups={**groups.groups, "bad": GroupSpec(models=(ModelSpec(id="b", source=str(tmp_path)),))},
    )
    s = _scheduler(bad)
    s.start()
    job = s.submit("bad")
    with pytest.raises(Unavailable, match="bad"):
        await asyncio.wait_for(job.admitted, 60)
    assert "bad" in s.failed_groups()
    with pytest.raises(Unavailable):
        s.submit("bad")  # refused at once while the failure is fresh
    ok = s.submit("alpha")
    runtime: Any = await asyncio.wait_for(ok.admitted, 60)
    assert sorted(runtime.models) == ["minilm", "tiny-chat"]
    ok.finish()
    await s.drain_and_stop(5)


async def test_interleaved_groups_switch_a_few_times_not_per_request(demo_models: Path) -> None:
    s = _scheduler(load_model_groups(demo_models), max_sequences=4, queue_limit=64)
    s.start()
    await s.ensure_group("alpha")
    jobs = [s.submit("alpha" if i % 2 == 0 else "beta") for i in range(24)]

    async def run(job: Any) -> None:
        await job.admitted
        await asyncio.sleep(0)  # one loop turn of "work"
        job.finish()

    await asyncio.wait_for(asyncio.gather(*(run(j) for j in jobs)), 60)
    assert s.switch_count <= 4, s.switch_count
    await s.drain_and_stop(5)


def _two_groups(demo_models: Path) -> ModelGroupsFile:
    doc = load_model_groups(demo_models)
    lm = {m.id: m for g in doc.groups.values() for m in g.models}
    return ModelGroupsFile(
        default_group="g1",
        groups={"g1": GroupSpec(models=(lm["tiny-chat"],)), "g2": GroupSpec(models=(lm["tiny-chat-b"],))},
    )


async def _serves(s: DeviceScheduler, group: str) -> None:
    job = s.submit(group)
    runtime = await asyncio.wait_for(job.admitted, 60)
    assert runtime.group == group and s.residency.current_group == group
    m = next(iter(runtime.models.values()))
    assert m.device == s.device
    job.finish()


async def test_a_group_that_never_fits_is_refused_before_anything_moves(demo_models: Path) -> None:
    from gpufleet.pod_server.memory import Fit
    from gpufleet.pod_server.scheduler import InsufficientDeviceMemory

    groups = _two_groups(demo_models)

    def fit(device: str, group: str, spec: GroupSpec) -> Fit:
        return Fit(group != "g2", 10_000 if group == "g2" else 10, 100)

    s = DeviceScheduler(
        "cpu:0", DeviceResidency("cpu:0", 4, load_model), groups, max_sequences=4, workers=1, queue_limit=8,
        load_timeout_s=60, failed_retry_s=60, runtime_factory=_runtime, fit_check=fit,
    )  # fmt: skip
    s.start()
    await s.ensure_group("g1")
    switches = s.switch_count
    big = s.submit("g2")
    with pytest.raises(InsufficientDeviceMemory, match="10000 bytes") as info:
        await asyncio.wait_for(big.admitted, 60)
    assert info.value.code == "insufficient_device_memory" and info.value.status_code == 503
    assert s.switch_count == switches and "g2" in s.failed_groups()  # the router's eligibility sees it
    with pytest.raises(InsufficientDeviceMemory):
        s.submit("g2")  # refused at once from now on
    await _serves(s, "g1")
    await s.drain_and_stop(5)


async def test_a_timed_out_load_is_never_raced_by_a_second_load(demo_models: Path) -> None:
    import threading

    groups = _two_groups(demo_models)
    gate = threading.Event()
    active, peak = [0], [0]
    lock = threading.Lock()

    def gated(spec: ModelSpec, device: str) -> LoadedModel:
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        try:
            if spec.id == "tiny-chat-b":
                gate.wait(60)  # a load that outlives its time-out
            return load_model(spec, device)
        finally:
            with lock:
                active[0] -= 1

    s = DeviceScheduler(
        "cpu:0", DeviceResidency("cpu:0", 4, gated), groups, max_sequences=4, workers=2, queue_limit=8,
        load_timeout_s=0.3, failed_retry_s=60, runtime_factory=_runtime,
    )  # fmt: skip
    s.start()
    await s.ensure_group("g1")
    slow = s.submit("g2")
    with pytest.raises(Unavailable, match="timed out"):
        await asyncio.wait_for(slow.admitted, 30)  # answered at the time-out, not when the load ends
    waiting = s.submit("g1")  # wants the device back while the abandoned load still runs
    await asyncio.sleep(0.2)
    assert not waiting.admitted.done()  # nothing else touches the device until that load returns
    gate.set()
    runtime = await asyncio.wait_for(waiting.admitted, 60)
    assert runtime.group == "g1" and s.residency.current_group == "g1"
    waiting.finish()
    assert peak[0] == 1 and "g2" in s.failed_groups()
    await _serves(s, "g1")
    await s.drain_and_stop(5)


async def test_a_failed_copy_leaves_the_previous_group_current_and_serving(
    demo_models: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    groups = _two_groups(demo_models)
    s = _scheduler(groups)
    s.start()
    await s.ensure_group("g1")
    g1 = s.residency.current["tiny-chat"]
    await _serves(s, "g2")  # g1 parked in the cache

    def copy_fails(device: str) -> None:
        raise RuntimeError("CUDA out of memory in the host-to-device copy")

    monkeypatch.setattr(g1, "activate", copy_fails)
    job = s.submit("g1")
    with pytest.raises(Unavailable, match="host-to-device"):
        await asyncio.wait_for(job.admitted, 60)
    await _serves(s, "g2")
    await s.drain_and_stop(5)


async def test_queued_group_is_prefetched_and_its_switch_counts_it(demo_models: Path) -> None:
    from gpufleet.pod_server.memory import MemoryLedger

    groups = _two_groups(demo_models)
    residency = DeviceResidency("cpu:0", 4, load_model, ledger=MemoryLedger(["cpu:0"]))
    prefetched: list[str] = []

    def prefetch(device: str, group: str, spec: GroupSpec) -> None:
        # What PodService.prefetch does, synchronously: a host copy in the cache, current nowhere.
        if group in residency.host_cache:
            return
        models = {m.id: load_model(m, "cpu") for m in spec.models}
        residency.host_cache.insert(group, models, device=None, prefetched=True)
        prefetched.append(group)

    s = DeviceScheduler(
        "cpu:0", residency, groups, max_sequences=4, workers=1, queue_limit=8,
        load_timeout_s=60, failed_retry_s=60, runtime_factory=_runtime, prefetch=prefetch,
        policy=QueuePolicy(max_wait_s=60, min_residency_s=0),
    )  # fmt: skip
    s.start()
    await s.ensure_group("g1")
    holder = s.submit("g1")
    await holder.admitted  # g1 is busy: g2 waits behind it
    later = s.submit("g2")
    s._prefetch_waiting("g1")  # what the pump does after each admission
    assert prefetched == ["g2"] and not later.admitted.done()
    holder.finish()
    runtime = await asyncio.wait_for(later.admitted, 60)
    assert runtime.group == "g2" and s.switch_s.get("cache") is not None and s.prefetched_switches == 1
    later.finish()
    await s.drain_and_stop(5)


async def test_a_switch_is_timed_whole_engine_start_included(demo_models: Path) -> None:
    # Routing prices a switch by the seconds the pod reports, so they must cover what a waiting
    # request sees: here the engine's start takes at least 50 ms (a deterministic busy wait) while
    # moving the tiny weights takes far less; the old figure timed the weights alone.
    import time

    engine_s = 0.05

    def slow_engine(device: str, group: str, models: dict[str, LoadedModel]) -> GroupRuntime:
        until = time.perf_counter() + engine_s
        while time.perf_counter() < until:
            pass
        return GroupRuntime(device, group, models)

    s = DeviceScheduler(
        "cpu:0", DeviceResidency("cpu:0", 4, load_model), load_model_groups(demo_models), max_sequences=4,
        workers=1, queue_limit=8, load_timeout_s=60, failed_retry_s=60, runtime_factory=slow_engine,
    )  # fmt: skip
    s.start()
    await s.ensure_group("alpha")
    await s.ensure_group("beta")
    await s.ensure_group("alpha")  # from the cache: no load at all, only the engines
    assert s.switch_s["disk"] >= engine_s
    assert s.switch_s["cache"] >= engine_s
    await s.drain_and_stop(5)
