"""The router's proxy in this event loop, its pods answered in-process (``MockUpstream``): what reaches
the pod, what the client gets back, retries, failover, ejection and SSE relaying. The same paths over
real sockets: tests/integration/test_router_proxy.py."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass

import pytest
from starlette.types import ASGIApp

from gpufleet.api.headers import ROUTING_HEADERS_VERSION
from gpufleet.api.load_report import LOAD_HEADER, DeviceLoad, format_load
from gpufleet.router.app import create_app
from gpufleet.router.lease_store import MemoryLeaseStore
from gpufleet.router.mock_upstream import Chunk, MockRequest, MockResponse, MockUpstream
from gpufleet.router.settings import load_router_settings
from gpufleet.router.upstream import UpstreamError
from tests.support.inprocess_router import ANSWER, FixedFleet, FixedPod, Pods, call, lifespan, send, served

pytestmark = pytest.mark.unit

CHAT = "/v1/chat/completions"
BODY = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}


@dataclass
class Router:
    app: ASGIApp
    pods: Pods
    upstream: MockUpstream

    def posts(self, pod: str | None = None) -> list[MockRequest]:
        return [r for r in self.upstream.requests
                if r.method == b"POST" and (pod is None or r.base_url == f"http://{pod}")]


@contextlib.asynccontextmanager
async def running(*fleet: FixedPod) -> AsyncIterator[Router]:
    pods = Pods(fleet)
    upstream = MockUpstream(pods)
    settings = load_router_settings(
        discovery="static", pod_urls=["http://pod-a"], queue_interval_s=60, status_interval_s=60, retries=1,
        eject_after_failures=2, eject_cooldown_s=60,
    )
    app = create_app(settings, discovery=FixedFleet(fleet), upstream=upstream, leases=MemoryLeaseStore())
    async with lifespan(app):
        for _ in range(100):  # the discovery task runs at the lifespan's first await
            if (await call_get_fleet(app))["ready"]:
                break
            await asyncio.sleep(0)
        yield Router(app, pods, upstream)
    assert all(r.released for r in upstream.responses)  # every answer went back to the pool or was closed
    assert upstream.closed


@pytest.fixture
async def router() -> AsyncIterator[Router]:
    async with running(FixedPod("pod-a"), FixedPod("pod-b")) as r:
        yield r


async def call_get_fleet(app: ASGIApp) -> dict[str, object]:
    import httpx

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://router") as client:
        return (await client.get("/api/fleet")).json()  # type: ignore[no-any-return]


async def metrics(app: ASGIApp) -> str:
    import httpx

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://router") as client:
        return (await client.get("/metrics")).text


def refused(request: MockRequest) -> Awaitable[MockResponse]:
    raise UpstreamError("connect to pod failed: refused", connect=True)


async def answers(status: int, request: MockRequest) -> MockResponse:
    return MockResponse.json({"error": {"message": "no", "type": "x", "param": None, "code": "busy"}}, status,
                             [(b"retry-after", b"3")])


# --- what reaches the pod, what comes back -------------------------------------------------------------


async def test_the_clients_bytes_reach_the_pod_and_the_decision_travels_in_headers(router: Router) -> None:
    raw = b'{"model":  "chat", "messages": [{"role": "user", "content": "hi"}],\n "max_tokens": 3}'
    answer = await call(router.app, CHAT, raw, [("x-request-id", "rid-7")])
    assert answer.status == 200
    (sent,) = router.posts()
    assert sent.body == raw and sent.path == CHAT
    assert sent.header(b"x-gpufleet-device") == b"cpu:0" and sent.header(b"x-request-id") == b"rid-7"
    assert sent.header(b"content-type") == b"application/json"


async def test_the_pods_answer_is_relayed_as_it_was_sent(router: Router) -> None:
    async def pod(request: MockRequest) -> MockResponse:
        report = format_load({"cpu:0": DeviceLoad(running=4, waiting=1)}, 0)
        return MockResponse(200, [(b"content-type", b"application/json"), (b"connection", b"keep-alive"),
                                  (b"server", b"uvicorn"), (LOAD_HEADER.encode(), report.encode()),
                                  (b"x-served-by-device", b"cpu:0"), (b"x-group-switch", b"false")], ANSWER)

    router.pods.answer["pod-a"] = pod
    answer = await call(router.app, CHAT, BODY)
    assert answer.status == 200 and answer.body == ANSWER
    assert answer.header("content-length") == str(len(ANSWER)) and answer.header("x-served-by-pod") == "pod-a"
    assert answer.header("x-served-by-device") == "cpu:0" and answer.header("x-request-id")
    # Hop-by-hop headers, and the load meant for routers, stay here.
    assert not {"connection", "server", LOAD_HEADER} & {k for k, _ in answer.headers}
    fleet = await call_get_fleet(router.app)
    # 4 running + 1 waiting reported while our one request was there: 4 from elsewhere.
    assert fleet["pods"]["pod-a"]["devices"]["cpu:0"]["load"] == 4  # type: ignore[index]


ROUTED = {"model": "team-a/chat", "messages": [], "exclusive_gpu": "pod-a/cuda:1", "lease": None, "n": 2}


async def test_decisions_travel_in_headers_and_the_body_stays_the_clients() -> None:
    pod = FixedPod("pod-a", ("cuda:0", "cuda:1"), tenant="team-a", routing_headers=ROUTING_HEADERS_VERSION)
    async with running(pod) as router:
        raw = json.dumps(ROUTED, indent=1).encode()
        assert (await call(router.app, CHAT, raw)).status == 200
        (sent,) = router.posts()
        assert sent.body == raw  # the target, the lease field, the qualified model: the pod ignores them
        assert sent.header(b"x-gpufleet-device") == b"cuda:1" and sent.header(b"x-gpufleet-exclusive") == b"cuda:1"
        assert sent.header(b"x-gpufleet-model") == b"chat"


async def test_a_pod_that_does_not_read_them_still_gets_a_body_it_understands() -> None:
    pod = FixedPod("pod-a", ("cuda:0", "cuda:1"), tenant="team-a")
    async with running(pod) as router:
        assert (await call(router.app, CHAT, ROUTED)).status == 200
        (sent,) = router.posts()
        assert json.loads(sent.body) == {"model": "chat", "messages": [], "exclusive_gpu": "cuda:1", "n": 2}
        assert sent.header(b"x-gpufleet-exclusive") == b"cuda:1" and sent.header(b"x-gpufleet-model") == b"chat"
        # Nothing to rewrite: the client's bytes, whatever the pod reads.
        raw = b'{"model": "chat",  "messages": []}'
        assert (await call(router.app, CHAT, raw)).status == 200
        assert router.posts()[-1].body == raw and router.posts()[-1].header(b"x-gpufleet-exclusive") is None


async def test_a_request_of_n_choices_weighs_n_in_the_load_the_router_counts(router: Router) -> None:
    release = asyncio.Event()

    async def slow(request: MockRequest) -> MockResponse:
        await release.wait()
        return await served(request)

    router.pods.answer["pod-a"] = slow
    exchange = send(router.app, CHAT, {**BODY, "n": 3})
    for _ in range(100):
        if router.posts():
            break
        await asyncio.sleep(0)
    fleet = await call_get_fleet(router.app)
    assert fleet["pods"]["pod-a"]["devices"]["cpu:0"]["router_inflight"] == 3  # type: ignore[index]
    release.set()
    assert (await exchange.start()).status == 200
    await exchange.rest()
    fleet = await call_get_fleet(router.app)
    assert fleet["pods"]["pod-a"]["devices"]["cpu:0"]["router_inflight"] == 0  # type: ignore[index]


# --- retries and failover ---------------------------------------------------------------------------------


async def test_a_refused_connection_is_retried_on_another_pod(router: Router) -> None:
    router.pods.answer["pod-a"] = refused
    answer = await call(router.app, CHAT, BODY)
    assert answer.status == 200 and answer.header("x-served-by-pod") == "pod-b"
    assert [r.base_url for r in router.posts()] == ["http://pod-a", "http://pod-b"]
    text = await metrics(router.app)
    assert re.search(r'^gpufleet_router_upstream_failures_total\{kind="connect",pod="pod-a"\} 1\.0$', text, re.M)
    assert re.search(r'^gpufleet_router_retries_total\{pod="pod-a"\} 1\.0$', text, re.M)


@pytest.mark.parametrize("kind", ["first_byte_timeout", "status_503", "status_502"])
async def test_what_fails_before_the_first_byte_is_retried(router: Router, kind: str) -> None:
    async def pod(request: MockRequest) -> MockResponse:
        if kind == "first_byte_timeout":
            raise UpstreamError("no answer within 300s", timeout=True)
        return await answers(int(kind[-3:]), request)

    router.pods.answer["pod-a"] = pod
    answer = await call(router.app, CHAT, BODY)
    assert answer.status == 200 and answer.header("x-served-by-pod") == "pod-b"
    assert f'kind="{kind}",pod="pod-a"' in await metrics(router.app)


async def test_when_every_pod_is_full_the_last_429_reaches_the_client(router: Router) -> None:
    for pod in ("pod-a", "pod-b"):
        router.pods.answer[pod] = lambda request: answers(429, request)
    answer = await call(router.app, CHAT, BODY)
    assert answer.status == 429 and answer.header("retry-after") == "3"
    assert answer.json()["error"]["code"] == "busy" and answer.all("x-served-by-pod") == ["pod-b"]
    assert not any(p["ejected"] for p in (await call_get_fleet(router.app))["pods"].values())  # type: ignore[attr-defined]


async def test_when_every_attempt_fails_the_client_gets_a_502(router: Router) -> None:
    for pod in ("pod-a", "pod-b"):
        router.pods.answer[pod] = refused
    answer = await call(router.app, CHAT, BODY)
    assert answer.status == 502 and answer.json()["error"]["code"] == "upstream_connect"


async def test_a_pod_that_keeps_failing_is_ejected_and_asked_no_more(router: Router) -> None:
    router.pods.answer["pod-a"] = refused
    for _ in range(5):
        answer = await call(router.app, CHAT, BODY)
        assert answer.status == 200 and answer.header("x-served-by-pod") == "pod-b"
    assert len(router.posts("pod-a")) == 2  # EJECT_AFTER_FAILURES: then out for the cool-down
    fleet = await call_get_fleet(router.app)
    assert fleet["pods"]["pod-a"]["ejected"] is True  # type: ignore[index]
    assert re.search(r'^gpufleet_router_ejections_total\{pod="pod-a"\} 1\.0$', await metrics(router.app), re.M)


# --- server-sent events ----------------------------------------------------------------------------------


def stream_of(chunks: asyncio.Queue[Chunk | None]) -> AsyncIterator[Chunk]:
    async def gen() -> AsyncIterator[Chunk]:
        while (chunk := await chunks.get()) is not None:
            yield chunk

    return gen()


async def test_each_event_is_relayed_before_the_pod_sends_the_next(router: Router) -> None:
    chunks: asyncio.Queue[Chunk | None] = asyncio.Queue()

    async def pod(request: MockRequest) -> MockResponse:
        return MockResponse.sse(stream_of(chunks), [(b"x-served-by-device", b"cpu:0")])

    router.pods.answer["pod-a"] = pod
    exchange = send(router.app, CHAT, {**BODY, "stream": True})
    await chunks.put(b'data: {"i":0}\n\n')
    start = await exchange.start()
    assert start.status == 200 and start.header("content-type") == "text/event-stream"
    assert start.header("content-length") is None
    assert await exchange.next_body() == (b'data: {"i":0}\n\n', True)
    await chunks.put(b'data: {"i":1}\n\ndata: [DONE]\n\n')  # only now does the pod send its second chunk
    assert await exchange.next_body() == (b'data: {"i":1}\n\ndata: [DONE]\n\n', True)
    await chunks.put(None)
    assert await exchange.rest() == b""


@pytest.mark.parametrize(("error", "kind"), [(UpstreamError("reset by peer"), "stream_broken"),
                                             (UpstreamError("no data for 60s", timeout=True), "idle_timeout")])
async def test_a_pod_failing_mid_stream_ends_it_with_an_error_event(
    router: Router, error: UpstreamError, kind: str
) -> None:
    async def pod(request: MockRequest) -> MockResponse:
        return MockResponse.sse([b"data: 1\n\n", b"data: 2\n\n", error])

    router.pods.answer["pod-a"] = pod
    answer = await call(router.app, CHAT, {**BODY, "stream": True})
    assert answer.status == 200  # committed at the first chunk: not retried
    events = answer.body.decode().split("\n\n")
    assert events[:2] == ["data: 1", "data: 2"] and '"upstream_error"' in events[2] and events[3] == "data: [DONE]"
    assert f'kind="{kind}",pod="pod-a"' in await metrics(router.app)


async def test_a_client_leaving_mid_stream_releases_the_pods_answer(router: Router) -> None:
    chunks: asyncio.Queue[Chunk | None] = asyncio.Queue()

    async def pod(request: MockRequest) -> MockResponse:
        return MockResponse.sse(stream_of(chunks))

    router.pods.answer["pod-a"] = pod
    exchange = send(router.app, CHAT, {**BODY, "stream": True})
    await chunks.put(b"data: 1\n\n")
    assert (await exchange.start()).status == 200
    assert await exchange.next_body() == (b"data: 1\n\n", True)
    exchange.disconnect.set()
    await chunks.put(b"data: 2\n\n")  # the pump wakes with it and finds the client gone
    await asyncio.wait_for(exchange.task, 10)
    assert router.upstream.responses[-1].released


# --- leases -----------------------------------------------------------------------------------------------


async def test_the_lease_header_wins_over_the_body_field(router: Router) -> None:
    taken = await call(router.app, "/api/leases", {"target": "pod-b", "ttl_s": 60})
    assert taken.status == 201
    lease = taken.json()["id"]
    answer = await call(router.app, CHAT, {**BODY, "lease": "lease-not-this-one"}, [("x-gpufleet-lease", lease)])
    assert answer.status == 200 and answer.header("x-served-by-pod") == "pod-b"


async def test_a_model_its_pods_gained_since_their_last_report_is_served_not_refused() -> None:
    """A group just added to a pool: its pods list it before their status reaches the router."""
    pod = FixedPod("pod-a")
    async with running(pod) as router:
        router.pods.pods["pod-a"] = FixedPod("pod-a", groups={"chat": "alpha", "fresh": "beta"})
        answer = await call(router.app, CHAT, {**BODY, "model": "fresh"})
        assert answer.status == 200, answer.body
        assert [r.path for r in router.upstream.requests].count("/api/status") == 1  # it asked the pods once


async def test_unknown_models_fetch_the_pods_status_at_most_once_a_second() -> None:
    async with running(FixedPod("pod-a")) as router:
        answers = await asyncio.gather(*(call(router.app, CHAT, {**BODY, "model": "nope"}) for _ in range(5)))
        assert {a.status for a in answers} == {404}
        assert answers[0].json()["error"]["code"] == "model_not_found"
        # Five requests, one fetch: a client repeating a wrong name does not make the router poll in a loop.
        assert len([r for r in router.upstream.requests if r.path == "/api/status"]) == 1
