"""``gpufleet up``: one pod server per device plus the router, stopped cleanly by SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import psutil
import pytest

from tests.support.processes import ServerProcess, free_port

pytestmark = pytest.mark.integration


def test_up_runs_one_pod_per_device_and_stops_them_all(demo_models: Path, tmp_path: Path) -> None:
    port = free_port()
    env = {
        "DEVICES": "cpu:0,cpu:1",
        "MODEL_GROUPS": str(demo_models),
        "LAZY_LOAD_MODEL": "true",  # keep start-up cheap: the first request loads the group
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "UP_LOG_DIR": str(tmp_path / "pods"),
        "TORCH_THREADS": "1",
        "STATUS_INTERVAL_S": "0.5",
    }
    up = ServerProcess(["up"], env, tmp_path / "up.log", f"http://127.0.0.1:{port}")
    try:
        up.wait_ready(180)
        children = psutil.Process(up.proc.pid).children(recursive=True)
        assert len([c for c in children if "serve" in c.cmdline()]) == 2

        r = httpx.post(
            up.url + "/v1/chat/completions",
            json={"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
            timeout=120,
        )
        assert r.status_code == 200, r.text
        assert r.headers["x-served-by-pod"] in ("local-cpu-0", "local-cpu-1")
        stats = httpx.get(up.url + "/api/gpu_stats", timeout=10).json()
        assert set(stats["devices"]) == {"local-cpu-0/cpu:0", "local-cpu-1/cpu:1"}

        up.signal(signal.SIGTERM)
        assert up.proc.wait(60) == 0
        _, alive = psutil.wait_procs(children, timeout=10)
        assert not alive, alive
        log = up.log_path.read_text()
        assert "[2/2]" in log and log.rstrip().endswith("gpufleet up: stopped")
    finally:
        up.stop()


@pytest.mark.parametrize(
    ("var", "value"), [("UP_READY_TIMEOUT_S", "soon"), ("UP_MAX_RESTARTS", "-1"), ("POD_BASE_PORT", "99999")]
)
def test_bad_up_setting_is_one_line_not_a_traceback(var: str, value: str, tmp_path: Path) -> None:
    env = {**os.environ, "DEVICES": "cpu:0", "MODEL_GROUPS": "/nonexistent/model_groups.json", var: value}
    proc = subprocess.run(
        [sys.executable, "-m", "gpufleet.cli", "up"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.startswith(f"gpufleet: configuration error: {var}: ")
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
