"""Forwarding OpenAI requests to the chosen pod: buffered answers, SSE pass-through, one retry.

The client's bytes go to the pod unchanged. The router reads, in one parse of the body, only what
routing needs (``model``, ``exclusive_gpu``, ``lease``, ``stream``, and ``n`` for the request's
weight; the lease may also come in the ``x-gpufleet-lease`` header) and refuses only what it cannot
route; everything else is the pod's to validate. Its decisions travel in headers
(``gpufleet.api.headers``): the device it chose, the device the request is pinned to (the client's
target or lease resolved), the pod's own id of a namespace-qualified model. A pod that does not
announce reading those (``ROUTING_HEADERS_VERSION`` in its status document) still gets a body
rewritten where the client's would not do: the target as its device, no ``lease``, its own model id.

A request whose group no device serves yet (scaled to zero, its pods starting) is held until one
does (``gpufleet.router.scale_wait``), then routed as any other.

Nothing reaches the client before the pod's first byte (but the comments of a held stream), so any
failure up to then (refused connection, reset, timeout, a 5xx or 429) is retried once on another
eligible pod.
Non-streaming answers are read whole before the client sees them, so they are always
retryable; an SSE stream is committed at its first chunk and every later chunk is
forwarded the moment it arrives. The answer's bytes are relayed as the pod sent them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from starlette.types import Message, Receive, Scope, Send

from gpufleet.api.errors import GpufleetError, InternalError, InvalidRequest, ModelNotFound, UpstreamError
from gpufleet.api.headers import (
    EXCLUSIVE_DEVICE_HEADER,
    MODEL_HEADER,
    ROUTED_DEVICE_HEADER,
    ROUTING_HEADERS_VERSION,
)
from gpufleet.api.load_report import LOAD_HEADER, parse_load
from gpufleet.api.pod_status import PodStatus
from gpufleet.router.decide import Decider
from gpufleet.router.metrics import RouterMetrics
from gpufleet.router.scale_wait import ScaleWait, holds
from gpufleet.router.sse import sse_error
from gpufleet.router.state import FleetState, Ticket
from gpufleet.router.upstream import Upstream, UpstreamResponse
from gpufleet.router.upstream import UpstreamError as UpstreamConnectionError
from gpufleet.routing.leases import HEADER as LEASE_HEADER
from gpufleet.routing.policy import DeviceState, names_one_device
from gpufleet.routing.refusal import FAILURE_STATUSES, RETRY_STATUSES, may_retry_elsewhere

LOAD_HEADER_BYTES = LOAD_HEADER.encode()
log = logging.getLogger(__name__)

PROXY_PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/embeddings"})
CLIENT_CLOSED = 499  # nginx's code for a client that left before any answer (one held, say): metrics only
_DROP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"transfer-encoding",
        b"content-length",
        b"date",
        b"server",
        b"x-request-id",
        LOAD_HEADER.encode(),  # the pod's load is for routers, not clients
        b"proxy-connection",
        b"upgrade",
        b"te",
        b"trailer",
    }
)
_JSON = (b"content-type", b"application/json")
_LEASE_HEADER = LEASE_HEADER.encode()
_ROUTED_DEVICE = ROUTED_DEVICE_HEADER.encode()  # the pod keeps this choice while the device is eligible
_EXCLUSIVE_DEVICE = EXCLUSIVE_DEVICE_HEADER.encode()
_MODEL = MODEL_HEADER.encode()


@dataclass(frozen=True)
class ProxyConfig:
    retries: int
    pod_headers: tuple[tuple[bytes, bytes], ...] = ()
    # Fetch the pods' statuses once before a 404 for an unknown model (gpufleet.router.model_refresh).
    refresh_models: Callable[[], Awaitable[None]] | None = None


class _Retryable(Exception):
    """An attempt failed before the client saw a byte."""

    def __init__(
        self, kind: str, message: str, *, response: tuple[int, list[tuple[bytes, bytes]], bytes] | None = None,
        failure: bool = True,
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.response = response
        self.failure = failure


async def send_json(send: Send, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
    data = json.dumps(body).encode()
    raw = [_JSON, (b"content-length", str(len(data)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": data})


async def send_error(send: Send, exc: GpufleetError) -> None:
    await send_json(send, exc.status_code, exc.to_openai(), exc.headers())


async def read_body(receive: Receive) -> bytes:
    message = await receive()
    body: bytes = message.get("body", b"")
    if not message.get("more_body", False):
        return body
    parts = [body]
    while message.get("more_body", False):
        message = await receive()
        parts.append(message.get("body", b""))
    return b"".join(parts)


@dataclass(frozen=True)
class Routing:
    """What the router reads from a body: ``model``, ``exclusive_gpu``, ``lease``, ``stream`` and ``n``."""

    model: str
    exclusive_gpu: str | None
    stream: bool
    lease: str | None = None
    n: int = 1  # choices: the sequences it takes on its device, so its weight in the load the router counts


def parse_routing(body: bytes) -> tuple[dict[str, Any], Routing]:
    """Only the fields routing needs, checked by hand: this runs on every request. What the router
    does not need to route (``n`` out of range, say) is the pod's to refuse."""
    try:
        doc = json.loads(body)
    except ValueError:
        raise InvalidRequest("request body is not valid JSON", code="invalid_json") from None
    if not isinstance(doc, dict):
        raise InvalidRequest("request body must be a JSON object")
    model = doc.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("model: a non-empty string is required", param="model")
    exclusive = doc.get("exclusive_gpu")
    if exclusive is not None and (not isinstance(exclusive, str) or not exclusive):
        raise InvalidRequest("exclusive_gpu: must be a non-empty string", param="exclusive_gpu")
    lease = doc.get("lease")
    if lease is not None and (not isinstance(lease, str) or not lease):
        raise InvalidRequest("lease: must be a non-empty string (a lease id)", param="lease")
    stream = doc.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise InvalidRequest("stream: must be a boolean", param="stream")
    n = doc.get("n")
    choices = n if type(n) is int and n > 1 else 1
    return doc, Routing(model, exclusive, stream, lease, choices)


def request_lease(fields: Routing, headers: list[tuple[bytes, bytes]]) -> str | None:
    """The lease a request carries: its ``x-gpufleet-lease`` header, else its body field ``lease``.

    The header wins when both are set, as the OpenAPI document says (``openapi.LEASE_PRECEDENCE``):
    both are valid alone, so a request carrying two different ones is valid too and must not be
    refused for it. The header, because it is the part of a request that the deployment (a gateway,
    an SDK's default headers) sets for a client, and routing decisions travel in headers."""
    header = next((v.decode("latin-1") for k, v in headers if k == _LEASE_HEADER), None)
    if header is None:
        return fields.lease
    if not header.strip():
        raise InvalidRequest(f"{LEASE_HEADER}: must be a lease id", param="lease")
    return header.strip()


def pod_body(doc: dict[str, Any], device: str | None, model: str | None = None) -> bytes:
    """The body for a pod that does not read the routing headers: ``exclusive_gpu`` set to the
    pod-local ``device`` (pinned), or dropped (None: the pod may use any of its devices); never the
    router's ``lease``; ``model`` as the pod knows it, when given."""
    out = {k: v for k, v in doc.items() if k != "lease"}
    if device is not None:
        out["exclusive_gpu"] = device
    else:
        out.pop("exclusive_gpu", None)
    if model is not None:
        out["model"] = model
    return json.dumps(out, separators=(",", ":")).encode()


def reads_routing_headers(status: PodStatus | None) -> bool:
    """Does the pod take the router's decisions from headers (``gpufleet.api.headers``)?"""
    # A pod of an earlier version reports 0 (the field's default): it gets the rewritten body where
    # the client's would not do, so a rolling upgrade of the pods never breaks routing.
    return status is not None and status.routing_headers >= ROUTING_HEADERS_VERSION


async def _wait_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class Proxy:
    def __init__(
        self, state: FleetState, decider: Decider, metrics: RouterMetrics, pool: Upstream, config: ProxyConfig,
        waits: ScaleWait | None = None,
    ) -> None:
        self.state = state
        self.decider = decider
        self.metrics = metrics
        self.pool = pool
        self.config = config
        self.waits = waits
        self.running = 0  # requests being proxied; read by the metrics gauge at scrape time
        metrics.inflight.set_function(lambda: self.running)

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        endpoint = scope["path"]
        status = [0]

        async def tracked_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        self.running += 1
        try:
            await self._handle(scope, receive, tracked_send, started)
        except Exception:
            log.exception("proxy failed", extra={"request_id": scope["state"].get("request_id")})
            if not status[0]:
                await send_error(tracked_send, InternalError("the router failed to handle this request"))
        finally:
            self.running -= 1
            self.metrics.request_done(endpoint, status[0] or CLIENT_CLOSED, time.perf_counter() - started)

    async def _group_of(self, model: str) -> str:
        try:
            return self.decider.group_of(model)
        except ModelNotFound:
            if self.config.refresh_models is None:
                raise
        await self.config.refresh_models()  # a group just added: its pods may know it before we do
        return self.decider.group_of(model)

    async def _handle(self, scope: Scope, receive: Receive, send: Send, started: float) -> None:
        request_id: str = scope["state"]["request_id"]
        body = await read_body(receive)
        try:
            doc, fields = parse_routing(body)
            lease = request_lease(fields, scope["headers"])
            group = await self._group_of(fields.model)
        except GpufleetError as exc:
            await send_error(send, exc)
            return
        exclusive = fields.exclusive_gpu
        tried: set[str] = set()
        last: _Retryable | None = None
        last_pod = ""
        for attempt in range(1 + self.config.retries):
            decision = self.decider.decide(
                request_id, fields.model, group, exclusive, frozenset(tried), attempt, lease=lease
            )
            if attempt == 0 and self.waits is not None and self.waits.enabled and holds(decision, exclusive, lease):
                held = await self._hold(receive, send, fields, group, request_id)
                if held is None:
                    return
                send, group = held
                decision = self.decider.decide(request_id, fields.model, group, exclusive, frozenset(), 0, lease=lease)
            choice = decision.choice
            rec = self.state.by_name.get(choice.pod) if choice is not None else None
            if choice is None or rec is None or rec.url is None:
                if last is None:
                    await send_error(send, self.decider.refusal(decision, group, exclusive, lease))
                    return
                break
            retry_status = last.response[0] if last is not None and last.response is not None else None
            if retry_status is not None and not may_retry_elsewhere(retry_status, choice, group):
                break
            payload, headers = self._for_pod(body, doc, fields, lease, choice, rec.status)
            headers.append((b"x-request-id", request_id.encode()))
            ticket = self.state.begin(choice.pod, choice.device, group, idle=choice.load == 0, weight=fields.n)
            if choice.resident_group() != group:
                self.state.expect(choice.pod, choice.device, group)
            try:
                ok = await self._forward(
                    rec.url, scope["path"], payload, headers, fields.stream, ticket, receive, send, started
                )
                self.state.finish(ticket, ok=ok)
                return
            except _Retryable as failure:
                last, last_pod = failure, choice.pod
                tried.add(choice.pod)
                self.metrics.upstream_failure(choice.pod, failure.kind)
                ejected = self.state.failed(choice.pod, failure.message) if failure.failure else False
                log.warning(
                    "upstream attempt failed",
                    extra={
                        "request_id": request_id,
                        "pod": choice.pod,
                        "kind": failure.kind,
                        "error": failure.message,
                        "attempt": attempt,
                        "ejected": ejected,
                    },
                )
                if attempt < self.config.retries:
                    self.metrics.retry(choice.pod)
            finally:
                self.state.finish(ticket)
        assert last is not None
        if last.response is not None:
            code, headers, data = last.response
            headers = [*headers, (b"content-length", str(len(data)).encode())]  # x-served-by-pod is in already
            await send({"type": "http.response.start", "status": code, "headers": headers})
            await send({"type": "http.response.body", "body": data})
            return
        await send_error(send, UpstreamError(f"pod {last_pod!r} failed: {last.message}", code=f"upstream_{last.kind}"))

    async def _hold(
        self, receive: Receive, send: Send, fields: Routing, group: str, request_id: str
    ) -> tuple[Send, str] | None:
        """Hold a request whose group no device serves yet (gpufleet.router.scale_wait). Then: where its
        answer goes (a stream may have started) and its group, looked up again (the model may have gone
        meanwhile); or None once it is answered, or its client gone."""
        assert self.waits is not None

        def blocked() -> bool:
            return self.state.models.get(fields.model) == group and holds(self.decider.peek(group), None, None)

        result = await self.waits.hold(
            group, fields.n, stream=fields.stream, blocked=blocked, receive=receive, send=send, request_id=request_id
        )
        if result.gone:
            return None
        error = result.error
        if error is None:
            try:
                group = self.decider.group_of(fields.model)
            except GpufleetError as exc:
                error = exc
        if error is not None:
            await send_error(result.send, error)  # an error event when the stream has started
            return None
        return result.send, group

    def _for_pod(
        self, body: bytes, doc: dict[str, Any], fields: Routing, lease: str | None, choice: DeviceState,
        status: PodStatus | None,
    ) -> tuple[bytes, list[tuple[bytes, bytes]]]:
        """The body and the headers for the pod: the client's bytes, the decisions in headers."""
        exclusive = fields.exclusive_gpu
        # Pinned to the chosen device when the client named it, when it is leased, and on a pod
        # with a leased device (there the pod's own choice could land on the leased one).
        pin = (
            lease is not None
            or (exclusive is not None and names_one_device(exclusive, choice))
            or self.state.pod_has_lease(choice.pod)
        )
        # "team-a/chat" is "chat" to the pod server (it knows only its namespace's ids).
        local = self.state.local_models.get(fields.model)
        model = local if local is not None and local != fields.model else None
        headers = [*self.config.pod_headers, (_ROUTED_DEVICE, choice.device.encode())]
        if pin:
            headers.append((_EXCLUSIVE_DEVICE, choice.device.encode()))
        if model is not None:
            headers.append((_MODEL, model.encode()))
        routed_fields = exclusive is not None or fields.lease is not None
        if reads_routing_headers(status) or not (pin or model is not None or routed_fields):
            return body, headers
        return pod_body(doc, choice.device if pin else None, model), headers

    async def _forward(
        self, base_url: str, path: str, payload: bytes, headers: list[tuple[bytes, bytes]], stream: bool,
        ticket: Ticket, receive: Receive, send: Send, started: float,
    ) -> bool:
        """Relay one attempt; True when the pod answered 200 in full. Raises _Retryable before the first byte."""
        try:
            response = await self.pool.request(base_url, path, headers, payload)
        except UpstreamConnectionError as exc:
            kind = "first_byte_timeout" if exc.timeout else ("connect" if exc.connect else "read")
            raise _Retryable(kind, str(exc)) from None
        try:
            return await self._relay(response, stream, ticket, receive, send, started, path)
        finally:
            response.release()

    async def _relay(
        self, response: UpstreamResponse, stream: bool, ticket: Ticket, receive: Receive, send: Send, started: float,
        endpoint: str,
    ) -> bool:
        status = response.status
        out = [(k, v) for k, v in response.headers if k not in _DROP]
        out.append((b"x-served-by-pod", ticket.pod.encode()))
        if status in RETRY_STATUSES:
            try:
                data = await response.read_all()
            except UpstreamConnectionError:
                data = b""
            raise _Retryable(
                f"status_{status}", f"pod answered {status}", response=(status, out, data),
                failure=status in FAILURE_STATUSES,
            )
        load = response.header(LOAD_HEADER_BYTES)
        report = parse_load(load.decode("latin-1")) if load else None
        if report is not None:
            self.state.observe_load(ticket.pod, report)
        device = response.header(b"x-served-by-device")
        self.state.served(ticket, device.decode() if device else None, response.header(b"x-group-switch") == b"true")
        sse = stream and status == 200 and (response.header(b"content-type") or b"").startswith(b"text/event-stream")
        if not sse:
            try:
                data = await response.read_all()
            except UpstreamConnectionError as exc:
                raise _Retryable("read", str(exc)) from None
            out.append((b"content-length", str(len(data)).encode()))
            await send({"type": "http.response.start", "status": status, "headers": out})
            await send({"type": "http.response.body", "body": data})
            return status == 200
        try:
            first = await response.next_chunk()
        except UpstreamConnectionError as exc:
            raise _Retryable("read", str(exc)) from None
        await send({"type": "http.response.start", "status": status, "headers": out})
        self.metrics.first_byte(endpoint, time.perf_counter() - started)
        if first is None:
            await send({"type": "http.response.body", "body": b""})
            return True
        await send({"type": "http.response.body", "body": first, "more_body": True})
        return await self._pump(response, ticket, receive, send)

    async def _pump(self, response: UpstreamResponse, ticket: Ticket, receive: Receive, send: Send) -> bool:
        """Forward each chunk the moment it arrives; a pod failing mid-stream ends it with an error event.
        True when the stream ran to its end."""
        gone = asyncio.ensure_future(_wait_disconnect(receive))
        tail = b""
        complete = False
        try:
            while not gone.done():
                try:
                    chunk = await response.next_chunk()
                except UpstreamConnectionError as exc:
                    kind = "idle_timeout" if exc.timeout else "stream_broken"
                    self.metrics.upstream_failure(ticket.pod, kind)
                    self.state.failed(ticket.pod, f"mid-stream: {exc}")
                    log.warning("stream from pod broke", extra={"pod": ticket.pod, "kind": kind})
                    tail = sse_error(UpstreamError(f"pod {ticket.pod!r} failed mid-stream ({kind})"))
                    break
                if chunk is None:
                    complete = True
                    break
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": tail, "more_body": False})
        finally:
            gone.cancel()
        return complete
