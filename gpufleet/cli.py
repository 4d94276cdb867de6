"""The ``gpufleet`` command: one entry point for every component.

Each component registers its commands in its own ``cli`` module (``COMMANDS``), which imports
nothing heavy until a command runs: ``gpufleet router --help`` works in an install with the
``router`` extra alone (no torch), and a command whose extra is missing says so in one line.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence

from gpufleet.api.errors import ConfigError

Command = Callable[[argparse.Namespace], int]
Registration = tuple[str, str, Callable[[argparse.ArgumentParser], None], Command]

# Named, not imported: this module knows no component (import-linter checks it).
COMMAND_MODULES = ("gpufleet.pod_server.cli", "gpufleet.router.cli", "gpufleet.operator.cli", "gpufleet.local.cli")

# The extra that brings each command's libraries (pyproject.toml).
EXTRA_OF = {"serve": "pod-server", "demo-models": "pod-server", "router": "router", "operator": "operator", "up": "all"}


def _fail(exc: ConfigError) -> int:
    print(f"gpufleet: configuration error: {exc.message}", file=sys.stderr)
    return 2


def _missing(command: str, exc: ModuleNotFoundError) -> int:
    extra = EXTRA_OF.get(command, "all")
    hint = f"pip install 'gpufleet[{extra}]' brings it"
    print(f"gpufleet {command}: {exc.name} is not installed; {hint}", file=sys.stderr)
    return 2


def commands() -> list[Registration]:
    """Every component's commands, in COMMAND_MODULES order."""
    found: list[Registration] = []
    for module in COMMAND_MODULES:
        found.extend(importlib.import_module(module).COMMANDS)
    return found


def build_parser(registrations: Sequence[Registration] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpufleet", description="Serve model groups on fleets of GPUs.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text, configure, func in commands() if registrations is None else registrations:
        p = sub.add_parser(name, help=help_text)
        configure(p)
        p.set_defaults(func=func)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        return _fail(exc)
    except ModuleNotFoundError as exc:
        if exc.name is None or exc.name.split(".")[0] == "gpufleet":
            raise
        return _missing(args.command, exc)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
