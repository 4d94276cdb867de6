"""Seeded multi-group request traces: Zipf group popularity, Poisson or bursty arrivals.

A trace is a tuple of :class:`Request` sorted by arrival time. The group sequence and the
service times come from their own random streams, so traces of the same seed at different
rates differ only in their arrival times: a rate search compares like with like.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

import numpy as np

Arrivals = Literal["poisson", "bursty"]


@dataclass(frozen=True)
class TraceParams:
    n_requests: int = 20_000
    n_groups: int = 16
    alpha: float = 1.0  # Zipf exponent of group popularity
    rate: float = 10.0  # mean requests per second
    arrivals: Arrivals = "poisson"
    # Bursty arrivals: a two-phase modulated Poisson process with the same mean rate.
    burst_factor: float = 3.0  # rate in a burst, as a multiple of the mean rate
    burst_fraction: float = 0.2  # share of time spent in bursts
    burst_mean_s: float = 5.0  # mean length of one burst
    service_mean_s: float = 0.3  # time a request holds a worker, lognormal
    service_cv: float = 0.5
    tokens_per_s: float = 50.0  # turns a service time into a max_tokens for real replays
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def at_rate(self, rate: float) -> TraceParams:
        return replace(self, rate=rate)


@dataclass(frozen=True)
class Request:
    index: int
    t: float  # arrival, seconds from the start
    group: str
    service_s: float
    tokens: int


def group_names(n: int) -> list[str]:
    width = max(2, len(str(n - 1)))
    return [f"g{i:0{width}d}" for i in range(n)]


def zipf_weights(n: int, alpha: float) -> np.ndarray:
    """Popularity of ranks 1..n proportional to rank**-alpha, normalised to sum to 1."""
    w = np.arange(1, n + 1, dtype=float) ** -alpha
    return w / w.sum()


def arrival_times(p: TraceParams, rng: np.random.Generator) -> np.ndarray:
    n = p.n_requests
    if p.rate <= 0:
        raise ValueError("rate must be positive")
    if p.arrivals == "poisson":
        return np.cumsum(rng.exponential(1.0 / p.rate, n))
    if p.arrivals != "bursty":
        raise ValueError(f"unknown arrivals {p.arrivals!r}")
    hi = p.rate * p.burst_factor
    if p.burst_fraction * p.burst_factor >= 1.0:
        raise ValueError("burst_fraction * burst_factor must be < 1 to keep the mean rate")
    lo = p.rate * (1 - p.burst_fraction * p.burst_factor) / (1 - p.burst_fraction)
    calm_mean_s = p.burst_mean_s * (1 - p.burst_fraction) / p.burst_fraction
    times: list[float] = []
    t, burst = 0.0, bool(rng.random() < p.burst_fraction)
    while len(times) < n:
        length = rng.exponential(p.burst_mean_s if burst else calm_mean_s)
        rate = hi if burst else lo
        at = t + rng.exponential(1.0 / rate)
        while at < t + length and len(times) < n:
            times.append(at)
            at += rng.exponential(1.0 / rate)
        t += length
        burst = not burst
    return np.asarray(times)


def generate(p: TraceParams) -> tuple[Request, ...]:
    """The trace of ``p``: same seed, same groups and service times, whatever the rate."""
    seq = np.random.SeedSequence(p.seed)
    g_rng, s_rng, a_rng = (np.random.default_rng(s) for s in seq.spawn(3))
    names = group_names(p.n_groups)
    picks = g_rng.choice(p.n_groups, size=p.n_requests, p=zipf_weights(p.n_groups, p.alpha))
    sigma2 = np.log1p(p.service_cv**2)
    mu = np.log(p.service_mean_s) - sigma2 / 2
    service = s_rng.lognormal(mu, np.sqrt(sigma2), p.n_requests)
    times = arrival_times(p, a_rng)
    return tuple(
        Request(
            i,
            float(times[i]),
            names[int(picks[i])],
            float(service[i]),
            max(1, round(float(service[i]) * p.tokens_per_s)),
        )
        for i in range(p.n_requests)
    )
