"""HTTP load for the benchmarks: open-loop trace replays and closed-loop throughput runs."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from bench.sweep import Record
from bench.trace import Request


@dataclass
class Outcome:
    index: int
    status: int  # HTTP status, or 0 on a transport error
    latency_s: float
    completion_tokens: int = 0
    error: str | None = None
    retry_after: str | None = None  # the Retry-After header of a refusal, if it had one


def chat_body(model: str, max_tokens: int) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": "Tell me about GPU fleets."}],
        "max_tokens": max_tokens,
        "temperature": 0,
    }


async def _one(http: httpx.AsyncClient, url: str, index: int, model: str, tokens: int) -> Outcome:
    started = time.perf_counter()
    try:
        r = await http.post(url + "/v1/chat/completions", json=chat_body(model, tokens))
        lat = time.perf_counter() - started
        if r.status_code != 200:
            return Outcome(index, r.status_code, lat, error=r.text[:200], retry_after=r.headers.get("retry-after"))
        usage = r.json().get("usage") or {}
        return Outcome(index, 200, lat, int(usage.get("completion_tokens", 0)))
    except httpx.HTTPError as exc:
        return Outcome(index, 0, time.perf_counter() - started, error=f"{type(exc).__name__}: {exc}")


def client(timeout_s: float = 300.0) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        timeout=timeout_s, trust_env=False, limits=httpx.Limits(max_connections=512, max_keepalive_connections=64)
    )


async def replay(url: str, trace: Sequence[Request], model_of: Callable[[str], str]) -> list[Outcome]:
    """Send each request at its arrival time (open loop); returns outcomes in trace order."""
    async with client() as http:
        start = time.perf_counter()
        tasks = []
        for r in trace:
            delay = start + r.t - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(_one(http, url, r.index, model_of(r.group), r.tokens)))
        return list(await asyncio.gather(*tasks))


async def sequential(url: str, model: str, tokens: Sequence[int]) -> list[Outcome]:
    async with client() as http:
        return [await _one(http, url, i, model, t) for i, t in enumerate(tokens)]


@dataclass
class Throughput:
    requests: int
    errors: int
    seconds: float
    completion_tokens: int
    latencies: list[float]
    all_ok: int = 0  # completed requests including the warm-up

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / self.seconds


async def closed_loop(
    url: str, model: str, *, concurrency: int, seconds: float, warmup_s: float, max_tokens: int
) -> Throughput:
    """``concurrency`` clients each sending back to back; counts what completes in the window."""
    stop_at = time.perf_counter() + warmup_s + seconds
    window_start = time.perf_counter() + warmup_s
    done: list[Outcome] = []
    ends: list[float] = []

    async def worker(http: httpx.AsyncClient, w: int) -> None:
        i = 0
        while time.perf_counter() < stop_at:
            o = await _one(http, url, w * 1_000_000 + i, model, max_tokens)
            i += 1
            done.append(o)
            ends.append(time.perf_counter())

    async with client() as http:
        await asyncio.gather(*(worker(http, w) for w in range(concurrency)))
    window = [(o, e) for o, e in zip(done, ends, strict=True) if window_start <= e <= stop_at]
    ok = [o for o, _ in window if o.status == 200]
    return Throughput(
        requests=len(ok),
        errors=len(window) - len(ok),
        seconds=seconds,
        completion_tokens=sum(o.completion_tokens for o in ok),
        latencies=[o.latency_s for o in ok],
        all_ok=sum(1 for o in done if o.status == 200),
    )


def run(coro: Any) -> Any:
    return asyncio.run(coro)


# --- streaming chat, closed loop: the concurrency sweep of bench/throughput.py -----------------


def stream_body(model: str, max_tokens: int) -> dict[str, Any]:
    return {**chat_body(model, max_tokens), "stream": True, "stream_options": {"include_usage": True}}


async def stream_chat(
    session: Any, url: str, model: str, max_tokens: int, extra: Mapping[str, Any] | None = None
) -> Record:
    """One streaming chat request: client-side time to the first generated text, and the
    completion tokens from the usage chunk the server sends last (not a count of chunks)."""
    import aiohttp

    sent = time.perf_counter()
    first: float | None = None
    tokens: int | None = None
    try:
        body = {**stream_body(model, max_tokens), **(extra or {})}
        async with session.post(url + "/v1/chat/completions", json=body) as r:
            if r.status != 200:
                text = await r.text()
                return Record(sent, None, time.perf_counter(), 0, ok=False, error=f"HTTP {r.status}: {text[:200]}")
            async for line in r.content:
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                doc = json.loads(data)
                if "error" in doc:
                    err = str(doc["error"])[:200]
                    return Record(sent, first, time.perf_counter(), 0, ok=False, error=f"stream error: {err}")
                if first is None:
                    for ch in doc.get("choices") or ():
                        if (ch.get("delta") or {}).get("content") or ch.get("text") or ch.get("finish_reason"):
                            first = time.perf_counter()
                            break
                usage = doc.get("usage")
                if usage:
                    tokens = int(usage.get("completion_tokens", 0))
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        return Record(sent, first, time.perf_counter(), 0, ok=False, error=f"{type(exc).__name__}: {exc}")
    done = time.perf_counter()
    if tokens is None:
        return Record(sent, first, done, 0, ok=False, error="no usage chunk (stream_options.include_usage)")
    return Record(sent, first, done, tokens)


async def closed_loop_stream(
    url: str,
    model: str,
    *,
    concurrency: int,
    max_tokens: int,
    stop_at: float,
    max_requests: int,
    drain_timeout_s: float = 60.0,
    extra: Mapping[str, Any] | None = None,
) -> list[Record]:
    """``concurrency`` streaming clients sending back to back until ``stop_at``
    (time.perf_counter) or ``max_requests`` sent in all; those in flight then finish, for at
    most ``drain_timeout_s`` more (what is still running then is dropped, not counted)."""
    import aiohttp

    records: list[Record] = []
    sent = [0]

    async def client(session: Any) -> None:
        while time.perf_counter() < stop_at and sent[0] < max_requests:
            sent[0] += 1
            records.append(await stream_chat(session, url, model, max_tokens, extra))

    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=stop_at - time.perf_counter() + drain_timeout_s)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        tasks = [asyncio.create_task(client(session)) for _ in range(concurrency)]
        _, pending = await asyncio.wait(tasks, timeout=stop_at - time.perf_counter() + drain_timeout_s)
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    return records
