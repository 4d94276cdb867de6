"""Start real gpufleet processes on loopback for tests, with the supervisor's own process wrapper
(gpufleet.local.processes), and wait for them with deadlines."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping
from pathlib import Path

from gpufleet.local.processes import Process, free_port, gpufleet_argv, wait_until

__all__ = ["ServerProcess", "free_port", "start_pod_server", "wait_until"]


class ServerProcess(Process):
    """A gpufleet subcommand (``args``) running as a real process, started at once."""

    def __init__(self, args: list[str], env: Mapping[str, str], log_path: Path, url: str) -> None:
        super().__init__(
            log_path.stem, gpufleet_argv(*args), {**os.environ, "PYTHONUNBUFFERED": "1", **env}, log_path, url
        )
        self.start()

    @property
    def proc(self) -> subprocess.Popen[bytes]:
        assert self.popen is not None
        return self.popen


def start_pod_server(
    log_dir: Path, model_groups: Path, *, devices: str = "cpu:0,cpu:1", name: str = "pod", **env: str
) -> ServerProcess:
    port = free_port()
    base = {
        "DEVICES": devices,
        "MODEL_GROUPS": str(model_groups),
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "POD_NAME": name,
        "TORCH_THREADS": "1",
        "LOG_LEVEL": "INFO",
    }
    base.update({k.upper(): v for k, v in env.items()})
    return ServerProcess(["serve"], base, log_dir / f"{name}.log", f"http://127.0.0.1:{port}")
