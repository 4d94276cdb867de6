"""A real pod server picks up a rewritten model_groups.json and placement.json without restarting.

The files live in a folder updated the way the kubelet updates a mounted ConfigMap (a new
timestamped folder, then an atomic swap of the ``..data`` symlink), as a GpuPool's pods see them.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from gpufleet.api.model_groups import groups_digest
from tests.support.configmap_volume import ConfigMapVolume
from tests.support.processes import ServerProcess, start_pod_server, wait_until

pytestmark = pytest.mark.integration

POD = "pool-0"


@pytest.fixture(scope="module")
def demo(demo_models: Path) -> dict[str, dict[str, Any]]:
    """The demo models by id, with absolute sources (the volume is another folder)."""
    doc = json.loads(demo_models.read_text())
    models = {m["id"]: m for g in doc["groups"].values() for m in g["models"]}
    for m in models.values():
        if (demo_models.parent / m["source"]).exists():
            m["source"] = str((demo_models.parent / m["source"]).resolve())
    return models


def _publish(
    volume: ConfigMapVolume,
    demo: dict[str, dict[str, Any]],
    groups: dict[str, list[str]],
    placement: dict[str, Any] | None = None,
) -> str:
    """Write both files (unknown model ids become malformed entries); returns the groups file's digest."""
    body = {
        g: {"models": [demo.get(i, {"id": i, "source": "/x", "task": "tts"}) for i in ids]} for g, ids in groups.items()
    }
    data = json.dumps({"groups": body}).encode()
    volume.write({"model_groups.json": data, "placement.json": json.dumps(placement or {})})
    return groups_digest(data)


@dataclass(frozen=True)
class Pool:
    proc: ServerProcess
    volume: ConfigMapVolume
    startup_digest: str  # of the model_groups.json the pod started from
    startup_status: dict[str, Any]  # its status document once ready


@pytest.fixture(scope="module")
def pool(demo: dict[str, dict[str, Any]], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pool]:
    root = tmp_path_factory.mktemp("pool")
    volume = ConfigMapVolume(root / "etc-gpufleet")
    digest = _publish(volume, demo, {"one": ["tiny-chat"], "bad0": ["not-a-model"]})
    proc = start_pod_server(
        root,
        volume.path("model_groups.json"),
        devices="cpu:0",
        name=POD,
        placement=str(volume.path("placement.json")),
        model_groups_reload_s="0.2",
        lazy_load_model="true",
        max_tokens_default="4",
    )
    try:
        proc.wait_ready(timeout_s=180)
        yield Pool(proc, volume, digest, httpx.get(proc.url + "/api/status", timeout=30).json())
    finally:
        proc.stop()


@pytest.fixture()
def client(pool: Pool) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=pool.proc.url, timeout=60) as c:
        yield c


def _status(client: httpx.Client) -> dict[str, Any]:
    r = client.get("/api/status")
    assert r.status_code == 200, r.text
    doc: dict[str, Any] = r.json()
    return doc


def _served(client: httpx.Client, digest: str) -> dict[str, Any]:
    """The status once the pod serves the file with this digest (polled with a deadline)."""
    wait_until(lambda: _status(client)["groups_hash"] == digest, 60, f"the pod to serve groups {digest}")
    return _status(client)


def _chat(client: httpx.Client, model: str) -> httpx.Response:
    return client.post("/v1/chat/completions", json={"model": model, "messages": [{"role": "user", "content": "hi"}]})


def test_a_malformed_group_at_start_up_is_refused_not_fatal(pool: Pool) -> None:
    status = pool.startup_status
    assert status["ready"] is True and status["groups"] == ["one"] and list(status["refused_groups"]) == ["bad0"]
    assert status["groups_hash"] == pool.startup_digest and status["placement_generation"] == 0


def test_an_added_group_answers_from_the_same_process(
    pool: Pool, demo: dict[str, dict[str, Any]], client: httpx.Client
) -> None:
    proc, volume = pool.proc, pool.volume
    pid = proc.pid
    status = _served(client, _publish(volume, demo, {"one": ["tiny-chat"], "two": ["tiny-chat-b"]}))
    assert status["groups"] == ["one", "two"] and status["models"]["tiny-chat-b"] == "two"
    r = _chat(client, "tiny-chat-b")
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"]
    assert "tiny-chat-b" in {m["id"] for m in client.get("/v1/models").json()["data"]}
    assert proc.alive() and proc.pid == pid


def test_a_removed_groups_model_is_not_found_and_its_copies_go(
    pool: Pool, demo: dict[str, dict[str, Any]], client: httpx.Client
) -> None:
    proc, volume = pool.proc, pool.volume
    _served(client, _publish(volume, demo, {"one": ["tiny-chat"], "two": ["tiny-chat-b"]}))
    assert _chat(client, "tiny-chat").status_code == 200  # "one" is loaded: its removal has something to free
    _served(client, _publish(volume, demo, {"two": ["tiny-chat-b"]}))
    r = _chat(client, "tiny-chat")
    assert r.status_code == 404, r.text
    assert r.json()["error"]["code"] == "model_not_found"
    assert _chat(client, "tiny-chat-b").status_code == 200

    def one_is_gone() -> bool:
        (device,) = _status(client)["devices"]
        return device["current_group"] != "one" and "one" not in device["cached_groups"]

    wait_until(one_is_gone, 60, "the removed group to leave the device and the cache")
    assert "one" not in {g["group_id"] for g in client.get("/api/models").json()["model_groups"]}
    assert proc.alive()


def test_a_malformed_group_is_refused_by_name_while_the_others_answer(
    pool: Pool, demo: dict[str, dict[str, Any]], client: httpx.Client
) -> None:
    volume = pool.volume
    groups = {"one": ["tiny-chat"], "two": ["tiny-chat-b"], "bad": ["not-a-model"], "z-dup": ["tiny-chat"]}
    status = _served(client, _publish(volume, demo, groups))
    assert status["groups"] == ["one", "two"]
    assert set(status["refused_groups"]) == {"bad", "z-dup"}
    assert "task" in status["refused_groups"]["bad"] and "'one'" in status["refused_groups"]["z-dup"]
    assert status["config_error"] is None
    for model in ("tiny-chat", "tiny-chat-b"):
        r = _chat(client, model)
        assert r.status_code == 200, r.text


def test_a_placement_makes_its_group_current_without_a_request(
    pool: Pool, demo: dict[str, dict[str, Any]], client: httpx.Client
) -> None:
    volume = pool.volume
    placement = {"generation": 7, "pods": {POD: {"devices": {"0": {"current": "three"}}}}}
    groups = {"one": ["tiny-chat"], "three": ["tiny-complete-b"]}
    _served(client, _publish(volume, demo, groups, placement))

    def placed() -> bool:
        status = _status(client)
        return status["placement_generation"] == 7 and status["devices"][0]["current_group"] == "three"

    wait_until(placed, 120, "the placed group to become current on device 0")
    requests = [line for line in client.get("/metrics").text.splitlines() if line.startswith("gpufleet_requests_total")]
    assert not any('model="tiny-complete-b"' in line for line in requests)  # no request asked for it
