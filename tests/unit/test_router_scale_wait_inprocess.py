"""Scale from zero at the router, in this event loop: a group known only from its ModelGroup (no pod)
is held, counted in /api/demand and served once a pod appears; streams get `: loading` comments, then
the pod's events or an error event; deadlines, a full queue and clients that leave. Pods answer
in-process (``MockUpstream``); the same over real sockets: tests/integration/test_router_scale_from_zero.py."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from starlette.types import ASGIApp

from gpufleet.api.demand import DemandReport, GroupDemand
from gpufleet.router.app import Runtime
from gpufleet.router.lease_store import MemoryLeaseStore
from gpufleet.router.mock_upstream import MockRequest, MockResponse, MockUpstream
from gpufleet.router.scale_wait import holds
from gpufleet.router.settings import load_router_settings
from gpufleet.routing.policy import Decision, Outcome
from tests.support.inprocess_router import (
    ANSWER,
    FixedPod,
    GrowingFleet,
    Pods,
    call,
    lifespan,
    model_group_object,
    send,
)

pytestmark = pytest.mark.unit

NS = "team-a"
GROUP = "team-a/alpha"
CHAT = "/v1/chat/completions"
BODY = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}
STREAM = {**BODY, "stream": True}
POD = FixedPod("pod-a", groups={"chat": "alpha"}, tenant=NS)


@dataclass
class Router:
    app: ASGIApp
    pods: Pods
    upstream: MockUpstream
    fleet: GrowingFleet

    @property
    def runtime(self) -> Runtime:
        return self.app.app.api.state.runtime  # type: ignore[attr-defined,no-any-return]

    async def get(self, path: str) -> httpx.Response:
        transport = httpx.ASGITransport(app=self.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://router") as client:
            return await client.get(path)

    async def demand(self) -> GroupDemand:
        doc = DemandReport.model_validate((await self.get("/api/demand")).json())
        return next(g for g in doc.groups if g.key == GROUP)

    async def outcomes(self) -> dict[str, float]:
        text = (await self.get("/metrics")).text
        return {m[0]: float(m[1]) for m in re.findall(r'^gpufleet_router_scale_waits_total\{outcome="(\w+)"\} (\S+)$',
                                                       text, re.M)}


async def until(predicate: Callable[[], Any], what: str, timeout_s: float = 5.0) -> None:
    """Poll ``predicate`` (sync or async) until it holds, with a deadline."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        await asyncio.sleep(0.005)
    raise TimeoutError(what)


async def waiting(router: Router, sequences: int) -> None:
    async def check() -> bool:
        return (await router.demand()).waiting == sequences

    await until(check, f"{sequences} sequences held")


@contextlib.asynccontextmanager
async def running(**settings: Any) -> AsyncIterator[Router]:
    pods = Pods([POD])
    upstream = MockUpstream(pods)
    fleet = GrowingFleet(NS, [model_group_object("alpha", "chat", namespace=NS)])
    options = {"scale_wait_seconds": 30, "scale_wait_comment_seconds": 30, **settings}
    config = load_router_settings(
        discovery="static", pod_urls=["http://unused"], queue_interval_s=60, status_interval_s=60, **options
    )
    app = create_app(config, fleet, upstream)
    async with lifespan(app):
        await until(lambda: fleet.state is not None, "discovery started")
        yield Router(app, pods, upstream, fleet)
    assert all(r.released for r in upstream.responses)


def create_app(config: Any, fleet: GrowingFleet, upstream: MockUpstream) -> ASGIApp:
    from gpufleet.router.app import create_app as make

    return make(config, discovery=fleet, upstream=upstream, leases=MemoryLeaseStore())


def error(body: bytes) -> dict[str, Any]:
    return json.loads(body)["error"]  # type: ignore[no-any-return]


def events(body: bytes) -> list[bytes]:
    return [e for e in body.split(b"\n\n") if e]


# --- held, then served ---------------------------------------------------------------------------------


async def test_a_group_known_only_from_its_model_group_is_listed_ready_and_held_until_a_pod_serves_it() -> None:
    async with running() as router:
        assert (await router.get("/ready")).status_code == 200  # no pod, yet ready: it can hold requests
        cards = (await router.get("/v1/models")).json()["data"]
        assert [(c["id"], c["owned_by"], c["group"]) for c in cards] == [("team-a/chat", "gpufleet", "alpha")]
        assert (await router.demand()).model_dump() == {"namespace": NS, "group": "alpha", "in_flight": 0,
                                                        "waiting": 0, "oldest_wait_seconds": 0.0,
                                                        "service_seconds": None}
        exchange = send(router.app, CHAT, {**BODY, "n": 2})
        await waiting(router, 2)  # n=2 weighs two sequences
        assert not exchange.task.done() and not router.upstream.requests
        router.fleet.add(POD)
        answer = await exchange.start()
        assert answer.status == 200 and answer.header("x-served-by-pod") == "pod-a"
        assert await exchange.rest() == ANSWER
        (sent,) = [r for r in router.upstream.requests if r.method == b"POST"]
        assert sent.json()["model"] == "chat"  # the pod's own id
        held = await router.demand()
        assert (held.waiting, held.in_flight) == (0, 0)
        assert await router.outcomes() == {"served": 1.0}
        metrics = (await router.get("/metrics")).text
        assert f'gpufleet_router_scale_wait_sequences{{group="{GROUP}"}} 0.0' in metrics
        assert 'gpufleet_router_scale_wait_seconds_count{outcome="served"} 1.0' in metrics


async def test_a_pod_that_is_starting_keeps_the_request_held_until_it_is_ready() -> None:
    async with running() as router:
        exchange = send(router.app, CHAT, BODY)
        await waiting(router, 1)
        router.fleet.add(POD, ready=False)  # it reports the group, not ready yet: still waiting
        fleet = (await router.get("/api/fleet")).json()
        assert fleet["pods"]["pod-a"]["state"] == "not_ready"
        assert (await router.demand()).waiting == 1 and not exchange.task.done()
        router.fleet.add(POD)
        assert (await exchange.start()).status == 200
        await exchange.rest()


async def test_in_flight_counts_the_sequences_at_pods() -> None:
    release = asyncio.Event()

    async def slow(request: MockRequest) -> MockResponse:
        await release.wait()
        return MockResponse(200, [(b"content-type", b"application/json")], ANSWER)

    async with running() as router:
        router.fleet.add(POD)
        router.pods.answer["pod-a"] = slow
        exchange = send(router.app, CHAT, {**BODY, "n": 3})

        async def three() -> bool:
            return (await router.demand()).in_flight == 3

        await until(three, "three sequences at the pod")
        release.set()
        assert (await exchange.start()).status == 200
        await exchange.rest()
        assert (await router.demand()).in_flight == 0


# --- streams -------------------------------------------------------------------------------------------


async def test_a_held_stream_gets_loading_comments_then_the_pods_events() -> None:
    async with running(scale_wait_comment_seconds=0) as router:
        router.pods.answer["pod-a"] = lambda request: _sse([b"data: 1\n\n", b"data: [DONE]\n\n"])
        router.runtime.waits.comment_every_s = 0.01
        exchange = send(router.app, CHAT, STREAM)
        answer = await exchange.start()
        assert answer.status == 200 and answer.header("content-type") == "text/event-stream"
        assert await exchange.next_body() == (b": loading\n\n", True)
        assert await exchange.next_body() == (b": loading\n\n", True)  # again while it waits
        router.fleet.add(POD)
        rest = (await exchange.rest()).replace(b": loading\n\n", b"")
        assert rest == b"data: 1\n\ndata: [DONE]\n\n"  # the pod's events, its headers not sent twice
        assert await router.outcomes() == {"served": 1.0}


async def test_a_stream_served_before_its_first_comment_is_an_ordinary_answer() -> None:
    async with running() as router:
        router.pods.answer["pod-a"] = lambda request: _sse([b"data: 1\n\n", b"data: [DONE]\n\n"])
        exchange = send(router.app, CHAT, STREAM)
        await waiting(router, 1)
        router.fleet.add(POD)
        answer = await exchange.start()
        assert answer.status == 200 and answer.header("x-served-by-pod") == "pod-a"  # the pod's own headers
        assert await exchange.rest() == b"data: 1\n\ndata: [DONE]\n\n"


async def test_a_pod_refusing_a_started_stream_ends_it_with_the_pods_error() -> None:
    async def full(request: MockRequest) -> MockResponse:
        body = {"error": {"message": "queue full", "type": "rate_limit_error", "param": None, "code": "queue_full"}}
        return MockResponse.json(body, 429, [(b"retry-after", b"3")])

    async with running(scale_wait_comment_seconds=0) as router:
        router.pods.answer["pod-a"] = full
        exchange = send(router.app, CHAT, STREAM)
        assert (await exchange.start()).status == 200
        await waiting(router, 1)
        router.fleet.add(POD)
        data, done = events((await exchange.rest()).replace(b": loading\n\n", b""))
        assert json.loads(data.removeprefix(b"data: "))["error"]["code"] == "queue_full"
        assert done == b"data: [DONE]"


# --- deadlines, a full queue, clients that leave --------------------------------------------------------


async def test_no_pod_by_the_deadline_is_a_503_with_retry_after() -> None:
    async with running(scale_wait_seconds=0.05) as router:
        answer = await call(router.app, CHAT, BODY)
        assert answer.status == 503 and answer.header("retry-after") == "10"
        assert error(answer.body)["code"] == "scale_from_zero_timeout"
        assert error(answer.body)["type"] == "server_error"
        assert await router.outcomes() == {"timeout": 1.0}
        assert (await router.demand()).waiting == 0


async def test_a_started_stream_ends_with_an_error_event_at_the_deadline() -> None:
    async with running(scale_wait_seconds=0.1, scale_wait_comment_seconds=0) as router:
        answer = await call(router.app, CHAT, STREAM)
        assert answer.status == 200
        comment, data, done = events(answer.body)
        assert comment == b": loading" and done == b"data: [DONE]"
        assert json.loads(data.removeprefix(b"data: "))["error"]["code"] == "scale_from_zero_timeout"


async def test_a_full_queue_is_a_503_at_once_and_a_client_that_leaves_frees_its_place() -> None:
    async with running(scale_wait_queue=2) as router:
        first = send(router.app, CHAT, {**BODY, "n": 2})
        await waiting(router, 2)
        answer = await call(router.app, CHAT, BODY)
        assert answer.status == 503 and answer.header("retry-after") == "10"
        assert error(answer.body)["code"] == "scale_from_zero_queue_full"
        first.disconnect.set()
        await asyncio.wait_for(first.task, 5)  # it leaves at once, answering nothing
        assert first.messages.empty()
        assert (await router.demand()).waiting == 0
        assert await router.outcomes() == {"full": 1.0, "gone": 1.0}
        metrics = (await router.get("/metrics")).text
        assert 'gpufleet_router_requests_total{code="499",endpoint="/v1/chat/completions"} 1.0' in metrics
        second = send(router.app, CHAT, {**BODY, "n": 2})  # its place is free again
        await waiting(router, 2)
        second.disconnect.set()
        await asyncio.wait_for(second.task, 5)


# --- what is not held ----------------------------------------------------------------------------------


async def test_requests_naming_a_device_or_a_lease_and_unknown_models_are_not_held() -> None:
    async with running() as router:
        for extra in ({"exclusive_gpu": "pod-a/cpu:0"}, {"lease": "lease-1"}):
            answer = await call(router.app, CHAT, {**BODY, **extra})  # refused at once, as before
            assert answer.status == 503 and not error(answer.body)["code"].startswith("scale_from_zero"), extra
        unknown = await call(router.app, CHAT, {**BODY, "model": "nope"})
        assert unknown.status == 404 and error(unknown.body)["code"] == "model_not_found"
        assert await router.outcomes() == {}


async def test_with_no_wait_configured_a_group_at_zero_is_a_503_at_once() -> None:
    async with running(scale_wait_seconds=0) as router:
        answer = await call(router.app, CHAT, BODY)
        assert answer.status == 503 and answer.header("retry-after")
        assert (await router.get("/ready")).status_code == 503  # nothing to serve, nothing to hold
        assert await router.outcomes() == {}


@pytest.mark.parametrize(
    ("outcome", "exclusive", "lease", "held"),
    [
        (Outcome.NO_DEVICES, None, None, True),
        (Outcome.GROUP_NOT_SERVED, None, None, True),
        (Outcome.TARGET_DOWN, None, None, True),  # its pods are starting
        (Outcome.SATURATED, None, None, False),  # busy pods queue, or answer 429, as before
        (Outcome.GROUP_FAILED, None, None, False),
        (Outcome.TARGET_DOWN, "pod-a", None, False),  # an answer about that target
        (Outcome.GROUP_NOT_SERVED, None, "lease-1", False),
    ],
)
def test_which_refusals_are_held(outcome: Outcome, exclusive: str | None, lease: str | None, held: bool) -> None:
    assert holds(Decision(outcome, None, "why"), exclusive, lease) is held


async def _sse(chunks: list[bytes]) -> MockResponse:
    return MockResponse.sse(chunks, [(b"x-served-by-device", b"cpu:0")])
