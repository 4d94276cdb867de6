"""The router scale benchmark at a tiny size: decision time through the real FleetState and
Decider, the targets list, and the result document's shape (bench/scale/router_bench.py)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from bench.scale import decision, router_bench
from bench.scale.layout import make_layout

pytestmark = pytest.mark.unit


def test_layout_of_holds_exactly_the_devices_asked_for() -> None:
    for n in (1, 10, 100, 13):
        layout = decision.layout_of(n, seed=0)
        assert layout.device_count == n
        assert all(len(p.devices) <= decision.DEVICES_PER_POD for p in layout.pods)


def test_fleet_state_holds_every_device_routable() -> None:
    fleet = decision.build_fleet(20, seed=1)
    snap = fleet.state.snapshot()
    assert len(snap.devices) == 20 and all(d.healthy for d in snap.devices)
    assert set(fleet.state.models) == set(fleet.layout.models)
    assert fleet.heap_bytes > 0


def test_decision_measurement_routes_every_request_and_reports_percentiles() -> None:
    row = decision.measure(10, decisions=60, budget_s=10)
    assert row["devices"] == 10 and row["pods"] == 2 and row["decisions"] == 60
    assert row["outcomes"] == {"routed": 60}  # every group is current somewhere or can be switched to
    assert 0 < row["p50_us"] <= row["p90_us"] <= row["p99_us"] <= row["max_us"]
    assert row["state_heap_mib"] > 0


def test_probe_groups_are_the_rarest_current_groups() -> None:
    layout = make_layout(6, 4, 10, seed=3)
    probes = router_bench.probe_groups(layout, 2)
    held = {g: {p.name for p in layout.pods for d in p.devices if d.current_group == g} for g in layout.groups}
    fewest = sorted(len(v) for v in held.values() if v)[:2]
    assert sorted(len(v) for v in probes.values()) == fewest
    assert all(probes[g] == held[g] for g in probes)


def test_document_and_targets_without_processes(tmp_path: Path) -> None:
    args = argparse.Namespace(devices="8,16", quick=True, decisions=40, decision_budget_s=5.0,
                              skip_processes=True)
    baseline = {"baseline_per_pod_per_s": 2.5}
    (tmp_path / "scale_background_baseline.json").write_text(json.dumps(baseline))
    target = {"target": "writes/min at steady state", "figure": 0, "limit": 1, "met": True}
    operator = {"groups": 3, "targets": [target]}
    (tmp_path / "scale_operator.json").write_text(json.dumps(operator))
    router_bench.run(args, "python -m bench.scale router --devices 8,16 --quick", out=tmp_path)
    doc = json.loads((tmp_path / "scale.json").read_text())
    assert doc["command"].startswith("python -m bench.scale router") and doc["quick"] is True
    assert [r["devices"] for r in doc["decision"]["sizes"]] == [8, 16]
    assert doc["baseline_per_pod_per_s"] == 2.5
    targets = doc["targets"]
    assert len(targets) == 6 and all({"target", "figure", "limit", "met"} <= set(t) for t in targets)
    assert targets[0]["figure"] is None and targets[0]["met"] is None  # no 10,000-device size in this run
    assert targets[-1]["part"] == "operator" and doc["operator"] == {"groups": 3}  # the operator's own figures
    assert (tmp_path / "scale.png").stat().st_size > 0
