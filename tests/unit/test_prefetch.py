"""PodService's prefetch: a queued group is loaded into the pod's CPU cache in the background."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from gpufleet.api.model_groups import load_model_groups
from gpufleet.pod_server.metrics import PodMetrics
from gpufleet.pod_server.service import PodService
from gpufleet.pod_server.settings import load_settings

pytestmark = pytest.mark.unit


def _service(demo_models: Path, **settings: object) -> PodService:
    s = load_settings(devices=["cpu:0"], model_groups=demo_models, **settings)
    return PodService(s, load_model_groups(demo_models), PodMetrics("test", ""))


def _wait_for(cond: object, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)  # polling a background thread with a deadline


def test_prefetch_puts_the_group_in_the_cache_and_the_switch_finds_it(demo_models: Path) -> None:
    svc = _service(demo_models)
    groups = load_model_groups(demo_models)
    svc.prefetch("cpu:0", "beta", groups.groups["beta"])
    _wait_for(lambda: "beta" in svc.host_cache and not svc._prefetching)
    assert svc.prefetch_loads == 1
    assert set(svc.ledger.host_copies()) == {"tiny-chat-b", "tiny-complete-b"}
    r = svc.schedulers["cpu:0"].residency
    result = r.make_current("beta", groups.groups["beta"])
    assert result.source == "cache" and result.prefetched
    assert svc.ledger.host_copies_made == 2  # the switch made no copy of its own
    svc._prefetcher.shutdown(wait=True)


def test_prefetch_stays_within_the_cache_budget(demo_models: Path) -> None:
    svc = _service(demo_models, max_cpu_cache_gb=0.0001)  # 100 kB: beta's weights do not fit
    groups = load_model_groups(demo_models)
    svc.prefetch("cpu:0", "beta", groups.groups["beta"])
    _wait_for(lambda: not svc._prefetching)
    assert "beta" not in svc.host_cache and svc.prefetch_loads == 0 and svc.ledger.host_copies() == {}
    svc._prefetcher.shutdown(wait=True)
