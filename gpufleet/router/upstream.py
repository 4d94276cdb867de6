"""A lean HTTP/1.1 client for the proxy hot path: keep-alive pool, raw bytes in and out.

httpx costs milliseconds per request on a small shared CPU; the proxy needs well under one.
This client does only what forwarding needs: write one request (headers and body in one
``write``, TCP_NODELAY on), parse the answer with ``httptools`` (C), and hand body chunks
to the caller the moment they arrive. First-byte and idle timeouts are enforced by one
sweeper task for all answers in flight (a timer per request or per chunk costs more than
the forwarding itself); it fails a late answer with ``UpstreamError(timeout=True)``.

Idle connections are kept per pod for less than the pod server's own keep-alive (uvicorn
closes after 5 s), and one that fails before any byte of the answer came back is retried
once on a fresh connection: that is the keep-alive race, not a pod failure.
"""

from __future__ import annotations

import asyncio
import collections
import json
import socket
import time
from typing import Any
from urllib.parse import urlsplit

import httptools

KEEPALIVE_S = 4.0
HIGH_WATER = 1 << 20  # pause reading from the pod past this much unread body


class UpstreamError(Exception):
    """The exchange failed: before connecting (``connect``), by a timeout, or the connection broke."""

    def __init__(self, message: str, *, connect: bool = False, timeout: bool = False) -> None:
        super().__init__(message)
        self.connect = connect
        self.timeout = timeout


class _Conn(asyncio.Protocol):
    def __init__(self, pool: UpstreamPool, key: tuple[str, int]) -> None:
        self.pool = pool
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.response: UpstreamResponse | None = None
        self.idle_since = 0.0
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        response = self.response
        if response is None:  # the pod spoke out of turn: the connection is unusable
            self.close()
            return
        response.last_activity = time.monotonic()
        try:
            response.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            response._fail(UpstreamError(f"bad HTTP from pod: {exc}"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.transport = None
        if self.response is not None:
            self.response._fail(UpstreamError(f"connection closed by pod{f': {exc}' if exc else ''}"))
            self.response = None

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class UpstreamResponse:
    """The answer to one request; read it with ``next_chunk`` until it returns None, then ``release``."""

    def __init__(self, conn: _Conn) -> None:
        self.conn = conn
        self.parser = httptools.HttpResponseParser(self)
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.got_bytes = False
        self.started = self.last_activity = time.monotonic()
        self._headers_done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._waiter: asyncio.Future[None] | None = None
        self._complete = False
        self._error: UpstreamError | None = None
        self._paused = False
        self.keep_alive = False

    # httptools callbacks
    def on_message_begin(self) -> None:
        self.got_bytes = True

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.keep_alive = self.parser.should_keep_alive()  # httptools forgets it once the message completes
        if not self._headers_done.done():
            self._headers_done.set_result(None)

    def on_body(self, body: bytes) -> None:
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > HIGH_WATER and self.conn.transport is not None and not self._paused:
            self._paused = True
            self.conn.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        self._complete = True
        self._wake()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _fail(self, error: UpstreamError) -> None:
        if self._complete or self._error is not None:
            return
        self._error = error
        if not self._headers_done.done():
            self._headers_done.set_exception(error)
            self._headers_done.exception()  # retrieved: a caller that timed out must not log it
        self._wake()

    def _timeout(self, message: str) -> None:
        self._fail(UpstreamError(message, timeout=True))
        self.conn.close()

    @property
    def waiting_on_pod(self) -> bool:
        """Data is expected and nothing holds it back on our side."""
        return not self._complete and self._error is None and not self._paused

    async def wait_headers(self) -> None:
        await self._headers_done

    def header(self, name: bytes) -> bytes | None:
        for k, v in self.headers:
            if k == name:
                return v
        return None

    async def next_chunk(self) -> bytes | None:
        """The next piece of body as it arrived (None at the end); raises UpstreamError."""
        while True:
            if self._chunks:
                chunk = self._chunks.popleft()
                self._buffered -= len(chunk)
                if self._paused and self._buffered < HIGH_WATER // 2 and self.conn.transport is not None:
                    self._paused = False
                    self.conn.transport.resume_reading()
                return chunk
            if self._complete:
                return None
            if self._error is not None:
                raise self._error
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    @property
    def complete(self) -> bool:
        return self._complete

    def take_all(self) -> bytes:
        """The whole body, once ``complete``."""
        data = b"".join(self._chunks)
        self._chunks.clear()
        self._buffered = 0
        return data

    async def read_all(self) -> bytes:
        parts = []
        while (chunk := await self.next_chunk()) is not None:
            parts.append(chunk)
        return b"".join(parts)

    def release(self) -> None:
        """Done with this answer: keep the connection if it is reusable, else close it."""
        conn = self.conn
        conn.pool._active.discard(self)
        if conn.response is self:
            conn.response = None
        if self._complete and self._error is None and self.keep_alive and not conn.closed:
            conn.pool._idle(conn)
        else:
            conn.close()


class UpstreamPool:
    def __init__(
        self,
        *,
        connect_timeout_s: float,
        first_byte_s: float = 300.0,
        idle_s: float = 60.0,
        max_idle_per_pod: int = 256,
    ) -> None:
        self.connect_timeout_s = connect_timeout_s
        self.first_byte_s = first_byte_s
        self.idle_s = idle_s
        self.sweep_s = max(0.05, min(0.5, first_byte_s / 4, idle_s / 4))
        self.max_idle_per_pod = max_idle_per_pod
        self._idle_conns: dict[tuple[str, int], collections.deque[_Conn]] = {}
        self._targets: dict[str, tuple[str, int, bytes]] = {}
        self._active: set[UpstreamResponse] = set()
        self._sweeper: asyncio.Task[None] | None = None

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(self.sweep_s)
            now = time.monotonic()
            for r in list(self._active):
                if not r._headers_done.done():
                    if now - r.started > self.first_byte_s:
                        r._timeout(f"no answer within {self.first_byte_s:g}s")
                elif r.waiting_on_pod and now - r.last_activity > self.idle_s:
                    r._timeout(f"no data for {self.idle_s:g}s")

    def _target(self, base_url: str) -> tuple[str, int, bytes]:
        t = self._targets.get(base_url)
        if t is None:
            parts = urlsplit(base_url)
            host = parts.hostname or "127.0.0.1"
            port = parts.port or (443 if parts.scheme == "https" else 80)
            if parts.scheme != "http":
                raise UpstreamError(f"only http:// pod URLs are supported, not {base_url!r}", connect=True)
            t = self._targets[base_url] = (host, port, (parts.netloc or host).encode())
        return t

    def _idle(self, conn: _Conn) -> None:
        conn.idle_since = time.monotonic()
        idle = self._idle_conns.setdefault(conn.key, collections.deque())
        if len(idle) >= self.max_idle_per_pod:
            conn.close()
            return
        idle.append(conn)

    def _take(self, key: tuple[str, int]) -> _Conn | None:
        idle = self._idle_conns.get(key)
        now = time.monotonic()
        while idle:
            conn = idle.pop()  # the most recently used is the likeliest to be alive
            if not conn.closed and now - conn.idle_since < KEEPALIVE_S:
                return conn
            conn.close()
        return None

    async def _connect(self, key: tuple[str, int]) -> _Conn:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                _, conn = await loop.create_connection(lambda: _Conn(self, key), key[0], key[1])
        except TimeoutError:
            raise UpstreamError(f"connect to {key[0]}:{key[1]} timed out", connect=True) from None
        except OSError as exc:
            raise UpstreamError(f"connect to {key[0]}:{key[1]} failed: {exc}", connect=True) from None
        return conn

    async def request(
        self, base_url: str, path: str, headers: list[tuple[bytes, bytes]], body: bytes, method: bytes = b"POST"
    ) -> UpstreamResponse:
        """Send a request and wait for the answer's headers (the caller bounds the wait)."""
        host, port, hostname = self._target(base_url)
        key = (host, port)
        head = [method, b" ", path.encode(), b" HTTP/1.1\r\nhost: ", hostname, b"\r\ncontent-length: ",
                str(len(body)).encode(), b"\r\n"]
        for k, v in headers:
            head += [k, b": ", v, b"\r\n"]
        head.append(b"\r\n")
        data = b"".join(head) + body
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep(), name="upstream-timeouts")
        for _ in range(2):
            conn = self._take(key)
            reused = conn is not None
            if conn is None:
                conn = await self._connect(key)
            response = UpstreamResponse(conn)
            conn.response = response
            self._active.add(response)
            assert conn.transport is not None
            conn.transport.write(data)
            try:
                await response.wait_headers()
            except UpstreamError as exc:
                self._active.discard(response)
                conn.close()
                if reused and not response.got_bytes and not exc.timeout:
                    continue  # a keep-alive connection the pod had just closed: try a fresh one
                raise
            except BaseException:
                self._active.discard(response)
                conn.close()  # cancelled: the connection is mid-answer, unusable
                raise
            return response
        raise UpstreamError("pod closed the connection twice before answering")

    async def get_json(self, base_url: str, path: str, headers: list[tuple[bytes, bytes]], timeout_s: float) -> Any:
        """GET a JSON document within ``timeout_s``; raises UpstreamError, TimeoutError or ValueError."""
        async with asyncio.timeout(timeout_s):
            response = await self.request(base_url, path, headers, b"", b"GET")
            try:
                data = await response.read_all()
            finally:
                response.release()
        if response.status != 200:
            raise UpstreamError(f"GET {path} answered {response.status}")
        return json.loads(data)

    def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for idle in self._idle_conns.values():
            for conn in idle:
                conn.close()
        self._idle_conns.clear()
