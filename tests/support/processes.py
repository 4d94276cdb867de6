"""Start real gpufleet processes on loopback for tests, and wait for them with deadlines."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import httpx


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_until(predicate: Callable[[], bool], timeout_s: float, what: str, interval_s: float = 0.05) -> None:
    """Poll ``predicate`` until it holds or the deadline passes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval_s)
    raise TimeoutError(f"timed out after {timeout_s}s waiting for {what}")


class ServerProcess:
    """A gpufleet subcommand running as a real process, with its log captured to a file."""

    def __init__(self, args: list[str], env: Mapping[str, str], log_path: Path, url: str) -> None:
        self.url = url
        self.log_path = log_path
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **env}
        self._log = log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gpufleet.cli", *args],
            env=full_env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_ready(self, timeout_s: float = 120.0, path: str = "/ready") -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"process exited with {self.proc.returncode}; log:\n{self.log_tail()}")
            try:
                return httpx.get(self.url + path, timeout=2.0).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(ready, timeout_s, f"{self.url}{path}", interval_s=0.2)

    def log_tail(self, chars: int = 4000) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-chars:]

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def stop(self, timeout_s: float = 20.0) -> None:
        if self.proc.poll() is None:
            self.signal(signal.SIGCONT)  # a stopped process cannot handle SIGTERM
            self.signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self._log.close()


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
