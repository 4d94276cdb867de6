"""The pod server as a real process on two CPU devices, with real tiny models."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.processes import ServerProcess, start_pod_server

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def groups_with_broken(demo_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo groups plus a group whose model directory is corrupt."""
    root = tmp_path_factory.mktemp("broken")
    doc = json.loads(demo_models.read_text())
    good = doc["groups"]["beta"]["models"][0]["source"]
    shutil.copytree(good, root / "broken-model")
    (root / "broken-model" / "model.safetensors").write_bytes(b"\x00garbage")
    doc["groups"]["broken"] = {"models": [{"id": "broken-chat", "source": str(root / "broken-model"), "task": "chat"}]}
    path = root / "model_groups.json"
    path.write_text(json.dumps(doc))
    return path


@pytest.fixture(scope="module")
def server(groups_with_broken: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = start_pod_server(
        tmp_path_factory.mktemp("logs"),
        groups_with_broken,
        devices="cpu:0,cpu:1",
        max_body_bytes="65536",
        max_tokens_default="8",
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


def chat(model: str, content: str = "hello", **extra: object) -> dict[str, object]:
    return {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 6, **extra}


def test_ready_with_default_group_current(client: httpx.Client) -> None:
    ready = client.get("/ready").json()
    assert ready["ready"] is True
    models = client.get("/api/models").json()["model_groups"]
    alpha = next(g for g in models if g["group_id"] == "alpha")
    assert any(d["is_current"] for d in alpha["device_info"])


def test_chat_completion_generates_text(client: httpx.Client) -> None:
    r = client.post("/v1/chat/completions", json=chat("tiny-chat"))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert body["choices"][0]["message"]["content"]
    assert body["usage"]["completion_tokens"] >= 1
    assert r.headers["x-served-by-device"] in ("cpu:0", "cpu:1")


def test_completion(client: httpx.Client) -> None:
    r = client.post("/v1/completions", json={"model": "tiny-complete-b", "prompt": "Once upon", "max_tokens": 5})
    assert r.status_code == 200, r.text
    assert r.json()["object"] == "text_completion"
    assert r.json()["choices"][0]["finish_reason"] in ("length", "stop")


def test_embeddings_are_normalised_vectors(client: httpx.Client) -> None:
    r = client.post("/v1/embeddings", json={"model": "minilm", "input": ["a cat", "a dog"]})
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert len(data) == 2 and len(data[0]["embedding"]) == 384
    norm = sum(x * x for x in data[0]["embedding"]) ** 0.5
    assert abs(norm - 1.0) < 1e-3


def test_embeddings_in_base64_as_the_openai_sdk_asks_by_default(client: httpx.Client) -> None:
    import base64
    import struct

    plain = client.post("/v1/embeddings", json={"model": "minilm", "input": "a cat"}).json()["data"][0]["embedding"]
    r = client.post("/v1/embeddings", json={"model": "minilm", "input": "a cat", "encoding_format": "base64"})
    assert r.status_code == 200, r.text
    raw = base64.b64decode(r.json()["data"][0]["embedding"])
    decoded = struct.unpack(f"<{len(raw) // 4}f", raw)
    assert len(decoded) == 384 and max(abs(a - b) for a, b in zip(decoded, plain, strict=True)) < 1e-6


def test_streaming_chat_is_sse_ending_with_done(client: httpx.Client) -> None:
    body = chat("tiny-chat", stream=True, stream_options={"include_usage": True})
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert any(c["choices"] and c["choices"][0]["finish_reason"] for c in chunks)
    assert chunks[-1]["usage"]["completion_tokens"] >= 1


def test_streaming_completion(client: httpx.Client) -> None:
    body = {"model": "tiny-complete-b", "prompt": "abc", "max_tokens": 4, "stream": True}
    with client.stream("POST", "/v1/completions", json=body) as r:
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert json.loads(events[0])["object"] == "text_completion"


def test_two_groups_at_once_land_on_different_devices(server: ServerProcess) -> None:
    async def run() -> list[tuple[str, str]]:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as c:
            # Warm both groups so the burst below is about placement, not first loads.
            await c.post("/v1/chat/completions", json=chat("tiny-chat"))
            await c.post("/v1/chat/completions", json=chat("tiny-chat-b"))
            reqs = [chat("tiny-chat" if i % 2 else "tiny-chat-b") for i in range(8)]
            rs = await asyncio.gather(*(c.post("/v1/chat/completions", json=b) for b in reqs))
            assert all(r.status_code == 200 for r in rs), [r.text for r in rs if r.status_code != 200]
            return [(str(b["model"]), r.headers["x-served-by-device"]) for b, r in zip(reqs, rs, strict=True)]

    placed = asyncio.run(run())
    by_model: dict[str, set[str]] = {}
    for model, device in placed:
        by_model.setdefault(model, set()).add(device)
    assert by_model["tiny-chat"].isdisjoint(by_model["tiny-chat-b"]), by_model


def test_exclusive_gpu_pins_the_device(client: httpx.Client) -> None:
    for device in ("cpu:0", "cpu:1"):
        r = client.post("/v1/chat/completions", json=chat("tiny-chat", exclusive_gpu=device))
        assert r.status_code == 200, r.text
        assert r.headers["x-served-by-device"] == device


def test_gpu_stats_shape(client: httpx.Client) -> None:
    doc = client.get("/api/gpu_stats").json()
    fields = {"utilization", "memory_used", "memory_total", "memory_percent", "peak_utilization"}
    assert doc["available"] is False  # CPU devices
    assert set(doc["devices"]) == {"cpu:0", "cpu:1"}
    for stats in doc["devices"].values():
        assert fields <= set(stats)
    assert fields <= set(doc)  # the original single-device fields
    assert doc["memory_total"] > 0


def test_models_shape(client: httpx.Client) -> None:
    doc = client.get("/api/models").json()
    groups = {g["group_id"]: g for g in doc["model_groups"]}
    assert {"alpha", "beta", "broken"} <= set(groups)
    for g in groups.values():
        assert {d["device"] for d in g["device_info"]} == {"cpu:0", "cpu:1"}
        for d in g["device_info"]:
            assert {"device", "has_group", "is_current"} <= set(d)
        for m in g["models"]:
            assert {"id", "loaded_on_devices"} <= set(m)
    ids = {m["id"] for g in groups.values() for m in g["models"]}
    assert {"tiny-chat", "minilm", "tiny-chat-b", "tiny-complete-b"} <= ids


def test_queue_shape(client: httpx.Client) -> None:
    doc = client.get("/api/queue").json()
    for device in ("cpu:0", "cpu:1"):
        q = doc["devices"][device]
        assert {"queue_size", "busy_workers", "idle_workers", "current_group"} <= set(q)


def test_v1_models_lists_every_model(client: httpx.Client) -> None:
    ids = {m["id"] for m in client.get("/v1/models").json()["data"]}
    assert {"tiny-chat", "tiny-chat-b", "tiny-complete-b", "minilm", "broken-chat"} <= ids
    assert client.get("/v1/models/tiny-chat").json()["group"] == "alpha"
    assert client.get("/v1/models/nope").status_code == 404


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (b"{not json", 400, "invalid_json"),
        (chat("no-such-model"), 404, "model_not_found"),
        (chat("tiny-chat", exclusive_gpu="cuda:9"), 400, "unknown_device"),
        (chat("tiny-chat", content="word " * 2000), 400, "context_length_exceeded"),
        (chat("tiny-chat", max_tokens=0), 400, "invalid_request"),
        (chat("tiny-chat", max_tokens=100_000), 400, "invalid_request"),
        ({"model": "tiny-chat"}, 400, "invalid_request"),
        (chat("minilm"), 400, "model_task_mismatch"),
        (chat("tiny-chat", content="x" * 70_000), 413, "request_too_large"),
    ],
    ids=[
        "malformed",
        "unknown-model",
        "unknown-device",
        "too-long",
        "max-tokens-0",
        "max-tokens-huge",
        "no-messages",
        "wrong-task",
        "body-cap",
    ],
)
def test_bad_input_gets_openai_error(client: httpx.Client, body: object, status: int, code: str) -> None:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = client.post("/v1/chat/completions", content=content, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code
    assert err["message"] and err["type"]


def test_broken_group_gives_503_while_others_serve(client: httpx.Client) -> None:
    r = client.post("/v1/chat/completions", json=chat("broken-chat"))
    assert r.status_code == 503, r.text
    assert r.json()["error"]["code"] == "model_load_failed"
    assert "Retry-After" in r.headers
    ok = client.post("/v1/chat/completions", json=chat("tiny-chat"))
    assert ok.status_code == 200
    assert client.get("/health").status_code == 200


def test_metrics_expose_switches_and_requests(client: httpx.Client) -> None:
    text = client.get("/metrics").text
    assert "gpufleet_requests_total" in text
    assert "gpufleet_group_switches_total{" in text
    assert "gpufleet_group_switch_seconds_bucket" in text
    assert "vllm:num_requests_waiting" in text


@pytest.fixture(scope="module")
def tiny_queue_server(demo_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = start_pod_server(
        tmp_path_factory.mktemp("logs-q"),
        demo_models,
        devices="cpu:0",
        name="tinyq",
        max_sequences_per_device="1",
        max_queue_per_device="1",
    )
    try:
        proc.wait_ready(timeout_s=180)
        yield proc
    finally:
        proc.stop()


def test_full_queue_gives_429_and_every_request_an_answer(tiny_queue_server: ServerProcess) -> None:
    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=tiny_queue_server.url, timeout=120) as c:
            reqs = [chat("tiny-chat", max_tokens=200) for _ in range(8)]
            return list(await asyncio.gather(*(c.post("/v1/chat/completions", json=b) for b in reqs)))

    rs = asyncio.run(run())
    statuses = sorted(r.status_code for r in rs)
    assert set(statuses) <= {200, 429}, statuses
    assert statuses.count(200) >= 1 and statuses.count(429) >= 1, statuses
    limited = next(r for r in rs if r.status_code == 429)
    assert int(limited.headers["Retry-After"]) >= 1
    assert limited.json()["error"]["type"] == "rate_limit_error"


def test_each_dispatch_is_one_structured_log_line(server: ServerProcess, client: httpx.Client) -> None:
    r = client.post("/v1/chat/completions", json=chat("tiny-chat"), headers={"x-request-id": "rid-dispatch-1"})
    assert r.headers["x-request-id"] == "rid-dispatch-1"
    lines = [json.loads(line) for line in server.log_tail(200_000).splitlines() if "rid-dispatch-1" in line]
    assert len(lines) == 1
    line = lines[0]
    assert line["msg"] == "dispatch" and line["model"] == "tiny-chat" and line["group"] == "alpha"
    assert line["device"] == r.headers["x-served-by-device"]
    assert line["reason"] and line["candidates"]
