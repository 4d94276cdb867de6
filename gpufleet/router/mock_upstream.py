"""An in-process ``Upstream`` for tests, in the spirit of httpx's ``MockTransport``: a function answers.

    async def pods(request: MockRequest) -> MockResponse:
        if request.base_url == "http://pod-a":
            raise UpstreamError("refused", connect=True)  # a dead pod
        return MockResponse(200, [(b"content-type", b"application/json")], b"{}")

    app = create_app(settings, discovery=..., upstream=MockUpstream(pods))

The handler may raise ``UpstreamError`` (nothing reached the pod, or no first byte in time) or return
a ``MockResponse``, whose body is bytes or chunks: a sequence, or an async iterator (the test then
decides when each chunk arrives). An ``UpstreamError`` among the chunks fails the read there: a pod
dying mid-stream, or silent past the idle timeout (``timeout=True``). Every request is kept in
``requests`` with the bytes sent, so a test sees exactly what reached the pod; every response
remembers whether the router released it.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from gpufleet.router.upstream import Headers, UpstreamError, first_header

Chunk = bytes | UpstreamError


@dataclass(frozen=True)
class MockRequest:
    base_url: str
    path: str
    method: bytes
    headers: Headers
    body: bytes

    def header(self, name: bytes) -> bytes | None:
        return first_header(self.headers, name)

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class MockResponse:
    """One answer (make a new one per request). ``headers`` may use any case; the router sees lower case."""

    status: int = 200
    headers: Headers = field(default_factory=list)
    body: bytes | Iterable[Chunk] | AsyncIterator[Chunk] = b""
    released: bool = field(default=False, init=False)
    _chunks: AsyncIterator[Chunk] | None = field(default=None, init=False, repr=False)

    @classmethod
    def json(cls, doc: Any, status: int = 200, headers: Iterable[tuple[bytes, bytes]] = ()) -> MockResponse:
        return cls(status, [(b"content-type", b"application/json"), *headers], json.dumps(doc).encode())

    @classmethod
    def sse(
        cls, events: Iterable[Chunk] | AsyncIterator[Chunk], headers: Iterable[tuple[bytes, bytes]] = ()
    ) -> MockResponse:
        return cls(200, [(b"content-type", b"text/event-stream"), *headers], events)

    def header(self, name: bytes) -> bytes | None:
        return first_header(self.headers, name)

    async def next_chunk(self) -> bytes | None:
        if self._chunks is None:
            self._chunks = _chunks(self.body)
        try:
            chunk = await anext(self._chunks)
        except StopAsyncIteration:
            return None
        if isinstance(chunk, UpstreamError):
            raise chunk
        return chunk or None

    async def read_all(self) -> bytes:
        parts = []
        while (chunk := await self.next_chunk()) is not None:
            parts.append(chunk)
        return b"".join(parts)

    def release(self) -> None:
        self.released = True


async def _chunks(body: bytes | Iterable[Chunk] | AsyncIterator[Chunk]) -> AsyncIterator[Chunk]:
    if isinstance(body, bytes):
        if body:
            yield body
    elif isinstance(body, AsyncIterator):
        async for chunk in body:
            yield chunk
    else:
        for chunk in body:
            yield chunk


Handler = Callable[[MockRequest], Awaitable[MockResponse]]


class MockUpstream:
    """``Upstream`` answered by ``handler`` in this event loop; no sockets."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.requests: list[MockRequest] = []
        self.responses: list[MockResponse] = []
        self.closed = False

    async def request(
        self, base_url: str, path: str, headers: Headers, body: bytes, method: bytes = b"POST"
    ) -> MockResponse:
        request = MockRequest(base_url, path, method, [(k.lower(), v) for k, v in headers], body)
        self.requests.append(request)
        response = await self.handler(request)
        response.headers = [(k.lower(), v) for k, v in response.headers]
        self.responses.append(response)
        return response

    async def close(self) -> None:
        self.closed = True
