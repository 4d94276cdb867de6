"""Bad configuration stops `gpufleet serve` at once with one message naming the setting."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


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


def test_invalid_model_groups_names_the_field(tmp_path: Path) -> None:
    bad = tmp_path / "model_groups.json"
    bad.write_text('{"default_group": "a", "groups": {"a": {"models": [{"id": "m", "source": "x", "task": "tts"}]}}}')
    proc = _serve({"MODEL_GROUPS": str(bad)}, tmp_path)
    assert proc.returncode == 2
    assert "groups.a.models.0.task" in proc.stderr
