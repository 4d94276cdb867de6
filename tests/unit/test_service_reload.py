"""PodService applying a reloaded model_groups.json and a placement, on the real tiny models and engines."""

from __future__ import annotations

import asyncio
import gc
import time
import weakref
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest

from gpufleet.api.errors import ModelNotFound
from gpufleet.api.model_groups import GroupSpec, ModelGroupsFile, ModelSpec, load_model_groups
from gpufleet.api.placement import DevicePlacement, PodPlacement, PoolPlacement
from gpufleet.pod_server.metrics import PodMetrics
from gpufleet.pod_server.service import PodService
from gpufleet.pod_server.settings import load_settings
from gpufleet.pod_server.tokenizers import TokenizerCache

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def models(demo_models: Path) -> dict[str, ModelSpec]:
    return {m.id: m for g in load_model_groups(demo_models).groups.values() for m in g.models}


def _file(models: dict[str, ModelSpec], default: str | None = None, **groups: tuple[str, ...]) -> ModelGroupsFile:
    specs = {g: GroupSpec(models=tuple(models[i] for i in ids)) for g, ids in groups.items()}
    return ModelGroupsFile(groups=specs, default_group=default)


async def _until(cond: Callable[[], bool], timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)  # polling device threads with a deadline


@pytest.fixture
async def make(demo_models: Path) -> AsyncIterator[Callable[..., Any]]:
    started: list[PodService] = []

    async def make(groups: ModelGroupsFile, **settings: Any) -> PodService:
        s = load_settings(
            **{"devices": ["cpu:0"], "lazy_load_model": True, "model_groups": demo_models, "switch_linger_s": 0}
            | settings
        )
        svc = PodService(s, groups, PodMetrics("test", ""))
        await svc.start()
        started.append(svc)
        return svc

    yield make
    for svc in started:
        await svc.stop(5)


def _series(svc: PodService, group: str) -> list[str]:
    return [line for line in generate_latest(svc.metrics.registry).decode().splitlines() if f'group="{group}"' in line]


async def test_an_added_group_serves_at_once_and_shows_everywhere(make: Any, models: dict[str, ModelSpec]) -> None:
    svc: PodService = await make(_file(models, g1=("tiny-chat",)))
    diff = svc.apply_groups(_file(models, g1=("tiny-chat",), g2=("tiny-chat-b",)), {}, "hash-2")
    assert diff.added == ("g2",) and diff.unchanged == ("g1",)
    _, job = svc.dispatch("tiny-chat-b", "g2", None, 1)
    runtime = await asyncio.wait_for(job.admitted, 60)
    assert runtime.group == "g2" and "tiny-chat-b" in runtime.engines
    job.finish()
    status = svc.status()
    assert status.groups == ["g1", "g2"] and status.models["tiny-chat-b"] == "g2" and status.groups_hash == "hash-2"
    assert status.devices[0].current_group == "g2"
    assert any(g["group_id"] == "g2" for g in svc.models_document()["model_groups"])
    assert _series(svc, "g2")  # residency metrics carry the new group


async def test_a_removed_group_serves_its_queued_work_then_leaves_every_device_cache_and_map(
    make: Any, models: dict[str, ModelSpec]
) -> None:
    svc: PodService = await make(_file(models, g1=("tiny-chat",), g2=("tiny-chat-b",)))
    s = svc.schedulers["cpu:0"]
    _, hold = svc.dispatch("tiny-chat", "g1", None, 1)
    await asyncio.wait_for(hold.admitted, 60)
    _, queued = svc.dispatch("tiny-chat-b", "g2", None, 1)  # waits behind g1's running work
    version = svc.status_version

    svc.apply_groups(_file(models, g1=("tiny-chat",)), {}, "hash-2")
    assert svc.status_version > version and svc.status().groups == ["g1"]
    with pytest.raises(ModelNotFound):  # new requests: as for a model that never existed
        svc.dispatch("tiny-chat-b", "g2", None, 1)
    hold.finish()
    runtime = await asyncio.wait_for(queued.admitted, 60)  # its queued job is still served, by its spec
    assert runtime.group == "g2" and s.residency.current_group == "g2"
    await asyncio.sleep(0)
    assert s.residency.current_group == "g2"  # not freed under a running job
    queued.finish()

    await _until(lambda: s.residency.current_group is None)
    await _until(lambda: "g2" not in svc.host_cache.groups())
    assert "tiny-chat-b" not in svc.ledger.host_copies() and svc.ledger.resident("cpu:0") == {}
    assert "g2" not in svc.fits.known() and "g2" not in s.specs
    assert _series(svc, "g2") == []
    assert "g2" not in svc.status().devices[0].cached_groups


async def test_a_changed_group_finishes_running_work_on_its_old_engine_and_serves_the_rest_from_its_new_spec(
    make: Any, models: dict[str, ModelSpec]
) -> None:
    svc: PodService = await make(_file(models, g1=("tiny-chat",)), max_sequences_per_device=1)
    s = svc.schedulers["cpu:0"]
    _, hold = svc.dispatch("tiny-chat", "g1", None, 1)
    old = await asyncio.wait_for(hold.admitted, 60)
    _, queued = svc.dispatch("tiny-chat", "g1", None, 1)  # the batch is full: it waits
    await asyncio.sleep(0)
    assert not queued.admitted.done()

    diff = svc.apply_groups(_file(models, g1=("tiny-chat", "tiny-complete-b")), {}, "hash-2")
    assert diff.changed == ("g1",)
    await asyncio.sleep(0.05)
    assert s.runtime is old and old.engines and not queued.admitted.done()  # the running job keeps its engine
    hold.finish()
    new = await asyncio.wait_for(queued.admitted, 60)
    assert new is not old and sorted(new.models) == ["tiny-chat", "tiny-complete-b"]
    assert old.engines == {}  # stopped once its last job was done
    assert s.residency.current_spec == svc.groups.groups["g1"]
    queued.finish()


async def test_the_placement_makes_its_group_current_once_and_does_not_pull_it_back(
    make: Any, models: dict[str, ModelSpec]
) -> None:
    svc: PodService = await make(_file(models, g1=("tiny-chat",), g2=("tiny-chat-b",)))
    s = svc.schedulers["cpu:0"]
    svc.apply_placement(_placement(1, current="g2"))
    await _until(lambda: s.residency.current_group == "g2" and s.queued == 0)
    assert svc.status().placement_generation == 1 and s.running == 0
    switches = s.switch_count

    _, job = svc.dispatch("tiny-chat", "g1", None, 1)  # demand takes the device away
    await asyncio.wait_for(job.admitted, 60)
    job.finish()
    for _ in range(3):
        svc.honour_placement()  # what every poll does
    svc.apply_placement(_placement(2, current="g2"))  # a new generation, the same placement for this device
    await asyncio.sleep(0.1)
    assert s.queued == 0 and s.residency.current_group == "g1" and s.switch_count == switches + 1

    svc.apply_placement(_placement(3, current="g2", cached=("g1",)))  # this device's placement changed
    await _until(lambda: s.residency.current_group == "g2")


async def test_a_placed_group_is_placed_once_it_is_bound(make: Any, models: dict[str, ModelSpec]) -> None:
    svc: PodService = await make(_file(models, g1=("tiny-chat",)))
    s = svc.schedulers["cpu:0"]
    svc.apply_placement(_placement(1, current="g2"))
    assert s.queued == 0 and s.residency.current_group is None  # not a group of this pod (yet)
    svc.apply_groups(_file(models, g1=("tiny-chat",), g2=("tiny-chat-b",)), {}, None)
    await _until(lambda: s.residency.current_group == "g2")


async def test_the_default_preload_leaves_placed_devices_to_the_placement(
    make: Any, models: dict[str, ModelSpec]
) -> None:
    svc: PodService = await make(
        _file(models, "g1", g1=("tiny-chat",), g2=("tiny-chat-b",)), devices=["cpu:0", "cpu:1"], lazy_load_model=False
    )
    svc.apply_placement(_placement(1, current="g2"))  # device 0 only
    await svc.preload_default()
    assert svc.ready and svc.schedulers["cpu:1"].residency.current_group == "g1"
    await _until(lambda: svc.schedulers["cpu:0"].residency.current_group == "g2")


async def test_a_pod_without_groups_is_ready_and_serves_nothing(make: Any, models: dict[str, ModelSpec]) -> None:
    svc: PodService = await make(ModelGroupsFile(), lazy_load_model=False)
    await svc.preload_default()
    assert svc.ready and svc.status().groups == [] and svc.models_document()["model_groups"] == []
    with pytest.raises(ModelNotFound):
        svc.dispatch("tiny-chat", "g1", None, 1)


async def test_groups_that_never_fit_are_known_before_any_request(
    make: Any, models: dict[str, ModelSpec], tmp_path: Path
) -> None:
    ghost = ModelSpec(id="ghost", source=str(tmp_path / "nothing-here"))  # no files: no estimate, not recorded
    groups = ModelGroupsFile(
        groups={"g1": GroupSpec(models=(models["tiny-chat"],)), "ghost": GroupSpec(models=(ghost,))}
    )
    svc: PodService = await make(groups, device_memory_gb="0.00001")
    await _until(lambda: "g1" in svc.status().devices[0].insufficient_memory_groups)
    message = svc.status().devices[0].insufficient_memory_groups["g1"]
    assert "bytes" in message and "10000 bytes" in message
    svc.apply_groups(
        ModelGroupsFile(groups={**groups.groups, "g2": GroupSpec(models=(models["tiny-chat-b"],))}), {}, None
    )
    await _until(lambda: "g2" in svc.status().devices[0].insufficient_memory_groups)
    assert "ghost" not in svc.status().devices[0].insufficient_memory_groups
    assert svc.schedulers["cpu:0"].switch_count == 0  # nothing was loaded to learn it


def _placement(generation: int, current: str | None = None, cached: tuple[str, ...] = ()) -> PoolPlacement:
    device = DevicePlacement(current=current, cached=cached)
    return PoolPlacement(generation=generation, pods={"local": PodPlacement(devices={"0": device})})


async def test_a_placed_group_whose_spec_changed_is_placed_anew(make: Any, models: dict[str, ModelSpec]) -> None:
    svc: PodService = await make(_file(models, g2=("tiny-chat-b",)))
    s = svc.schedulers["cpu:0"]
    svc.apply_placement(_placement(1, current="g2"))
    await _until(lambda: s.residency.current_group == "g2")
    changed = models["tiny-chat-b"].model_copy(update={"context_length": 128})
    svc.apply_groups(ModelGroupsFile(groups={"g2": GroupSpec(models=(changed,))}), {}, None)
    # No request asked for it: the placement job loads the new spec, is admitted and leaves the queue (the pump
    # admits it one step after the switch, so both are waited for).
    await _until(lambda: s.residency.current_spec == svc.groups.groups["g2"] and s.queued == 0)
    assert s.residency.current_group == "g2"


async def test_tokenizer_info_follows_the_served_specs(models: dict[str, ModelSpec]) -> None:
    cache = TokenizerCache()
    try:
        spec = models["tiny-chat"]
        changed = spec.model_copy(update={"context_length": 128})
        assert (await cache.info(spec)).context_length == 256
        assert (await cache.info(changed)).context_length == 128  # a changed spec is read anew, not served stale
        cache.retain([changed])  # what the service does with the models a reload serves
        assert [(k.id, k.context_length) for k in cache.cached()] == [("tiny-chat", 128)]
    finally:
        cache.close()


async def test_one_tokenizer_per_model_shared_by_every_copy_and_dropped_with_its_group(
    make: Any, models: dict[str, ModelSpec]
) -> None:
    groups = _file(models, g1=("tiny-chat", "minilm"), g2=("tiny-chat-b",))
    svc: PodService = await make(groups, devices=["cpu:0", "cpu:1"])
    await asyncio.gather(*(s.ensure_group("g1") for s in svc.schedulers.values()))
    info = await svc.tokenizers.info(models["tiny-chat"])  # what validation and detokenising use
    for s in svc.schedulers.values():  # the loaded copy on each device holds that very tokenizer
        assert s.residency.current["tiny-chat"].tokenizer is info.tokenizer
    embed = svc.schedulers["cpu:1"].residency.current["minilm"]
    assert embed.tokenizer is (await svc.tokenizers.info(models["minilm"])).tokenizer
    assert {k.id for k in svc.tokenizers.cached()} == {"tiny-chat", "minilm"}

    svc.apply_groups(_file(models, g2=("tiny-chat-b",)), {}, None)  # g1 leaves the pod (idle: at once)
    assert not {k.id for k in svc.tokenizers.cached()} & {"tiny-chat", "minilm"}
    assert all(e.tokenizer is not info.tokenizer for e in svc.tokenizers._entries.values())
    # Once the devices let the group go, nothing of the pod holds that tokenizer any more.
    await _until(lambda: all(s.residency.current_group is None for s in svc.schedulers.values()))
    gone = weakref.ref(info.tokenizer)
    del info, embed
    gc.collect()
    assert gone() is None
