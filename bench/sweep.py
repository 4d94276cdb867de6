"""A concurrency sweep's arithmetic: what one closed-loop point measured, and the targets.

Pure functions over the per-request records every driver produces (HTTP streaming clients,
the in-process batch-1 loop, transformers' continuous-batching manager), so the served
targets and the baselines are summarised the same way.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from bench.common import percentile, rounded


@dataclass(frozen=True)
class Record:
    """One request of a closed-loop client, times in seconds on one monotonic clock."""

    sent: float
    first: float | None  # first generated token seen (client side); None if none came
    done: float
    tokens: int  # completion tokens, as the server reported them (usage) or the generator counted
    ok: bool = True
    error: str | None = None


def tokens_in_window(r: Record, start: float, end: float) -> float:
    """The share of ``r``'s tokens generated inside [start, end], spreading them evenly
    between its first token and its end (a request that straddles the window edge counts
    in part, so batches finishing in waves do not make the figure jump by a whole wave)."""
    if not r.ok or r.tokens <= 0:
        return 0.0
    t0 = r.first if r.first is not None else r.done
    t1 = r.done
    if t1 <= t0:  # every token at once
        return float(r.tokens) if start <= t1 <= end else 0.0
    overlap = max(0.0, min(end, t1) - max(start, t0))
    return r.tokens * overlap / (t1 - t0)


def summarize_point(records: Sequence[Record], start: float, end: float, concurrency: int) -> dict[str, Any]:
    """Aggregate tokens/s over the window and time to first token of requests sent in it."""
    seconds = end - start
    tokens = sum(tokens_in_window(r, start, end) for r in records)
    in_window = [r for r in records if start <= r.sent <= end]
    # Latencies of the requests sent inside the window; when a request outlasts the whole
    # window (none was sent in it), of every request of the point, and the point says so.
    population = in_window if any(r.ok for r in in_window) else list(records)
    ok = [r for r in population if r.ok]
    ttft = [r.first - r.sent for r in ok if r.first is not None]
    latency = [r.done - r.sent for r in ok]
    errors = [r for r in records if not r.ok and start <= r.done <= end + seconds]
    return {
        "concurrency": concurrency,
        "seconds": rounded(seconds, 3),
        "requests_sent_in_window": len(in_window),
        "requests_completed_in_window": sum(1 for r in records if r.ok and start <= r.done <= end),
        "errors": len(errors),
        "error_sample": next((r.error for r in errors if r.error), None),
        "completion_tokens_in_window": rounded(tokens, 1),
        "tokens_per_s": rounded(tokens / seconds if seconds > 0 else math.nan, 2),
        "mean_tokens_per_request": rounded(sum(r.tokens for r in ok) / len(ok), 2) if ok else None,
        "latency_of": "sent in window" if population is in_window else "all requests (none sent in window)",
        "p50_ttft_s": rounded(percentile(ttft, 50)),
        "p99_ttft_s": rounded(percentile(ttft, 99)),
        "p50_latency_s": rounded(percentile(latency, 50)),
        "p99_latency_s": rounded(percentile(latency, 99)),
    }


def add_ratios(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Set each point's ``vs_c1``: its tokens/s over the same line's figure at concurrency 1."""
    base = next((p.get("tokens_per_s") for p in points if p["concurrency"] == 1), None)
    for p in points:
        t = p.get("tokens_per_s")
        p["vs_c1"] = rounded(t / base, 3) if base and t is not None else None
    return points


@dataclass(frozen=True)
class Target:
    target: str
    figure: float | None
    limit: float
    met: bool

    def as_dict(self) -> dict[str, Any]:
        return {"target": self.target, "figure": self.figure, "limit": self.limit, "met": self.met}


def targets(
    lines: Mapping[str, Sequence[Mapping[str, Any]]],
    served: Iterable[str],
    *,
    at: int = 32,
    min_ratio: float = 8.0,
    max_p99_ttft_s: float = 2.0,
) -> list[Target]:
    """Issue 8's targets for each served line: tokens/s at ``at`` >= ``min_ratio`` x its own
    figure at concurrency 1, and p99 time to first token at ``at`` under ``max_p99_ttft_s``.
    A point that was not measured (or had no figure) is a missed target with no figure."""
    out: list[Target] = []
    for name in served:
        points = {p["concurrency"]: p for p in lines.get(name, [])}
        p = points.get(at, {})
        ratio = p.get("vs_c1")
        met = ratio is not None and ratio >= min_ratio
        out.append(Target(f"{name}: tokens/s at c={at} >= {min_ratio:g}x c=1", ratio, min_ratio, met))
        ttft = p.get("p99_ttft_s")
        out.append(
            Target(
                f"{name}: p99 time to first token at c={at} < {max_p99_ttft_s:g} s",
                ttft,
                max_p99_ttft_s,
                ttft is not None and ttft < max_p99_ttft_s and not p.get("errors"),
            )
        )
    return out


def library_targets(
    lines: Mapping[str, Sequence[Mapping[str, Any]]],
    *,
    served: str = "serve",
    library: str = "cb_direct",
    at: Iterable[int] = (1, 32),
    min_ratio: float = 0.9,
) -> list[Target]:
    """Issue 21's: the served line's tokens/s >= ``min_ratio`` x the library's own (in-process) at
    each concurrency of ``at``; none when either line was not run."""
    if served not in lines or library not in lines:
        return []
    ours = {p["concurrency"]: p.get("tokens_per_s") for p in lines[served]}
    theirs = {p["concurrency"]: p.get("tokens_per_s") for p in lines[library]}
    out = []
    for c in at:
        a, b = ours.get(c), theirs.get(c)
        ratio = round(a / b, 3) if a is not None and b else None
        met = ratio is not None and ratio >= min_ratio
        out.append(Target(f"{served}: tokens/s at c={c} >= {min_ratio:g}x {library}'s", ratio, min_ratio, met))
    return out

