"""The pod server's app in-process (httpx's ASGI transport, the real tiny models, the real engine)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from gpufleet.api.model_groups import load_model_groups
from gpufleet.pod_server.app import create_app
from gpufleet.pod_server.gpu_stats import HostSource
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


class _NamedGpu(HostSource):
    """Host figures, but a GPU UUID for cpu:0: the status plumbing, without a GPU (NVML's own
    UUID read is tested against a fake NVML in test_gpu_stats and on a GPU in tests/gpu)."""

    def uuid(self, device: str) -> str | None:
        return "GPU-0f0f0f0f-aaaa" if device == "cpu:0" else None


async def test_the_status_names_each_gpu_by_uuid_and_accepts_it_as_a_target(
    demo_models: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("gpufleet.pod_server.app.open_stats_source", lambda devices: _NamedGpu())
    settings = load_settings(devices=["cpu:0", "cpu:1"], lazy_load_model=True, model_groups=demo_models)
    app = create_app(settings, load_model_groups(demo_models))
    transport = httpx.ASGITransport(app=app)
    async with app.router.lifespan_context(app), httpx.AsyncClient(transport=transport, base_url="http://pod") as c:
        doc = (await c.get("/api/status")).json()
        assert {d["device"]: d["uuid"] for d in doc["devices"]} == {"cpu:0": "GPU-0f0f0f0f-aaaa", "cpu:1": None}
        body = {"model": "tiny-chat", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
        r = await c.post("/v1/chat/completions", json={**body, "exclusive_gpu": "gpu-0F0F0F0F-AAAA"})
        assert r.status_code == 200, r.text
        assert r.headers["x-served-by-device"] == "cpu:0"
        # A lease reaching a pod server was sent past the router: refused by name, never ignored.
        r = await c.post("/v1/chat/completions", json={**body, "lease": "lease-1"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "lease"



async def test_the_app_keeps_its_startup_heap_out_of_collections_while_it_runs(demo_models: Path) -> None:
    # Full collections skip what the imports left (gpufleet.pod_server.heap): a switch's engine stop
    # collects twice. An app run in-process leaves its host's collector as it found it.
    import gc

    before = gc.get_freeze_count()  # a router app run in this process may have frozen its own
    settings = load_settings(devices=["cpu:0"], lazy_load_model=True, model_groups=demo_models)
    app = create_app(settings, load_model_groups(demo_models))
    async with app.router.lifespan_context(app):
        assert gc.get_freeze_count() > max(before, 100_000)
        garbage: list[object] = []
        garbage.append(garbage)  # a cycle made after the freeze is still collected
        del garbage
        assert gc.collect() >= 1
    assert gc.get_freeze_count() == 0


async def test_a_routed_request_takes_the_routers_decisions_from_headers(client: httpx.AsyncClient) -> None:
    """The router forwards the client's bytes: a namespace-qualified model, the client's target and
    lease. The pod reads the router's resolution of them from headers instead."""
    status = (await client.get("/api/status")).json()
    assert status["routing_headers"] >= 1  # what lets the router send the client's bytes
    body = {"model": "ml/tiny-chat", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2,
            "exclusive_gpu": "some-pod/cuda:7", "lease": "lease-123"}
    headers = {"x-gpufleet-device": "cpu:0", "x-gpufleet-exclusive": "cpu:0", "x-gpufleet-model": "tiny-chat"}
    r = await client.post("/v1/chat/completions", json=body, headers=headers)
    assert r.status_code == 200, r.text
    assert r.headers["x-served-by-device"] == "cpu:0"
    # The same body sent straight to the pod (no router) is judged by its own fields, as before.
    r = await client.post("/v1/chat/completions", json=body)
    assert r.status_code in (400, 404), r.text


async def test_a_group_no_device_can_hold_is_not_offered_in_v1_models(demo_models: Path) -> None:
    from gpufleet.pod_server.memory import Fit

    settings = load_settings(devices=["cpu:0", "cpu:1"], lazy_load_model=True, model_groups=demo_models)
    app = create_app(settings, load_model_groups(demo_models))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://pod") as c:
            schedulers = app.state.service.schedulers
            schedulers["cpu:0"].unfit["beta"] = Fit(False, 10**12, 10**9)
            ids = {m["id"] for m in (await c.get("/v1/models")).json()["data"]}
            assert {"tiny-chat-b", "tiny-complete-b"} <= ids  # cpu:1 could still hold beta
            schedulers["cpu:1"].unfit["beta"] = Fit(False, 10**12, 10**9)
            ids = {m["id"] for m in (await c.get("/v1/models")).json()["data"]}
            assert "tiny-chat" in ids and not {"tiny-chat-b", "tiny-complete-b"} & ids
            status = (await c.get("/api/status")).json()  # the status document still says why
            assert all("beta" in d["insufficient_memory_groups"] for d in status["devices"])


async def _usage(client: httpx.AsyncClient, path: str, body: dict[str, object]) -> tuple[int, list[str]]:
    """Completion tokens and finish reasons, streamed (with the usage chunk) or not."""
    if not body.get("stream"):
        r = await client.post(path, json=body)
        assert r.status_code == 200, r.text
        doc = r.json()
        return doc["usage"]["completion_tokens"], [c["finish_reason"] for c in doc["choices"]]
    async with client.stream("POST", path, json={**body, "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200
        chunks = [json.loads(line[6:]) async for line in r.aiter_lines() if line.startswith("data: {")]
    reasons = [c["finish_reason"] for chunk in chunks for c in chunk["choices"] if c.get("finish_reason")]
    return chunks[-1]["usage"]["completion_tokens"], reasons


async def test_vllms_ignore_eos_and_min_tokens_set_the_length(client: httpx.AsyncClient) -> None:
    # vLLM's extensions, as its benchmark clients send them. First a seed whose text ends early on the
    # end token (the tiny model samples it now and then; choice i of n is seeded seed + i).
    budget = 40
    base = {"model": "tiny-chat", "prompt": "Once upon a time", "max_tokens": budget, "temperature": 1.0}
    early = None
    for first in range(0, 64, 16):
        r = await client.post("/v1/completions", json={**base, "n": 16, "seed": first})
        stops = [c["index"] for c in r.json()["choices"] if c["finish_reason"] == "stop"]
        if stops:
            early = first + stops[0]
            break
    assert early is not None, "no seed found whose text ends on the end token"
    plain, _ = await _usage(client, "/v1/completions", {**base, "seed": early})
    assert plain < budget
    for stream in (False, True):
        one = {**base, "seed": early, "stream": stream}
        assert await _usage(client, "/v1/completions", {**one, "ignore_eos": True}) == (budget, ["length"])
        assert await _usage(client, "/v1/completions", {**one, "min_tokens": budget}) == (budget, ["length"])
        tokens, _ = await _usage(client, "/v1/completions", {**one, "min_tokens": plain + 1})
        assert tokens >= plain + 1
        chat = {"model": "tiny-chat", "messages": [{"role": "user", "content": "Hi"}], "stream": stream}
        many = {**chat, "max_tokens": 24, "n": 8, "seed": 3, "ignore_eos": True}
        assert await _usage(client, "/v1/chat/completions", many) == (8 * 24, ["length"] * 8)
        at_least = {**chat, "max_completion_tokens": 24, "n": 8, "seed": 3, "min_tokens": 20}
        tokens, reasons = await _usage(client, "/v1/chat/completions", at_least)
        assert tokens >= 8 * 20 and len(reasons) == 8


async def test_min_tokens_over_max_tokens_is_a_400_naming_it(client: httpx.AsyncClient) -> None:
    body = {"model": "tiny-chat", "prompt": "x", "max_tokens": 4, "min_tokens": 5}
    r = await client.post("/v1/completions", json=body)
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == "min_tokens" and "max_tokens (4)" in err["message"]
    chat = {"model": "tiny-chat", "messages": [{"role": "user", "content": "Hi"}]}
    r = await client.post("/v1/chat/completions", json={**chat, "max_completion_tokens": 2, "min_tokens": 3})
    assert r.status_code == 400 and r.json()["error"]["param"] == "min_tokens"
    r = await client.post("/v1/chat/completions", json={**chat, "min_tokens": 1000})  # past the context
    assert r.status_code == 400 and r.json()["error"]["param"] == "min_tokens"
    for field, value in (("ignore_eos", "yes"), ("min_tokens", -1), ("min_tokens", "3")):
        r = await client.post("/v1/completions", json={"model": "tiny-chat", "prompt": "x", field: value})
        assert r.status_code == 400 and r.json()["error"]["param"] == field, (field, value)
    r = await client.post("/v1/completions", json={"model": "tiny-chat", "prompt": "x", "min_tokens": 6})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 6  # the default budget rises to it


async def test_a_kv_budget_below_one_context_says_how_to_lower_the_context(demo_models: Path) -> None:
    settings = load_settings(devices=["cpu:0"], lazy_load_model=True, model_groups=demo_models, kv_cache_gb=0.0001)
    app = create_app(settings, load_model_groups(demo_models))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://pod") as c:
            body = {"model": "tiny-chat", "prompt": "x", "max_tokens": 2}
            r = await c.post("/v1/completions", json=body)
    assert r.status_code == 503 and "Retry-After" in r.headers
    message = r.json()["error"]["message"]
    assert "KV_CACHE_GB" in message and "`context_length` in model_groups.json" in message
    assert "`contextLength` in a ModelGroup" in message
