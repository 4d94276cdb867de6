"""The proxy's upstream: the interface (``Upstream``, ``UpstreamResponse``, ``UpstreamError``) and its
HTTP implementation, ``UpstreamPool``, a thin adapter over one ``aiohttp.ClientSession``.
Everything the router sends to pods goes through ``Upstream.request``: forwarded requests, polls
(``get_json``) and the fleet API's fan-out. ``gpufleet.router.mock_upstream`` implements the same
interface in-process, for tests of forwarding, retries, failover, ejection and SSE relaying.

One keep-alive pool for all pods (``TCPConnector``; idle connections are dropped after
``keepalive_s``, UPSTREAM_KEEPALIVE_S, well below the pods' own KEEP_ALIVE_S, so the pool never
reuses a connection the pod is closing). Bodies go out as raw bytes and come
back as raw bytes: no compression negotiated, no decompression, no cookies, no default
``User-Agent``/``Accept`` headers. Body chunks are handed over the moment they arrive
(``readany``), never batched to a fixed size. aiohttp sets TCP_NODELAY on every connection.

Timeouts use aiohttp's per-socket read timer, so there is no extra timer per request or per
chunk: ``sock_read`` is the first-byte timeout until the answer's headers are in, then the
connection's read timeout is switched to the idle timeout for the body. Both fail with
``UpstreamError(timeout=True)``. Failing to connect is ``UpstreamError(connect=True)``.

A request whose connection is dropped before any answer came back is retried once: a
pooled connection the pod had just closed is the keep-alive race, not a pod failure
(aiohttp itself retries that only for idempotent methods, and the proxy POSTs). aiohttp
does not say whether the connection was a pooled one, so a fresh connection dropped
before answering is retried once too.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, Protocol

import aiohttp
from yarl import URL

KEEPALIVE_S = 30.0

_CONNECT_ERRORS = (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError)
_DROPPED = (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)  # before any answer: the keep-alive race
_SKIP_HEADERS = frozenset({"User-Agent", "Accept", "Accept-Encoding", "Content-Type"})


class UpstreamError(Exception):
    """The exchange failed: before connecting (``connect``), by a timeout, or the connection broke."""

    def __init__(self, message: str, *, connect: bool = False, timeout: bool = False) -> None:
        super().__init__(message)
        self.connect = connect
        self.timeout = timeout


Headers = list[tuple[bytes, bytes]]


class UpstreamResponse(Protocol):
    """The answer to one request: its status and headers (names in lower case) once it started;
    read its body with ``next_chunk`` until it returns None (or ``read_all``), then ``release``.
    Both reads raise ``UpstreamError`` (``timeout=True`` when the idle timeout ran out)."""

    status: int
    headers: Headers

    def header(self, name: bytes) -> bytes | None: ...

    async def next_chunk(self) -> bytes | None: ...

    async def read_all(self) -> bytes: ...

    def release(self) -> None: ...


class Upstream(Protocol):
    """Where the router's requests to pods go."""

    async def request(
        self, base_url: str, path: str, headers: Headers, body: bytes, method: bytes = b"POST"
    ) -> UpstreamResponse:
        """Send a request and return once the answer's head is in; raises ``UpstreamError``
        (``connect=True``: nothing reached the pod; ``timeout=True``: no answer in the first-byte timeout)."""
        ...

    async def close(self) -> None: ...


def first_header(headers: Headers, name: bytes) -> bytes | None:
    for k, v in headers:
        if k == name:
            return v
    return None


async def get_json(upstream: Upstream, base_url: str, path: str, headers: Headers, timeout_s: float) -> Any:
    """GET a JSON document within ``timeout_s``; raises UpstreamError, TimeoutError or ValueError."""
    async with asyncio.timeout(timeout_s):
        response = await upstream.request(base_url, path, headers, b"", b"GET")
        try:
            data = await response.read_all()
        finally:
            response.release()
    if response.status != 200:
        raise UpstreamError(f"GET {path} answered {response.status}")
    return json.loads(data)


class AiohttpResponse:
    """``UpstreamResponse`` over an aiohttp answer."""

    __slots__ = ("_idle_s", "_resp", "headers", "status")

    def __init__(self, resp: aiohttp.ClientResponse, idle_s: float) -> None:
        self._resp = resp
        self._idle_s = idle_s
        self.status = resp.status
        self.headers = [(k.lower(), v) for k, v in resp.raw_headers]

    def header(self, name: bytes) -> bytes | None:
        return first_header(self.headers, name)

    def _error(self, exc: BaseException) -> UpstreamError:
        if isinstance(exc, TimeoutError):  # aiohttp's SocketTimeoutError: the idle timer fired
            return UpstreamError(f"no data for {self._idle_s:g}s", timeout=True)
        return UpstreamError(f"connection to pod broke: {exc!r}")

    async def next_chunk(self) -> bytes | None:
        """The next piece of body as it arrived (None at the end); raises UpstreamError."""
        try:
            chunk = await self._resp.content.readany()
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise self._error(exc) from None
        return chunk or None

    async def read_all(self) -> bytes:
        try:
            return await self._resp.read()
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise self._error(exc) from None

    def release(self) -> None:
        """Done with this answer: the connection goes back to the pool if the body was read in full, else closes."""
        resp = self._resp
        if resp.content.is_eof():
            resp.release()
        else:
            resp.close()


class UpstreamPool:
    """``Upstream`` over HTTP/1.1: one aiohttp keep-alive pool for every pod."""

    def __init__(
        self,
        *,
        connect_timeout_s: float,
        first_byte_s: float = 300.0,
        idle_s: float = 60.0,
        keepalive_s: float = KEEPALIVE_S,
    ) -> None:
        self.connect_timeout_s = connect_timeout_s
        self.keepalive_s = keepalive_s
        self.first_byte_s = first_byte_s
        self.idle_s = idle_s
        self._timeout = aiohttp.ClientTimeout(total=None, connect=connect_timeout_s, sock_read=first_byte_s)
        self._session: aiohttp.ClientSession | None = None
        self._urls: dict[tuple[str, str], URL] = {}

    def _open(self) -> aiohttp.ClientSession:
        """The session, made on first use (it needs the running loop)."""
        if self._session is None:
            connector = aiohttp.TCPConnector(
                limit=0,  # no cap, as before: pods bound their own queues and answer 429 when full
                limit_per_host=0,
                keepalive_timeout=self.keepalive_s,
                enable_cleanup_closed=True,
                force_close=False,
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=self._timeout,
                auto_decompress=False,
                skip_auto_headers=_SKIP_HEADERS,
                cookie_jar=aiohttp.DummyCookieJar(),
            )
        return self._session

    def _url(self, base_url: str, path: str) -> URL:
        url = self._urls.get((base_url, path))
        if url is None:
            if not base_url.startswith("http://"):
                raise UpstreamError(f"only http:// pod URLs are supported, not {base_url!r}", connect=True)
            url = self._urls[(base_url, path)] = URL(base_url.rstrip("/") + path)
        return url

    async def request(
        self, base_url: str, path: str, headers: Headers, body: bytes, method: bytes = b"POST"
    ) -> AiohttpResponse:
        """Send a request and wait for the answer's headers (the caller bounds the wait)."""
        session = self._open()
        url = self._url(base_url, path)
        sent = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in headers]
        for attempt in (0, 1):
            try:
                resp = await session.request(method.decode(), url, headers=sent, data=body or None)
            except _CONNECT_ERRORS as exc:
                raise UpstreamError(f"connect to {url.host}:{url.port} failed: {exc}", connect=True) from None
            except TimeoutError:  # aiohttp's SocketTimeoutError: sock_read ran out before the headers
                raise UpstreamError(f"no answer within {self.first_byte_s:g}s", timeout=True) from None
            except _DROPPED as exc:
                if attempt == 0:
                    continue  # a pooled connection the pod had just closed: try a fresh one
                raise UpstreamError(f"connection closed by pod: {exc!r}") from None
            except aiohttp.ClientError as exc:
                raise UpstreamError(f"bad answer from pod: {exc!r}") from None
            protocol = resp.connection.protocol if resp.connection is not None else None
            if protocol is not None:  # the body gets the idle timeout, counted from the headers
                protocol.read_timeout = self.idle_s
                protocol.start_timeout()
            return AiohttpResponse(resp, self.idle_s)
        raise AssertionError("unreachable")

    async def close(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()
