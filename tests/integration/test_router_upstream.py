"""The proxy's upstream client (aiohttp) against tiny in-process servers on loopback."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from gpufleet.router.upstream import UpstreamError, UpstreamPool
from tests.support.processes import free_port

pytestmark = pytest.mark.integration

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
OK = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\nx-served-by-device: cpu:0\r\n\r\n{}"


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    lengths = [int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")]
    return head + await reader.readexactly(lengths[0] if lengths else 0)


class Server:
    """A loopback server whose connections are all closed when it stops (no leaked sockets)."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.writers: list[asyncio.StreamWriter] = []
        self.tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> str:
        async def wrapped(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.writers.append(writer)
            task = asyncio.current_task()
            assert task is not None
            self.tasks.append(task)  # type: ignore[arg-type]
            await self.handler(reader, writer)

        self.server = await asyncio.start_server(wrapped, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for w in self.writers:
            w.close()
        await self.server.wait_closed()
        await asyncio.sleep(0.01)  # let the closed transports finish


async def test_keep_alive_reuses_one_connection() -> None:
    connections = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        while not reader.at_eof():
            try:
                request = await read_request(reader)
            except asyncio.IncompleteReadError:
                return
            assert request.startswith(b"POST /v1/x HTTP/1.1\r\n") and request.endswith(b'{"a":1}')
            writer.write(OK)

    pool = UpstreamPool(connect_timeout_s=1)
    async with Server(handler) as url:
        for _ in range(3):
            r = await pool.request(url, "/v1/x", [(b"x-request-id", b"r")], b'{"a":1}')
            assert r.status == 200 and r.header(b"x-served-by-device") == b"cpu:0"
            assert await r.read_all() == b"{}"
            r.release()
        assert connections == 1
        await pool.close()


async def test_a_keep_alive_connection_closed_by_the_pod_is_retried_fresh() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(OK)
        await writer.drain()
        writer.close()  # the pod drops the connection right after answering

    pool = UpstreamPool(connect_timeout_s=1)
    async with Server(handler) as url:
        for _ in range(2):
            r = await pool.request(url, "/", [], b"")
            assert await r.read_all() == b"{}"
            r.release()
        await pool.close()


async def test_refused_connection_is_a_connect_error() -> None:
    pool = UpstreamPool(connect_timeout_s=1)
    with pytest.raises(UpstreamError) as info:
        await pool.request(f"http://127.0.0.1:{free_port()}", "/", [], b"")
    assert info.value.connect
    await pool.close()
    await asyncio.sleep(0.01)


async def test_first_byte_and_idle_timeouts() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await asyncio.sleep(5)

    async def stalls_mid_stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n")
        await asyncio.sleep(5)

    pool = UpstreamPool(connect_timeout_s=1, first_byte_s=0.2, idle_s=0.2)
    async with Server(silent) as url:
        with pytest.raises(UpstreamError) as info:
            await pool.request(url, "/", [], b"")
        assert info.value.timeout and "no answer" in str(info.value)
    await pool.close()
    pool = UpstreamPool(connect_timeout_s=1, first_byte_s=30, idle_s=0.2)  # the body gets the idle timeout
    async with Server(stalls_mid_stream) as url:
        r = await pool.request(url, "/", [], b"")
        assert await r.next_chunk() == b"hello"
        with pytest.raises(UpstreamError) as info:
            await r.next_chunk()
        assert info.value.timeout and "no data" in str(info.value)
        r.release()
        await pool.close()


async def test_chunks_are_handed_over_as_they_arrive() -> None:
    step = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
        writer.write(b"7\r\ndata: 1\r\n")
        await step.wait()
        writer.write(b"7\r\ndata: 2\r\n0\r\n\r\n")

    pool = UpstreamPool(connect_timeout_s=1)
    async with Server(handler) as url:
        r = await pool.request(url, "/", [], b"")
        assert await r.next_chunk() == b"data: 1"  # before the server has even written the second
        step.set()
        assert await r.next_chunk() == b"data: 2"
        assert await r.next_chunk() is None
        r.release()
        await pool.close()
