"""``gpufleet up``: the cluster topology on one machine.

One pod-server process per device in ``DEVICES`` (each child sees only its own device,
listens on its own loopback port and is named like ``local-cpu-0``), then the router on
``PORT`` with static discovery of the children. Progress is shown until everything is
ready; Ctrl-C or SIGTERM stops the router, then every child, cleanly. A child that dies
while serving is restarted (the router ejects it meanwhile).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from gpufleet.api.errors import ConfigError


class UpSettings(BaseSettings):
    """Settings of ``gpufleet up`` itself; pods and router read their own from the same environment."""

    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore")

    up_log_dir: Path = Field(
        default_factory=lambda: Path.home() / ".cache" / "gpufleet" / "up-logs", description="Pod-server logs."
    )
    up_ready_timeout_s: float = Field(default=900.0, gt=0, description="Give up if a pod is not ready by then.")
    pod_base_port: int | None = Field(default=None, ge=1, le=65000, description="First pod port; default: free ports.")
    up_max_restarts: int = Field(default=5, ge=0, description="Restarts of a child that dies while serving.")


def say(message: str) -> None:
    print(f"gpufleet up: {message}", file=sys.stderr, flush=True)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def pod_name(device: str) -> str:
    return "local-" + device.replace(":", "-")


@dataclass
class Child:
    name: str
    device: str
    port: int
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    ready_at: float | None = None
    _log: Any = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gpufleet.cli", "serve"],
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # we stop children ourselves, after the router
        )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def terminate(self) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(signal.SIGTERM)

    def wait_or_kill(self, deadline: float) -> None:
        if self.proc is None:
            return
        try:
            self.proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        if self._log is not None:
            self._log.close()


class Supervisor:
    def __init__(self, children: list[Child], max_restarts: int) -> None:
        self.children = children
        self.max_restarts = max_restarts
        self.stopping = threading.Event()
        self._watcher: threading.Thread | None = None

    def start(self) -> None:
        for c in self.children:
            c.start()
            say(f"starting {c.name} on {c.device} at {c.url} (log: {c.log_path})")

    def wait_ready(self, timeout_s: float) -> None:
        started = time.monotonic()
        deadline = started + timeout_s
        last_note = 0.0
        with httpx.Client(timeout=1.0, trust_env=False) as http:
            while True:
                pending = [c for c in self.children if c.ready_at is None]
                if not pending:
                    return
                for c in pending:
                    if not c.alive():
                        raise ConfigError(
                            f"pod server {c.name} exited during start-up; last log lines:\n{c.log_tail()}"
                        )
                    try:
                        if http.get(c.url + "/ready").status_code == 200:
                            c.ready_at = time.monotonic()
                            done = sum(1 for x in self.children if x.ready_at is not None)
                            say(f"[{done}/{len(self.children)}] {c.name} ready ({c.ready_at - started:.1f}s)")
                    except httpx.HTTPError:
                        pass
                now = time.monotonic()
                if now > deadline:
                    names = ", ".join(c.name for c in pending)
                    raise ConfigError(f"pod servers not ready after {timeout_s:.0f}s: {names}")
                if now - last_note > 10:
                    last_note = now
                    say(f"waiting for {', '.join(c.name for c in pending)} (loading models, {now - started:.0f}s)")
                time.sleep(0.25)

    def watch(self) -> None:
        """Restart children that die while serving, in a background thread."""

        def loop() -> None:
            while not self.stopping.wait(1.0):
                for c in self.children:
                    if c.alive() or self.stopping.is_set():
                        continue
                    code = c.proc.returncode if c.proc else None
                    if c.restarts >= self.max_restarts:
                        continue
                    c.restarts += 1
                    say(f"{c.name} exited with {code}; restarting ({c.restarts}/{self.max_restarts})")
                    c.start()

        self._watcher = threading.Thread(target=loop, name="up-watch", daemon=True)
        self._watcher.start()

    def stop(self, timeout_s: float = 35.0) -> None:
        self.stopping.set()
        for c in self.children:
            c.terminate()
        deadline = time.monotonic() + timeout_s
        for c in self.children:
            c.wait_or_kill(deadline)


def child_env(device: str, port: int, manifest: Path, threads: int, base: dict[str, str]) -> dict[str, str]:
    env = dict(base)
    env.pop("API_KEY", None)  # children listen on loopback only; the router guards the door
    env.update(
        {
            "DEVICES": device,
            "HOST": "127.0.0.1",
            "PORT": str(port),
            "POD_NAME": pod_name(device),
            "POD_URL": f"http://127.0.0.1:{port}",
            "MODEL_GROUPS": str(manifest),
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.setdefault("TORCH_THREADS", str(threads))
    return env


def _announce_when_ready(url: str, supervisor: Supervisor) -> None:
    def loop() -> None:
        with httpx.Client(timeout=1.0, trust_env=False) as http:
            while not supervisor.stopping.is_set():
                try:
                    if http.get(url + "/ready").status_code == 200:
                        say(f"ready: {url}  (try: curl {url}/v1/models)")
                        return
                except httpx.HTTPError:
                    pass
                supervisor.stopping.wait(0.25)

    threading.Thread(target=loop, name="up-announce", daemon=True).start()


def _sigterm_as_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def up(overrides: dict[str, Any]) -> int:
    import uvicorn

    from gpufleet.logs import setup_logging
    from gpufleet.pod_server.demo_models import build_demo_models
    from gpufleet.pod_server.settings import load_settings
    from gpufleet.router.app import server_config
    from gpufleet.router.cli import lean_logging
    from gpufleet.router.settings import load_router_settings

    pod_settings = load_settings()
    up_settings = UpSettings()
    setup_logging("router", pod_settings.log_level)
    lean_logging()
    devices = pod_settings.devices
    manifest = pod_settings.model_groups
    if manifest is None:  # build once here, so the children do not race to build them
        manifest = build_demo_models(pod_settings.demo_models_dir, progress=lambda m: say(m))
    up_settings.up_log_dir.mkdir(parents=True, exist_ok=True)
    threads = pod_settings.torch_threads or max(1, (os.cpu_count() or 1) // len(devices))
    ports = [
        (up_settings.pod_base_port + i) if up_settings.pod_base_port else free_port() for i in range(len(devices))
    ]
    children = [
        Child(
            pod_name(d),
            d,
            port,
            child_env(d, port, manifest, threads, dict(os.environ)),
            up_settings.up_log_dir / f"{pod_name(d)}.log",
        )
        for d, port in zip(devices, ports, strict=True)
    ]
    router_settings = load_router_settings(
        discovery="static", pod_urls=[c.url for c in children], **overrides
    )
    where = f"{router_settings.host}:{router_settings.port}"
    say(f"{len(children)} pod server(s) for {', '.join(devices)}; router on {where}")
    supervisor = Supervisor(children, up_settings.up_max_restarts)
    previous = signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    try:
        supervisor.start()
        supervisor.wait_ready(up_settings.up_ready_timeout_s)
        supervisor.watch()
        url = f"http://{router_settings.host}:{router_settings.port}"
        _announce_when_ready(url, supervisor)
        uvicorn.Server(server_config(router_settings)).run()  # returns on SIGINT/SIGTERM, after draining requests
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        say("stopping pod servers")
        supervisor.stop()
        signal.signal(signal.SIGTERM, previous)
        say("stopped")
