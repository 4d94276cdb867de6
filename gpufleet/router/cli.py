"""``gpufleet router`` and ``gpufleet up``, registered with the main command (gpufleet.cli)."""

from __future__ import annotations

import argparse


def _configure_router(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default=None)
    p.add_argument("--port", type=int, default=None)
    p.add_argument("--pod-urls", default=None, help="comma-separated pod-server URLs (POD_URLS)")
    p.add_argument("--policy", default=None, help="affinity|round_robin|least_load|lru_multiplex (ROUTING_POLICY)")


def _overrides(args: argparse.Namespace) -> dict[str, object]:
    raw = {
        "host": args.host,
        "port": args.port,
        "pod_urls": getattr(args, "pod_urls", None),
        "routing_policy": args.policy,
    }
    return {k: v for k, v in raw.items() if v is not None}


def lean_logging() -> None:
    """Our JSON lines never show the caller, thread or process: skip collecting them for every
    record (a routing decision is logged per request, so this is on the hot path)."""
    import logging

    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging._srcfile = None  # no caller lookup (a documented speed-up)


def run_router(args: argparse.Namespace) -> int:
    import uvicorn

    from gpufleet.logs import setup_logging
    from gpufleet.router.app import server_config
    from gpufleet.router.settings import load_router_settings

    settings = load_router_settings(**_overrides(args))
    setup_logging("router", settings.log_level)
    lean_logging()
    uvicorn.Server(server_config(settings)).run()
    return 0


def _configure_up(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default=None, help="router address (HOST, default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="router port (PORT, default 8000)")
    p.add_argument("--policy", default=None, help="routing policy (ROUTING_POLICY)")


def run_up(args: argparse.Namespace) -> int:
    from gpufleet.router.up import up

    return up(_overrides(args))


COMMANDS = [
    ("router", "route requests across pod servers (POD_URLS or a Kubernetes watch)", _configure_router, run_router),
    ("up", "run the whole system here: one pod server per device (DEVICES) plus the router", _configure_up, run_up),
]
