"""A device's queue and workers: a switch waits for in-flight work; a full queue refuses."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import pytest

from gpufleet.api.errors import Overloaded, Unavailable
from gpufleet.api.model_groups import GroupSpec, ModelGroupsFile, ModelSpec, load_model_groups
from gpufleet.pod_server.inference import load_model
from gpufleet.pod_server.residency import DeviceResidency
from gpufleet.pod_server.scheduler import DeviceScheduler

pytestmark = pytest.mark.unit


async def _until(predicate: Any, timeout_s: float = 90.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError("condition not reached")
        await asyncio.sleep(0.01)


def _scheduler(groups: ModelGroupsFile, *, workers: int = 2, queue_limit: int = 8) -> DeviceScheduler:
    return DeviceScheduler(
        "cpu:0",
        DeviceResidency("cpu:0", 4, load_model),
        groups,
        workers=workers,
        queue_limit=queue_limit,
        load_timeout_s=60,
        failed_retry_s=60,
    )


async def test_switch_waits_for_in_flight_requests(demo_models: Path) -> None:
    groups = load_model_groups(demo_models)
    s = _scheduler(groups)
    s.start()
    await s.ensure_group("alpha")
    release = threading.Event()
    running = threading.Event()

    def slow(models: dict[str, Any]) -> str:
        running.set()
        release.wait(30)
        return next(iter(models))

    first = s.submit("alpha", slow)
    await _until(running.is_set)
    second = s.submit("beta", lambda models: sorted(models))
    # The second worker is free, yet beta must not replace alpha under a running request.
    await _until(lambda: s._switch_waiters == 1)
    assert s.residency.current_group == "alpha" and not second.future.done()
    assert s.load == 2  # the waiting request counts as load, though it left the queue
    third = s.submit("alpha", lambda models: "late-alpha")
    await asyncio.sleep(0)  # let the worker look at it; it must queue behind the switch
    release.set()
    assert await first.future == "tiny-chat"
    assert await second.future == ["tiny-chat-b", "tiny-complete-b"]
    assert second.switched and not first.switched
    assert await third.future == "late-alpha"
    await s.drain_and_stop(5)


async def test_full_queue_refuses_with_retry_after(demo_models: Path) -> None:
    groups = load_model_groups(demo_models)
    s = _scheduler(groups, workers=1, queue_limit=1)  # workers not started: nothing drains
    s.submit("alpha", lambda m: None)
    with pytest.raises(Overloaded) as info:
        s.submit("alpha", lambda m: None)
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
    job = s.submit("bad", lambda m: None)
    with pytest.raises(Unavailable, match="bad"):
        await job.future
    assert "bad" in s.failed_groups()
    ok = s.submit("alpha", lambda m: sorted(m))
    assert await ok.future == ["minilm", "tiny-chat"]
    await s.drain_and_stop(5)
