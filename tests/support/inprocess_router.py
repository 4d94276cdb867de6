"""The router's ASGI app in this event loop: its lifespan driven by hand, pods known from fixed status
documents (no polls needed), requests sent as raw ASGI so a test sees each message the client gets
as it is sent (httpx's ASGI transport waits for the whole answer)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from starlette.types import ASGIApp, Message

from gpufleet.api.device_report import device_queue, queue_document
from gpufleet.api.pod_status import DeviceStatus, PodStatus
from gpufleet.router.mock_upstream import MockRequest, MockResponse
from gpufleet.router.state import FleetState
from gpufleet.router.upstream import Upstream


@dataclass(frozen=True)
class FixedPod:
    name: str
    devices: Sequence[str] = ("cpu:0",)
    groups: dict[str, str] = field(default_factory=lambda: {"chat": "alpha"})  # model -> group, all current
    node: str = "node-1"
    tenant: str | None = None  # its namespace, as Kubernetes discovery gives it
    routing_headers: int = 0  # the version of the router's decision headers it reads (0: the body's fields)

    @property
    def url(self) -> str:
        return f"http://{self.name}"

    def status(self) -> PodStatus:
        current = next(iter(self.groups.values()))
        return PodStatus(
            pod=self.name,
            node=self.node,
            ready=True,
            devices=[
                DeviceStatus(device=d, current_group=current, uuid=f"GPU-{self.name}-{d[-1]}") for d in self.devices
            ],
            groups=sorted(set(self.groups.values())),
            models=dict(self.groups),
            timestamp=time.time(),
            routing_headers=self.routing_headers,
        )


class FixedFleet:
    """Discovery that knows its pods by their status documents, as a Kubernetes annotation gives them."""

    kind = "fixed"

    def __init__(self, pods: Iterable[FixedPod]) -> None:
        self.pods = list(pods)

    async def run(self, state: FleetState, pool: Upstream) -> None:
        for pod in self.pods:
            state.upsert(pod.name, pod.url, name=pod.name, node=pod.node, tenant=pod.tenant)
            state.observe_status(pod.name, pod.status(), contact=False)
        await asyncio.Event().wait()


def model_group_object(name: str, *models: str, namespace: str) -> dict[str, Any]:
    """A ModelGroup as the API server sends it (the fields the router reads)."""
    return {
        "apiVersion": "gpufleet.io/v1alpha1",
        "kind": "ModelGroup",
        "metadata": {"name": name, "namespace": namespace, "creationTimestamp": "2026-01-01T00:00:00Z"},
        "spec": {"models": [{"id": m, "source": f"/models/{m}"} for m in models]},
    }


class GrowingFleet:
    """Discovery of a fleet at zero: its ModelGroups known (as the resource watch reports them), no pod
    until a test scales one up (``add``), as Kubernetes discovery would report it."""

    kind = "growing"

    def __init__(self, namespace: str, model_groups: list[dict[str, Any]]) -> None:
        self.namespace = namespace
        self.model_groups = model_groups
        self.state: FleetState | None = None

    async def run(self, state: FleetState, pool: Upstream) -> None:
        state.observe_model_groups("RESET", self.namespace, self.model_groups)
        self.state = state
        await asyncio.Event().wait()

    def add(self, pod: FixedPod, *, ready: bool = True) -> None:
        assert self.state is not None, "discovery has not started"
        self.state.upsert(pod.name, pod.url, name=pod.name, node=pod.node, tenant=pod.tenant)
        self.state.observe_status(pod.name, pod.status().model_copy(update={"ready": ready}), contact=False)


ANSWER = b'{"id":"chatcmpl-1",  "object":"chat.completion", "choices": []}'  # odd spacing: relayed as is
Answerer = Callable[[MockRequest], Awaitable[MockResponse]]


async def served(request: MockRequest) -> MockResponse:
    return MockResponse(200, [(b"Content-Type", b"application/json"), (b"X-Served-By-Device", b"cpu:0"),
                              (b"x-group-switch", b"false")], ANSWER)


class Pods:
    """A ``MockUpstream`` handler for ``FixedPod``s: each answers ``served`` unless a test gives it another
    answerer (``answer[name]``); polls get the pod's documents."""

    def __init__(self, pods: Iterable[FixedPod]) -> None:
        self.pods = {p.name: p for p in pods}
        self.answer: dict[str, Answerer] = {}

    async def __call__(self, request: MockRequest) -> MockResponse:
        pod = self.pods[request.base_url.removeprefix("http://")]
        if request.method == b"GET" and request.path == "/api/queue":
            devices = {d: device_queue(running=0, max_sequences=1, queue_limit=64) for d in pod.devices}
            return MockResponse.json(queue_document(devices, 0))
        if request.method == b"GET" and request.path == "/api/status":
            return MockResponse.json(pod.status().model_dump(mode="json"))
        return await self.answer.get(pod.name, served)(request)


async def _run(app: ASGIApp, scope: dict[str, Any], receive: Any, send: Any) -> None:
    await app(scope, receive, send)


@contextlib.asynccontextmanager
async def lifespan(app: ASGIApp) -> AsyncIterator[None]:
    """Drive the ASGI lifespan protocol (httpx's transport does not)."""
    inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    outbox: asyncio.Queue[Message] = asyncio.Queue()
    scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
    task: asyncio.Task[None] = asyncio.create_task(_run(app, scope, inbox.get, outbox.put))
    await inbox.put({"type": "lifespan.startup"})
    assert (await outbox.get())["type"] == "lifespan.startup.complete"
    try:
        yield
    finally:
        await inbox.put({"type": "lifespan.shutdown"})
        await outbox.get()
        await task


@dataclass
class Answer:
    status: int
    headers: list[tuple[str, str]]
    body: bytes = b""

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k == name), None)

    def all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k == name]

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Exchange:
    """One request sent as raw ASGI; ``messages`` fills as the app sends, ``done`` when it returned."""

    task: asyncio.Task[None]
    messages: asyncio.Queue[Message]
    disconnect: asyncio.Event

    async def start(self) -> Answer:
        """The answer's status and headers (its body empty: read it with ``next_body`` or ``rest``)."""
        message = await asyncio.wait_for(self.messages.get(), 10)
        assert message["type"] == "http.response.start", message
        return Answer(message["status"], [(k.decode(), v.decode()) for k, v in message["headers"]])

    async def next_body(self) -> tuple[bytes, bool]:
        """The next body message: its bytes, and whether more follow."""
        message = await asyncio.wait_for(self.messages.get(), 10)
        assert message["type"] == "http.response.body", message
        return message.get("body", b""), message.get("more_body", False)

    async def rest(self) -> bytes:
        parts = []
        more = True
        while more:
            body, more = await self.next_body()
            parts.append(body)
        await asyncio.wait_for(self.task, 10)
        return b"".join(parts)


def send(
    app: ASGIApp, path: str, body: bytes | dict[str, Any], headers: Iterable[tuple[str, str]] = ()
) -> Exchange:
    """POST ``body`` to ``path``; the client stays connected until ``Exchange.disconnect`` is set."""
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    sent = [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]
    sent += [(k.lower().encode(), v.encode()) for k, v in headers]
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": path, "raw_path": path.encode(), "query_string": b"", "headers": sent, "client": ("127.0.0.1", 1),
        "server": ("router", 80), "state": {},
    }
    messages: asyncio.Queue[Message] = asyncio.Queue()
    disconnect = asyncio.Event()
    bodies = [{"type": "http.request", "body": raw, "more_body": False}]

    async def receive() -> Message:
        if bodies:
            return bodies.pop()
        await disconnect.wait()
        return {"type": "http.disconnect"}

    async def on_send(message: Message) -> None:
        await messages.put(message)

    task: asyncio.Task[None] = asyncio.create_task(_run(app, scope, receive, on_send))
    return Exchange(task, messages, disconnect)


async def call(
    app: ASGIApp, path: str, body: bytes | dict[str, Any], headers: Iterable[tuple[str, str]] = ()
) -> Answer:
    """The whole answer."""
    exchange = send(app, path, body, headers)
    answer = await exchange.start()
    answer.body = await exchange.rest()
    return answer
