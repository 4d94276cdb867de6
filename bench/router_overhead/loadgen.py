"""A lean HTTP/1.1 load generator on raw asyncio streams (keep-alive, one connection per
concurrent client), so the client's own cost stays small next to what it measures.

For SSE answers it records when each event arrived and the backend's send time ``"t"``
carried inside it (both ``time.monotonic()``, one clock for every process on Linux).
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass, field

_T = re.compile(rb'"t":([0-9.]+)')


@dataclass
class Sample:
    latency_s: float
    status: int
    chunk_delays_s: list[float] = field(default_factory=list)  # arrival - sent, per event
    chunk_gaps_s: list[float] = field(default_factory=list)  # arrival gap minus send gap, per event


class Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, host: str, port: int) -> Connection:
        reader, writer = await asyncio.open_connection(host, port)
        return cls(reader, writer)

    def close(self) -> None:
        self.writer.close()

    async def request(self, path: str, body: bytes, host: str) -> Sample:
        head = (
            f"POST {path} HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\n\r\n"
        ).encode()
        started = time.monotonic()
        self.writer.write(head + body)
        status_line = await self.reader.readline()
        status = int(status_line.split(b" ", 2)[1])
        length = -1
        chunked = False
        while True:
            line = await self.reader.readline()
            if line in (b"\r\n", b""):
                break
            key, _, value = line.partition(b":")
            key = key.strip().lower()
            if key == b"content-length":
                length = int(value.strip())
            elif key == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
        sample = Sample(0.0, status)
        if chunked:
            await self._read_chunked(sample)
        elif length >= 0:
            await self.reader.readexactly(length)
        sample.latency_s = time.monotonic() - started
        return sample

    async def _read_chunked(self, sample: Sample) -> None:
        pending = b""
        last_arrival: float | None = None
        last_sent: float | None = None
        while True:
            size = int((await self.reader.readline()).strip().split(b";")[0], 16)
            if size == 0:
                await self.reader.readline()
                return
            data = await self.reader.readexactly(size + 2)
            arrived = time.monotonic()
            pending += data[:-2]
            while b"\n\n" in pending:
                event, pending = pending.split(b"\n\n", 1)
                m = _T.search(event)
                if m is None:
                    continue
                sent = float(m.group(1))
                sample.chunk_delays_s.append(arrived - sent)
                if last_arrival is not None and last_sent is not None:
                    sample.chunk_gaps_s.append((arrived - last_arrival) - (sent - last_sent))
                last_arrival, last_sent = arrived, sent


async def run_load(
    host: str, port: int, path: str, body: bytes, concurrency: int, duration_s: float, max_requests: int
) -> tuple[list[Sample], float]:
    """``concurrency`` clients each send requests back to back until the time or count runs out."""
    conns = [await Connection.open(host, port) for _ in range(concurrency)]
    samples: list[Sample] = []
    deadline = time.monotonic() + duration_s
    per_client = max(1, max_requests // concurrency)
    hostname = f"{host}:{port}"

    async def client(conn: Connection) -> None:
        for _ in range(per_client):
            if time.monotonic() >= deadline:
                return
            samples.append(await conn.request(path, body, hostname))

    started = time.monotonic()
    try:
        await asyncio.gather(*(client(c) for c in conns))
    finally:
        for c in conns:
            c.close()
    return samples, time.monotonic() - started
