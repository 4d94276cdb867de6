"""Reloading model_groups.json and placement.json: the diff, and the poll over a kubelet-style volume."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from gpufleet.api.model_groups import GroupSpec, ModelSpec, groups_digest, load_model_groups, parse_model_groups_lenient
from gpufleet.pod_server.group_reload import ConfigWatcher, GroupsDiff, diff_groups
from gpufleet.pod_server.metrics import PodMetrics
from gpufleet.pod_server.service import PodService
from gpufleet.pod_server.settings import load_settings
from tests.support.configmap_volume import ConfigMapVolume

pytestmark = pytest.mark.unit


def _spec(*ids: str, source: str = "/m") -> GroupSpec:
    return GroupSpec(models=tuple(ModelSpec(id=i, source=f"{source}/{i}") for i in ids))


A, A2, B, C = _spec("a"), _spec("a", source="/other"), _spec("b"), _spec("c")


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ({}, {}, GroupsDiff()),
        ({}, {"a": A}, GroupsDiff(added=("a",))),
        ({"a": A}, {}, GroupsDiff(removed=("a",))),
        ({"a": A}, {"a": A}, GroupsDiff(unchanged=("a",))),
        ({"a": A}, {"a": A2}, GroupsDiff(changed=("a",))),
        ({"a": A, "b": B}, {"b": B, "c": C}, GroupsDiff(added=("c",), removed=("a",), unchanged=("b",))),
        ({"c": C, "a": A}, {"a": A2, "c": C, "b": B}, GroupsDiff(added=("b",), changed=("a",), unchanged=("c",))),
    ],
)
def test_diff_groups(old: dict[str, GroupSpec], new: dict[str, GroupSpec], expected: GroupsDiff) -> None:
    diff = diff_groups(old, new)
    assert diff == expected
    assert diff.empty == (not (expected.added or expected.removed or expected.changed))


async def _until(cond: Callable[[], bool], timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)  # polling a background thread with a deadline


def _doc(demo_models: Path, groups: dict[str, list[str]], **extra: Any) -> str:
    """A model_groups.json over the demo models: group -> model ids (unknown ids become broken entries)."""
    demo = json.loads(demo_models.read_text())
    models = {m["id"]: m for g in demo["groups"].values() for m in g["models"]}
    body = {
        g: {"models": [models.get(i, {"id": i, "source": "/x", "task": "tts"}) for i in ids]}
        for g, ids in groups.items()
    }
    return json.dumps({"groups": body, **extra})


@pytest.fixture
async def pod(demo_models: Path, tmp_path: Path) -> AsyncIterator[tuple[PodService, ConfigWatcher, ConfigMapVolume]]:
    volume = ConfigMapVolume(tmp_path / "gpufleet")
    first = _doc(demo_models, {"g1": ["tiny-chat"]})
    volume.write({"model_groups.json": first, "placement.json": "{}"})
    path = volume.path("model_groups.json")
    groups, refused = parse_model_groups_lenient(first.encode(), path)
    settings = load_settings(devices=["cpu:0"], lazy_load_model=True, model_groups=path, model_groups_reload_s=1)
    svc = PodService(
        settings, groups, PodMetrics("test", ""), refused=refused, groups_hash=groups_digest(first.encode())
    )
    watcher = ConfigWatcher(
        svc,
        groups_path=path,
        placement_path=volume.path("placement.json"),
        interval_s=1,
        groups_hash=svc.groups_hash,
    )
    await svc.start()
    try:
        yield svc, watcher, volume
    finally:
        await svc.stop(5)


async def test_an_unchanged_file_applies_nothing(pod: tuple[PodService, ConfigWatcher, ConfigMapVolume]) -> None:
    svc, watcher, _ = pod
    await watcher.poll()  # reads the placement: the first poll applies it
    version = svc.status_version
    await watcher.poll()
    assert svc.status_version == version and svc.config_error is None


async def test_a_swapped_file_is_applied_with_its_bad_groups_refused(
    demo_models: Path, pod: tuple[PodService, ConfigWatcher, ConfigMapVolume]
) -> None:
    svc, watcher, volume = pod
    second = _doc(demo_models, {"g1": ["tiny-chat"], "g2": ["tiny-chat-b"], "bad": ["broken"], "z-dup": ["tiny-chat"]})
    volume.write({"model_groups.json": second, "placement.json": "{}"})
    await watcher.poll()
    status = svc.status()
    assert status.groups == ["g1", "g2"] and status.models == {"tiny-chat": "g1", "tiny-chat-b": "g2"}
    assert set(status.refused_groups) == {"bad", "z-dup"} and "'g1'" in status.refused_groups["z-dup"]
    assert status.groups_hash == groups_digest(second.encode()) and status.config_error is None


async def test_a_vanished_or_broken_file_keeps_the_groups_served(
    demo_models: Path, pod: tuple[PodService, ConfigWatcher, ConfigMapVolume]
) -> None:
    svc, watcher, volume = pod
    served, digest = svc.groups, svc.groups_hash
    volume.unlink("model_groups.json")
    await watcher.poll()
    assert svc.config_error is not None and "cannot read" in svc.config_error
    assert svc.groups is served and svc.groups_hash == digest
    volume.write({"model_groups.json": "{not json", "placement.json": "{}"})
    await watcher.poll()
    assert svc.config_error is not None and "not valid JSON" in svc.config_error and svc.groups is served
    volume.write({"model_groups.json": _doc(demo_models, {"g1": ["tiny-chat"]}), "placement.json": "{}"})
    await watcher.poll()
    assert svc.config_error is None and svc.groups is served  # the same bytes again: nothing to apply


async def test_an_empty_file_serves_nothing_and_a_default_override_survives_reloads(
    demo_models: Path, pod: tuple[PodService, ConfigWatcher, ConfigMapVolume]
) -> None:
    svc, watcher, volume = pod
    volume.write({"model_groups.json": json.dumps({"groups": {}}), "placement.json": "{}"})
    await watcher.poll()
    assert svc.status().groups == [] and svc.groups.default_group is None
    watcher.default_group = "g2"
    volume.write({"model_groups.json": _doc(demo_models, {"g1": ["tiny-chat"], "g2": ["tiny-chat-b"]})})
    await watcher.poll()
    assert svc.groups.default_group == "g2"


async def test_the_placement_is_read_each_poll_and_a_bad_one_keeps_the_last(
    pod: tuple[PodService, ConfigWatcher, ConfigMapVolume], demo_models: Path
) -> None:
    svc, watcher, volume = pod
    groups = _doc(demo_models, {"g1": ["tiny-chat"]})
    await watcher.poll()
    assert svc.status().placement_generation == 0  # "{}": an empty placement
    placed = {"generation": 4, "pods": {"local": {"devices": {"0": {"cached": ["g1"]}}}}}
    volume.write({"model_groups.json": groups, "placement.json": json.dumps(placed)})
    await watcher.poll()
    assert svc.status().placement_generation == 4
    await _until(lambda: svc.host_cache.holds("g1") and not svc._prefetching)  # its cached group: prefetched
    volume.write({"model_groups.json": groups, "placement.json": '{"generation": -1}'})
    await watcher.poll()
    assert svc.status().placement_generation == 4
    assert svc.config_error is not None and svc.config_error.startswith("PLACEMENT:")
    volume.write({"model_groups.json": groups})  # the key left the ConfigMap: no placement document
    await watcher.poll()
    assert svc.status().placement_generation == 0 and svc.config_error is None


def test_the_demo_file_parses_the_same_leniently_and_strictly(demo_models: Path) -> None:
    lenient, refused = parse_model_groups_lenient(demo_models.read_bytes(), demo_models)
    assert refused == {} and lenient == load_model_groups(demo_models)
