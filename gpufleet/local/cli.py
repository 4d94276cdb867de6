"""``gpufleet up``, registered with the main command (gpufleet.cli); imports nothing heavy until run."""

from __future__ import annotations

import argparse


def configure_up(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default=None, help="router address (HOST, default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="router port (PORT, default 8000)")
    p.add_argument("--policy", default=None, help="routing policy (ROUTING_POLICY)")


def run_up(args: argparse.Namespace) -> int:
    from gpufleet.local.up import up

    raw = {"host": args.host, "port": args.port, "routing_policy": args.policy}
    return up({k: v for k, v in raw.items() if v is not None})


COMMANDS = [
    ("up", "run the whole system here: one pod server per device (DEVICES) plus the router", configure_up, run_up),
]
