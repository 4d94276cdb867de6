"""Bad configuration stops `gpufleet serve` at once with one message naming the setting."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def _has_cuda() -> bool:
    from gpufleet.pod_server.devices import cuda_device_count

    return cuda_device_count() > 0


def _serve(env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, "DEVICES": "cpu:0", "MODEL_GROUPS": "/nonexistent/model_groups.json", **env}
    return subprocess.run(
        [sys.executable, "-m", "gpufleet.cli", "serve", "--port", "0"],
        env=full,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"DEVICES": "cuda:5"}, "DEVICES: 'cuda:5' is unavailable"),
        ({"DEVICES": "gpu0"}, "DEVICES: 'gpu0' is not a device"),
        ({"NUM_WORKERS_PER_GPU": "lots"}, "NUM_WORKERS_PER_GPU"),
        ({"MODEL_GROUPS": "/nonexistent/model_groups.json"}, "MODEL_GROUPS: file not found"),
    ],
)
def test_bad_configuration_exits_with_clear_message(env: dict[str, str], needle: str, tmp_path: Path) -> None:
    proc = _serve(env, tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert needle in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.skipif(_has_cuda(), reason="this machine has a CUDA device")
def test_a_pod_told_to_use_its_gpu_without_cuda_fails_in_one_line(tmp_path: Path) -> None:
    """What the operator sets (DEVICES=cuda:0) on a machine that cannot see a GPU: the pod
    server exits non-zero with one line, instead of serving on the CPU and reporting Ready."""
    proc = _serve({"DEVICES": "cuda:0"}, tmp_path)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr[-2000:]
    assert "DEVICES: 'cuda:0' is unavailable: this machine has no visible CUDA device" in lines[0]


def test_invalid_model_groups_names_the_field(tmp_path: Path) -> None:
    bad = tmp_path / "model_groups.json"
    bad.write_text('{"default_group": "a", "groups": {"a": {"models": [{"id": "m", "source": "x", "task": "tts"}]}}}')
    proc = _serve({"MODEL_GROUPS": str(bad)}, tmp_path)
    assert proc.returncode == 2
    assert "groups.a.models.0.task" in proc.stderr
