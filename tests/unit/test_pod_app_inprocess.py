"""The pod server's app in-process (httpx's ASGI transport, the real tiny models, the real engine)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from gpufleet.api.model_groups import load_model_groups
from gpufleet.pod_server.app import create_app
from gpufleet.pod_server.settings import load_settings

pytestmark = pytest.mark.unit


@pytest.fixture
async def client(demo_models: Path) -> AsyncIterator[httpx.AsyncClient]:
    settings = load_settings(devices=["cpu:0"], max_sequences_per_device=8, model_groups=demo_models)
    app = create_app(settings, load_model_groups(demo_models))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://pod") as c:
            service = app.state.service
            await service.preload_task  # the default group is current before the first request
            yield c


async def test_chat_batches_and_renders(client: httpx.AsyncClient) -> None:
    body = {"model": "tiny-chat", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6, "n": 2}
    r = await client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    doc = r.json()
    assert [c["index"] for c in doc["choices"]] == [0, 1]
    assert doc["usage"]["completion_tokens"] <= 12 and doc["system_fingerprint"]
    assert r.headers["x-served-by-device"] == "cpu:0"


async def test_stream_ends_with_usage_and_done(client: httpx.AsyncClient) -> None:
    body = {
        "model": "tiny-chat",
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 5,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        lines = [line async for line in r.aiter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    usage = json.loads(lines[-2][6:])["usage"]
    assert usage["completion_tokens"] == 5


async def test_validation_refuses_before_queueing(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/completions", json={"model": "tiny-chat", "prompt": "x " * 2000, "max_tokens": 4})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    r = await client.post("/v1/completions", json={"model": "tiny-chat", "prompt": "x", "logprobs": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "logprobs"
    queue = (await client.get("/api/queue")).json()
    assert queue["total_queued"] == 0 and queue["total_running"] == 0


async def test_an_empty_prompt_starts_from_the_start_token(client: httpx.AsyncClient) -> None:
    # The engine cannot run a sequence of no tokens (its loop died on one): "" means BOS, as at OpenAI.
    r = await client.post("/v1/completions", json={"model": "tiny-chat", "prompt": "", "max_tokens": 2})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == 1
    r = await client.post("/v1/completions", json={"model": "tiny-chat", "prompt": "again", "max_tokens": 2})
    assert r.status_code == 200, r.text
