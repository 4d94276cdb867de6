"""The benchmark's trace generator: Zipf popularity, arrival processes, seeded repeatability."""

from __future__ import annotations

import itertools
import math
from collections import Counter

import numpy as np
import pytest

from bench.trace import TraceParams, generate, group_names, zipf_weights

pytestmark = pytest.mark.unit


def test_same_seed_same_trace_and_other_seed_differs() -> None:
    p = TraceParams(n_requests=500, n_groups=6, alpha=1.0, rate=5.0, seed=3)
    assert generate(p) == generate(p)
    other = generate(TraceParams(n_requests=500, n_groups=6, alpha=1.0, rate=5.0, seed=4))
    assert [r.group for r in other] != [r.group for r in generate(p)]


def test_rate_changes_only_arrival_times() -> None:
    p = TraceParams(n_requests=300, n_groups=5, rate=2.0, seed=1)
    slow, fast = generate(p), generate(p.at_rate(8.0))
    assert [(r.group, r.service_s) for r in slow] == [(r.group, r.service_s) for r in fast]
    assert fast[-1].t < slow[-1].t


def test_zipf_weights_follow_rank_power_law() -> None:
    w = zipf_weights(4, 1.0)
    assert w.sum() == pytest.approx(1.0)
    assert w[0] / w[1] == pytest.approx(2.0)
    assert w[0] / w[3] == pytest.approx(4.0)


@pytest.mark.parametrize("alpha", [0.8, 1.0, 1.2])
def test_group_frequencies_have_the_zipf_shape(alpha: float) -> None:
    n_groups = 8
    trace = generate(TraceParams(n_requests=40_000, n_groups=n_groups, alpha=alpha, seed=11))
    counts = Counter(r.group for r in trace)
    freq = np.array([counts[g] for g in group_names(n_groups)], dtype=float) / len(trace)
    assert np.abs(freq - zipf_weights(n_groups, alpha)).max() < 0.01
    # The log-log slope of frequency against rank is -alpha.
    slope = np.polyfit(np.log(np.arange(1, n_groups + 1)), np.log(freq), 1)[0]
    assert slope == pytest.approx(-alpha, abs=0.06)


def test_poisson_arrivals_have_the_rate_and_exponential_gaps() -> None:
    trace = generate(TraceParams(n_requests=20_000, rate=4.0, arrivals="poisson", seed=2))
    gaps = np.diff([0.0] + [r.t for r in trace])
    assert gaps.mean() == pytest.approx(0.25, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, abs=0.05)
    assert all(b.t >= a.t for a, b in itertools.pairwise(trace))


def test_bursty_arrivals_keep_the_mean_rate_but_are_burstier() -> None:
    trace = generate(TraceParams(n_requests=40_000, rate=4.0, arrivals="bursty", seed=2))
    times = np.array([r.t for r in trace])
    assert len(trace) / times[-1] == pytest.approx(4.0, rel=0.1)
    # Counts per second: a Poisson process has variance == mean; bursts raise it well above.
    per_s = np.bincount(times.astype(int))
    assert per_s.var() / per_s.mean() > 2.0


def test_service_times_have_the_mean_and_tokens_follow_them() -> None:
    trace = generate(TraceParams(n_requests=20_000, service_mean_s=0.5, service_cv=0.5, tokens_per_s=20, seed=5))
    svc = np.array([r.service_s for r in trace])
    assert svc.mean() == pytest.approx(0.5, rel=0.03)
    assert svc.std() / svc.mean() == pytest.approx(0.5, rel=0.1)
    assert all(r.tokens == max(1, round(r.service_s * 20)) for r in trace[:100])


def test_bad_parameters_are_refused() -> None:
    with pytest.raises(ValueError):
        generate(TraceParams(n_requests=10, arrivals="bursty", burst_fraction=0.5, burst_factor=3.0))
    with pytest.raises(ValueError):
        generate(TraceParams(n_requests=10, rate=0.0))
    assert math.isclose(sum(zipf_weights(16, 1.2)), 1.0)
