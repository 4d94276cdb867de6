"""``gpufleet router``, registered with the main command (gpufleet.cli); imports nothing heavy until run."""

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
        "pod_urls": args.pod_urls,
        "routing_policy": args.policy,
    }
    return {k: v for k, v in raw.items() if v is not None}


def run_router(args: argparse.Namespace) -> int:
    import uvicorn

    from gpufleet.logs import lean_logging, setup_logging
    from gpufleet.router.app import server_config
    from gpufleet.router.settings import load_router_settings

    settings = load_router_settings(**_overrides(args))
    setup_logging("router", settings.log_level)
    lean_logging()
    uvicorn.Server(server_config(settings)).run()
    return 0


COMMANDS = [
    ("router", "route requests across pod servers (POD_URLS or a Kubernetes watch)", _configure_router, run_router),
]
