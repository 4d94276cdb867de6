"""HTTP load for the benchmarks: open-loop trace replays and closed-loop throughput runs."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from bench.trace import Request


@dataclass
class Outcome:
    index: int
    status: int  # HTTP status, or 0 on a transport error
    latency_s: float
    completion_tokens: int = 0
    error: str | None = None


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
            return Outcome(index, r.status_code, lat, error=r.text[:200])
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
