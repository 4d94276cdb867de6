"""The ``gpufleet`` command: one entry point for every component."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from gpufleet.api.errors import ConfigError

Command = Callable[[argparse.Namespace], int]


def _fail(exc: ConfigError) -> int:
    print(f"gpufleet: configuration error: {exc.message}", file=sys.stderr)
    return 2


def cmd_demo_models(args: argparse.Namespace) -> int:
    from gpufleet.pod_server.demo_models import build_demo_models
    from gpufleet.pod_server.settings import load_settings

    root = Path(args.dir) if args.dir else load_settings().demo_models_dir
    manifest = build_demo_models(root, force=args.force)
    print(manifest)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from gpufleet.api.model_groups import load_model_groups
    from gpufleet.logs import setup_logging
    from gpufleet.pod_server.app import create_app
    from gpufleet.pod_server.demo_models import build_demo_models
    from gpufleet.pod_server.settings import load_settings

    overrides = {k: v for k, v in {"host": args.host, "port": args.port}.items() if v is not None}
    settings = load_settings(**overrides)
    setup_logging("pod-server", settings.log_level)
    path = settings.model_groups
    if path is None:
        path = build_demo_models(settings.demo_models_dir, progress=lambda m: print(m, file=sys.stderr, flush=True))
    groups = load_model_groups(path).with_default(settings.default_group)
    _configure_torch(settings.torch_threads, len(settings.devices))
    app = create_app(settings, groups)
    uvicorn.run(app, host=settings.host, port=settings.port, log_config=None, timeout_graceful_shutdown=30)
    return 0


def _configure_torch(threads: int | None, devices: int) -> None:
    import os

    import torch

    # CPU devices share the host's cores; split them rather than oversubscribe.
    torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // max(1, devices)))


def build_parser(
    extra: Sequence[tuple[str, str, Callable[[argparse.ArgumentParser], None], Command]] = (),
) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpufleet", description="Serve model groups on fleets of GPUs.")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run a pod server on this machine's devices (DEVICES)")
    serve.add_argument("--host", default=None)
    serve.add_argument("--port", type=int, default=None)
    serve.set_defaults(func=cmd_serve)

    demo = sub.add_parser("demo-models", help="build the tiny local demo models and their model_groups.json")
    demo.add_argument("--dir", default=None, help="output folder (default: DEMO_MODELS_DIR)")
    demo.add_argument("--force", action="store_true", help="rebuild even if present")
    demo.set_defaults(func=cmd_demo_models)

    for name, help_text, configure, func in extra:
        p = sub.add_parser(name, help=help_text)
        configure(p)
        p.set_defaults(func=func)
    return parser


def _extra_commands() -> list[tuple[str, str, Callable[[argparse.ArgumentParser], None], Command]]:
    """Commands of the other components, registered by their own modules."""
    found = []
    for module in ("gpufleet.router.cli", "gpufleet.operator.cli"):
        try:
            mod = __import__(module, fromlist=["COMMANDS"])
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
            continue
        found.extend(mod.COMMANDS)
    return found


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser(_extra_commands()).parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        return _fail(exc)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
