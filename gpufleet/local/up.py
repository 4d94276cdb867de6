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
import sys
import threading
from pathlib import Path
from typing import Any

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from gpufleet.api.errors import ConfigError
from gpufleet.local.processes import Process, ProcessExited, Supervisor, free_port, gpufleet_argv, http_ok
from gpufleet.settings_support import parse_settings


class UpSettings(BaseSettings):
    """Settings of ``gpufleet up`` itself; pods and router read their own from the same environment."""

    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore")

    up_log_dir: Path = Field(
        default_factory=lambda: Path.home() / ".cache" / "gpufleet" / "up-logs", description="Pod-server logs."
    )
    up_ready_timeout_s: float = Field(default=900.0, gt=0, description="Give up if a pod is not ready by then.")
    pod_base_port: int | None = Field(default=None, ge=1, le=65000, description="First pod port; default: free ports.")
    up_max_restarts: int = Field(default=5, ge=0, description="Restarts of a child that dies while serving.")


def load_up_settings(**overrides: Any) -> UpSettings:
    return parse_settings(UpSettings, **overrides)


def say(message: str) -> None:
    print(f"gpufleet up: {message}", file=sys.stderr, flush=True)


def pod_name(device: str) -> str:
    return "local-" + device.replace(":", "-")


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


def pod_servers(devices: list[str], ports: list[int], manifest: Path, threads: int, log_dir: Path) -> list[Process]:
    return [
        Process(
            pod_name(d),
            gpufleet_argv("serve"),
            child_env(d, port, manifest, threads, dict(os.environ)),
            log_dir / f"{pod_name(d)}.log",
            url=f"http://127.0.0.1:{port}",
        )
        for d, port in zip(devices, ports, strict=True)
    ]


def _announce_when_ready(url: str, stopping: threading.Event) -> None:
    def loop() -> None:
        while not stopping.is_set():
            if http_ok(url + "/ready", timeout_s=1.0):
                say(f"ready: {url}  (try: curl {url}/v1/models)")
                return
            stopping.wait(0.25)

    threading.Thread(target=loop, name="up-announce", daemon=True).start()


def _sigterm_as_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def up(overrides: dict[str, Any]) -> int:
    import uvicorn

    from gpufleet.logs import lean_logging, setup_logging
    from gpufleet.pod_server.demo_models import build_demo_models
    from gpufleet.pod_server.settings import load_settings
    from gpufleet.router.app import server_config
    from gpufleet.router.settings import load_router_settings

    up_settings = load_up_settings()
    pod_settings = load_settings()
    setup_logging("router", pod_settings.log_level)
    lean_logging()
    devices = pod_settings.devices
    manifest = pod_settings.model_groups
    if manifest is None:  # build once here, so the children do not race to build them
        manifest = build_demo_models(pod_settings.demo_models_dir, progress=say)
    up_settings.up_log_dir.mkdir(parents=True, exist_ok=True)
    threads = pod_settings.torch_threads or max(1, (os.cpu_count() or 1) // len(devices))
    base = up_settings.pod_base_port
    ports = [base + i if base else free_port() for i in range(len(devices))]
    children = pod_servers(devices, ports, manifest, threads, up_settings.up_log_dir)
    router_settings = load_router_settings(discovery="static", pod_urls=[c.url for c in children], **overrides)
    where = f"{router_settings.host}:{router_settings.port}"
    say(f"{len(children)} pod server(s) for {', '.join(devices)}; router on {where}")
    supervisor = Supervisor(children, up_settings.up_max_restarts, say)
    previous = signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    try:
        supervisor.start()
        try:
            supervisor.wait_ready(up_settings.up_ready_timeout_s)
        except ProcessExited as exc:
            raise ConfigError(f"pod server {exc}") from None
        except TimeoutError as exc:
            raise ConfigError(f"pod servers {exc}") from None
        supervisor.watch()
        _announce_when_ready(f"http://{router_settings.host}:{router_settings.port}", supervisor.stopping)
        uvicorn.Server(server_config(router_settings)).run()  # returns on SIGINT/SIGTERM, after draining requests
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        say("stopping pod servers")
        supervisor.stop()
        signal.signal(signal.SIGTERM, previous)
        say("stopped")
