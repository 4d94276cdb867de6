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
