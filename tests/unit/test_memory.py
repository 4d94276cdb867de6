"""The memory ledger's parts: settings, the pure fit check, estimates against what really loads."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpufleet.api.model_groups import load_model_groups
from gpufleet.pod_server.engine.kv_sizing import kv_bytes_per_token, size_kv_cache
from gpufleet.pod_server.inference import load_model
from gpufleet.pod_server.memory import (
    GroupNeed,
    MemoryLedger,
    check_fit,
    checkpoint_weight_bytes,
    estimate_group_need,
    parse_device_memory,
)
from gpufleet.pod_server.settings import load_settings

pytestmark = pytest.mark.unit


def test_device_memory_setting_one_number_or_per_device() -> None:
    assert parse_device_memory("0.06", ["cpu:0", "cpu:1"]) == {"cpu:0": 60_000_000, "cpu:1": 60_000_000}
    assert parse_device_memory("cpu:1=2", ["cpu:0", "cpu:1"]) == {"cpu:1": 2_000_000_000}
    assert parse_device_memory(None, ["cpu:0"]) == {}
    with pytest.raises(ValueError, match="cuda:3"):
        parse_device_memory("cuda:3=70", ["cpu:0"])
    with pytest.raises(ValueError, match="not a number"):
        parse_device_memory("lots", ["cpu:0"])


def test_settings_refuse_a_device_memory_for_an_unknown_device() -> None:
    with pytest.raises(Exception, match="DEVICE_MEMORY_GB"):
        load_settings(devices=["cpu:0"], device_memory_gb="cpu:5=1")
    assert load_settings(devices=["cpu:0"], device_memory_gb="0.5").device_memory_caps() == {"cpu:0": 500_000_000}


def test_fit_counts_weights_kv_and_reserve() -> None:
    need = GroupNeed("g", weight_bytes=60, kv_bytes=30)
    assert check_fit(need, capacity_bytes=100, reserve_bytes=10).fits
    no = check_fit(need, capacity_bytes=100, reserve_bytes=11)
    assert not no.fits and no.needed_bytes == 90 and no.available_bytes == 89
    assert "'g'" in no.message("g", "cuda:0") and "89 bytes" in no.message("g", "cuda:0")


def test_estimates_match_what_loads_and_what_the_engine_reserves(demo_models: Path) -> None:
    groups = load_model_groups(demo_models)
    for spec in (m for g in groups.groups.values() for m in g.models):
        loaded = load_model(spec, "cpu:0")
        # Exact, or above by the buffers an old checkpoint stores (MiniLM's position ids).
        estimate = checkpoint_weight_bytes(spec, 4)
        assert loaded.bytes <= estimate <= loaded.bytes * 1.001, spec.id
    beta = groups.groups["beta"]
    need = estimate_group_need("beta", beta, "cpu:0", kv_budget_bytes=4_000_000, max_sequences=8)
    kv = 0
    for spec in beta.models:
        m = load_model(spec, "cpu:0")
        kv += size_kv_cache(
            model_id=spec.id,
            bytes_per_token=kv_bytes_per_token(m.model.config, 4),
            budget_bytes=2_000_000,
            max_sequences=8,
            context_length=m.context_length,
            on_gpu=False,
        ).bytes
    assert need.kv_bytes == kv > 0


def test_ledger_under_a_cap_reports_the_cap_less_what_it_placed() -> None:
    ledger = MemoryLedger(["cpu:0"], caps={"cpu:0": 1_000_000})
    ledger.set_resident("cpu:0", "g", {"m": 300_000})
    ledger.set_kv("cpu:0", "m", 200_000)
    doc = ledger.device_document("cpu:0")
    assert doc["memory_total_bytes"] == 1_000_000 and doc["memory_free_bytes"] == 500_000
    ledger.clear_kv("cpu:0")
    assert ledger.device_used_bytes("cpu:0") == 300_000
    ledger.add_host_copy("m", 300_000)
    ledger.add_host_copy("m", 300_000)
    assert ledger.host_copies_made == 1
