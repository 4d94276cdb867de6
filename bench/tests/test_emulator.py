"""The fleet emulator answers like pod servers: the real router discovers three emulated
pods, routes to a device holding the requested group, and lists every emulated device."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest

from bench.scale.emulator import EmulatorProcess, Timing, start_emulator
from bench.scale.layout import make_layout
from bench.scale.router_proc import start_router, wait_all_ready
from gpufleet.api.load_report import LOAD_HEADER, parse_load
from gpufleet.api.pod_status import PodStatus
from gpufleet.local.processes import Process

pytestmark = pytest.mark.integration

PODS, DEVICES, GROUPS, SEED = 3, 4, 6, 7


@pytest.fixture(scope="module")
def emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmulatorProcess]:
    log = tmp_path_factory.mktemp("emulator") / "emulator.log"
    with start_emulator(PODS, devices=DEVICES, groups=GROUPS, seed=SEED, timing=Timing(per_token_s=0.0005),
                        log_path=log) as emu:
        yield emu


@pytest.fixture(scope="module")
def router(emulator: EmulatorProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Process]:
    proc = start_router(emulator.urls, tmp_path_factory.mktemp("router"))
    try:
        wait_all_ready(proc, PODS, timeout_s=60)
        yield proc
    finally:
        proc.stop()


def test_each_pod_publishes_a_valid_status_document(emulator: EmulatorProcess) -> None:
    layout = make_layout(PODS, DEVICES, GROUPS, seed=SEED)
    for url, pod in zip(emulator.urls, layout.pods, strict=True):
        doc = PodStatus.model_validate(httpx.get(f"{url}/api/status", timeout=5).json())
        assert doc.pod == pod.name and doc.ready and doc.url == url
        assert [d.current_group for d in doc.devices] == [d.current_group for d in pod.devices]  # seeded layout


def test_router_routes_to_a_device_holding_the_group(router: Process, emulator: EmulatorProcess) -> None:
    layout = make_layout(PODS, DEVICES, GROUPS, seed=SEED)
    holders = {(p.name, d.device) for p in layout.pods for d in p.devices if d.current_group == "g000"}
    assert holders  # the most popular group sits somewhere
    emulator.reset()
    with httpx.Client(base_url=router.url, timeout=30) as client:
        for stream in (False, True, False):
            body = {"model": "g000-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5,
                    "stream": stream}
            r = client.post("/v1/chat/completions", json=body)
            assert r.status_code == 200, r.text
            assert (r.headers["x-served-by-pod"], r.headers["x-served-by-device"]) in holders
            assert r.headers["x-group-switch"] == "false"
            if stream:
                events = [line for line in r.text.splitlines() if line.startswith("data: ")]
                assert events[-1] == "data: [DONE]" and len(events) == 6
            else:
                assert r.json()["usage"]["completion_tokens"] == 5
        r = client.post("/v1/completions", json={"model": "g001-complete", "prompt": "x", "max_tokens": 2})
        assert r.status_code == 200 and r.json()["object"] == "text_completion"
    served = emulator.counts()["routes"]
    assert served.get("POST /v1/chat/completions") == 3 and served.get("POST /v1/completions") == 1


def test_router_gpu_stats_lists_every_emulated_device(router: Process) -> None:
    stats = httpx.get(f"{router.url}/api/gpu_stats", timeout=30).json()
    layout = make_layout(PODS, DEVICES, GROUPS, seed=SEED)
    assert set(stats["devices"]) == {f"{p.name}/{d.device}" for p in layout.pods for d in p.devices}
    assert all(v["reachable"] for v in stats["pods"].values())


def test_unknown_model_is_refused_by_name(emulator: EmulatorProcess) -> None:
    r = httpx.post(f"{emulator.urls[0]}/v1/chat/completions", json={"model": "nope", "messages": []}, timeout=5)
    assert r.status_code == 404 and json.loads(r.text)["error"]["param"] == "model"


def test_start_emulator_returns_one_url_per_pod(emulator: EmulatorProcess) -> None:
    assert len(set(emulator.urls)) == PODS and all(u.startswith("http://127.0.0.1:") for u in emulator.urls)


def test_every_answer_reports_load_and_the_status_version(emulator: EmulatorProcess) -> None:
    url = emulator.urls[1]
    status = PodStatus.model_validate(httpx.get(f"{url}/api/status", timeout=5).json())
    before = parse_load(httpx.get(f"{url}/health", timeout=5).headers[LOAD_HEADER])
    assert before is not None and before.status_version == status.status_version
    assert set(before.devices) == {d.device for d in status.devices}
    held = {d.current_group for d in status.devices}
    missing = next(g for g in make_layout(PODS, DEVICES, GROUPS, seed=SEED).groups if g not in held)
    r = httpx.post(f"{url}/v1/completions", json={"model": f"{missing}-complete", "prompt": "x", "max_tokens": 1},
                   timeout=10)
    after = parse_load(r.headers[LOAD_HEADER])
    assert r.headers["x-group-switch"] == "true" and after is not None
    assert after.devices[r.headers["x-served-by-device"]].running == 1  # taken while answering
    assert after.status_version == before.status_version + 1  # the switch changed the status document
    refetched = PodStatus.model_validate(httpx.get(f"{url}/api/status", timeout=5).json())
    assert refetched.status_version == after.status_version
    assert missing in {d.current_group for d in refetched.devices}
