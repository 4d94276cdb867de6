"""Group residency and the CPU cache, with the real loader and the tiny demo models."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import pytest

from gpufleet.api.model_groups import GroupSpec, ModelGroupsFile, ModelSpec, load_model_groups
from gpufleet.pod_server.host_cache import HostCache
from gpufleet.pod_server.inference import LoadedModel, load_model
from gpufleet.pod_server.memory import MemoryLedger
from gpufleet.pod_server.residency import DeviceResidency, GroupLoadError, Loader, SwitchAborted

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def groups(demo_models: Path) -> ModelGroupsFile:
    doc = load_model_groups(demo_models)
    # Three single-model groups make cache arithmetic easy to read.
    lm = {m.id: m for g in doc.groups.values() for m in g.models if m.task != "embedding"}
    return ModelGroupsFile(
        default_group="g1",
        groups={
            "g1": GroupSpec(models=(lm["tiny-chat"],)),
            "g2": GroupSpec(models=(lm["tiny-chat-b"],)),
            "g3": GroupSpec(models=(lm["tiny-complete-b"],)),
        },
    )


def test_switch_sources_disk_then_cache(groups: ModelGroupsFile) -> None:
    r = DeviceResidency("cpu:0", cache_limit_models=4, loader=load_model)
    assert r.make_current("g1", groups.groups["g1"]).source == "disk"
    assert r.make_current("g1", groups.groups["g1"]).source == "current"
    assert r.make_current("g2", groups.groups["g2"]).source == "disk"
    assert r.cached_groups() == ["g1"]
    back = r.make_current("g1", groups.groups["g1"])
    assert back.source == "cache"
    assert r.current_group == "g1" and r.cached_groups() == ["g2"]
    assert set(r.current) == {"tiny-chat"}


def test_cache_is_bounded_in_models_and_evicts_least_recently_used(groups: ModelGroupsFile) -> None:
    # The current group keeps its host copy in the cache: room for it and one parked group.
    r = DeviceResidency("cpu:0", cache_limit_models=2, loader=load_model)
    r.make_current("g1", groups.groups["g1"])
    r.make_current("g2", groups.groups["g2"])  # g1 parked
    result = r.make_current("g3", groups.groups["g3"])  # g2 parked, g1 evicted
    assert result.evicted == ("g1",)
    assert r.cached_groups() == ["g2"]
    assert r.make_current("g1", groups.groups["g1"]).source == "disk"


def test_cache_is_bounded_in_bytes(groups: ModelGroupsFile) -> None:
    one = load_model(groups.groups["g1"].models[0], "cpu:0").bytes
    ledger = MemoryLedger(["cpu:0"])
    cache = HostCache(max_models=100, max_bytes=int(one * 2.5), ledger=ledger)
    r = DeviceResidency("cpu:0", 100, load_model, host_cache=cache, ledger=ledger)
    for g in ("g1", "g2", "g3"):
        r.make_current(g, groups.groups[g])
    assert r.cached_groups() == ["g2"]  # g1 evicted for g3: three copies do not fit
    assert cache.used_bytes() <= cache.max_bytes  # type: ignore[operator]
    assert set(ledger.host_copies()) == {"tiny-chat-b", "tiny-complete-b"}


def test_failed_load_keeps_previous_group_serving(groups: ModelGroupsFile, tmp_path: Path) -> None:
    good = groups.groups["g1"].models[0]
    broken_dir = tmp_path / "broken"
    shutil.copytree(good.source, broken_dir)
    (broken_dir / "model.safetensors").write_bytes(b"not a safetensors file")
    broken = GroupSpec(models=(ModelSpec(id="broken", source=str(broken_dir), task="chat"),))
    r = DeviceResidency("cpu:0", cache_limit_models=4, loader=load_model)
    r.make_current("g1", groups.groups["g1"])
    with pytest.raises(GroupLoadError, match="broken"):
        r.make_current("bad", broken)
    assert r.current_group == "g1"
    assert set(r.current) == {"tiny-chat"}


def _failing_loader(fail_for: set[str], exc: Exception) -> Loader:
    def load(spec: ModelSpec, device: str) -> LoadedModel:
        if spec.id in fail_for:
            raise exc
        return load_model(spec, device)

    return load


def _assert_serves(r: DeviceResidency, group: str, model: str) -> None:
    assert r.current_group == group and set(r.current) == {model}
    assert all(m.device == r.device for m in r.current.values())
    r.current[model].model(input_ids=__import__("torch").tensor([[1, 2, 3]]))  # it still runs


def test_out_of_memory_at_the_load_restores_the_previous_group(groups: ModelGroupsFile) -> None:
    oom = RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
    r = DeviceResidency("cpu:0", 4, _failing_loader({"tiny-chat-b"}, oom))
    r.make_current("g1", groups.groups["g1"])
    with pytest.raises(GroupLoadError, match="out of memory"):
        r.make_current("g2", groups.groups["g2"])
    _assert_serves(r, "g1", "tiny-chat")
    assert r.restore_error is None and r.ledger.resident("cpu:0").keys() == {"tiny-chat"}


def test_failure_in_the_copy_restores_the_previous_group(
    groups: ModelGroupsFile, monkeypatch: pytest.MonkeyPatch
) -> None:
    r = DeviceResidency("cpu:0", 4, load_model)
    r.make_current("g1", groups.groups["g1"])
    g1 = r.current["tiny-chat"]
    r.make_current("g2", groups.groups["g2"])  # g1 parked in the cache

    def copy_fails(device: str) -> None:
        raise RuntimeError("CUDA out of memory in the host-to-device copy")

    monkeypatch.setattr(g1, "activate", copy_fails)
    with pytest.raises(GroupLoadError, match="host-to-device"):
        r.make_current("g1", groups.groups["g1"])
    _assert_serves(r, "g2", "tiny-chat-b")
    assert "g1" in r.cached_groups()  # its host copy survives the failed copy


def test_a_failing_restore_is_retried_after_releasing_memory(
    groups: ModelGroupsFile, monkeypatch: pytest.MonkeyPatch
) -> None:
    released: list[str] = []
    monkeypatch.setattr("gpufleet.pod_server.residency.release_device_memory", lambda device: released.append(device))
    r = DeviceResidency("cpu:0", 4, _failing_loader({"tiny-chat-b"}, RuntimeError("load fails")))
    r.make_current("g1", groups.groups["g1"])
    g1 = r.current["tiny-chat"]
    real, calls = g1.activate, []

    def restore_fails_once(device: str) -> None:
        calls.append(device)
        if len(calls) == 1:
            raise RuntimeError("out of memory in the restore")
        real(device)

    monkeypatch.setattr(g1, "activate", restore_fails_once)
    released.clear()
    with pytest.raises(GroupLoadError, match="load fails"):
        r.make_current("g2", groups.groups["g2"])
    assert len(calls) == 2 and len(released) >= 2  # released after the load and before the retry
    _assert_serves(r, "g1", "tiny-chat")


def test_restore_that_cannot_succeed_leaves_no_group_and_says_why(
    groups: ModelGroupsFile, monkeypatch: pytest.MonkeyPatch
) -> None:
    fail = {"tiny-chat-b"}
    r = DeviceResidency("cpu:0", 4, _failing_loader(fail, RuntimeError("disk gone")))
    r.make_current("g1", groups.groups["g1"])

    def copy_fails(device: str) -> None:
        raise RuntimeError("device lost")

    monkeypatch.setattr(r.current["tiny-chat"], "activate", copy_fails)
    fail.add("tiny-chat")  # and the reload from disk fails too
    with pytest.raises(GroupLoadError):
        r.make_current("g2", groups.groups["g2"])
    assert r.current_group is None and r.current == {}
    assert r.restore_error is not None and "g1" in r.restore_error and "device lost" in r.restore_error
    assert r.ledger.resident("cpu:0") == {}


def test_an_abandoned_switch_rolls_back_when_its_load_returns(groups: ModelGroupsFile) -> None:
    abort = threading.Event()

    def slow_then_abandoned(spec: ModelSpec, device: str) -> LoadedModel:
        if spec.id == "tiny-chat-b":
            abort.set()  # the caller timed out while this load ran
        return load_model(spec, device)

    r = DeviceResidency("cpu:0", 4, slow_then_abandoned)
    r.make_current("g1", groups.groups["g1"])
    with pytest.raises(SwitchAborted):
        r.make_current("g2", groups.groups["g2"], abort)
    _assert_serves(r, "g1", "tiny-chat")
    assert "g2" in r.cached_groups()  # the finished load is kept, parked, not current


def test_second_device_takes_the_cached_group_without_a_second_host_copy(groups: ModelGroupsFile) -> None:
    ledger = MemoryLedger(["cpu:0", "cpu:1"])
    cache = HostCache(max_models=8, max_bytes=None, ledger=ledger)
    d0 = DeviceResidency("cpu:0", 8, load_model, host_cache=cache, ledger=ledger)
    d1 = DeviceResidency("cpu:1", 8, load_model, host_cache=cache, ledger=ledger)
    d0.make_current("g1", groups.groups["g1"])
    copies = ledger.host_copies_made
    assert copies == 1 and set(ledger.host_copies()) == {"tiny-chat"}
    assert d1.make_current("g1", groups.groups["g1"]).source == "cache"  # current on cpu:0 meanwhile
    assert ledger.host_copies_made == copies and set(ledger.host_copies()) == {"tiny-chat"}
    a, b = d0.current["tiny-chat"], d1.current["tiny-chat"]
    assert a.model is not b.model  # each device its own module tree ...
    pa = dict(a.model.named_parameters())
    pb = dict(b.model.named_parameters())
    assert all(pa[n].data_ptr() == pb[n].data_ptr() for n in pa)  # ... over the same host tensors
    assert ledger.resident("cpu:0").keys() == ledger.resident("cpu:1").keys() == {"tiny-chat"}
    _assert_serves(d1, "g1", "tiny-chat")
    d0.make_current("g2", groups.groups["g2"])
    assert d1.make_current("g2", groups.groups["g2"]).source == "cache"
    assert ledger.host_copies_made == 2


def test_a_changed_spec_is_never_served_from_the_old_cached_copy(groups: ModelGroupsFile) -> None:
    # model_groups.json changed g1 under the same id: its old host copy must not come back as the new spec.
    old = groups.groups["g1"]
    new = GroupSpec(models=(old.models[0].model_copy(update={"context_length": 128}),))
    r = DeviceResidency("cpu:0", cache_limit_models=4, loader=load_model)
    r.make_current("g1", old)
    r.make_current("g2", groups.groups["g2"])  # g1 parked in the cache, from the old spec
    assert r.host_cache.holds("g1", old) and not r.host_cache.holds("g1", new)
    assert r.make_current("g1", new).source == "disk"
    assert r.current_spec == new and r.host_cache.holds("g1", new) and not r.host_cache.holds("g1", old)
    r.make_current("g2", groups.groups["g2"])
    assert r.host_cache.discard_stale({"g2": groups.groups["g2"]}) == ["g1"]  # g1 left the file: dropped
    assert r.cached_groups() == [] and r.host_cache.groups() == ["g2"]


def test_drop_current_leaves_no_group_on_the_device(groups: ModelGroupsFile) -> None:
    ledger = MemoryLedger(["cpu:0"])
    r = DeviceResidency("cpu:0", 4, load_model, ledger=ledger)
    r.make_current("g1", groups.groups["g1"])
    assert r.drop_current() == "g1"
    assert r.current_group is None and r.current == {} and ledger.resident("cpu:0") == {}
    assert r.drop_current() is None
