"""Group residency and the CPU cache, with the real loader and the tiny demo models."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from gpufleet.api.model_groups import GroupSpec, ModelGroupsFile, ModelSpec, load_model_groups
from gpufleet.pod_server.inference import load_model
from gpufleet.pod_server.residency import DeviceResidency, GroupLoadError

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


def test_cache_is_bounded_and_evicts_least_recently_used(groups: ModelGroupsFile) -> None:
    r = DeviceResidency("cpu:0", cache_limit_models=1, loader=load_model)
    r.make_current("g1", groups.groups["g1"])
    r.make_current("g2", groups.groups["g2"])  # g1 parked
    result = r.make_current("g3", groups.groups["g3"])  # g2 parked, g1 evicted
    assert result.evicted == ("g1",)
    assert r.cached_groups() == ["g2"]
    assert r.make_current("g1", groups.groups["g1"]).source == "disk"


def test_zero_cache_drops_parked_groups(groups: ModelGroupsFile) -> None:
    r = DeviceResidency("cpu:0", cache_limit_models=0, loader=load_model)
    r.make_current("g1", groups.groups["g1"])
    r.make_current("g2", groups.groups["g2"])
    assert r.cached_groups() == []


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
