"""``gpufleet serve`` and ``gpufleet demo-models``, registered with the main command (gpufleet.cli);
torch and the server are imported only when a command runs."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def configure_serve(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default=None)
    p.add_argument("--port", type=int, default=None)


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from gpufleet.api.errors import ConfigError
    from gpufleet.api.model_groups import groups_digest, load_model_groups, parse_model_groups_lenient
    from gpufleet.logs import setup_logging
    from gpufleet.pod_server.app import create_app
    from gpufleet.pod_server.demo_models import build_demo_models
    from gpufleet.pod_server.settings import load_settings

    overrides = {k: v for k, v in {"host": args.host, "port": args.port}.items() if v is not None}
    settings = load_settings(**overrides)
    setup_logging("pod-server", settings.log_level)
    if not sys.stderr.isatty():
        # Logs are JSON lines; a progress bar without newlines would splice into them. The pod's own
        # structured lines report every load and switch.
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    path = settings.model_groups
    if path is None:
        path = build_demo_models(settings.demo_models_dir, progress=lambda m: print(m, file=sys.stderr, flush=True))
    refused: dict[str, str] = {}
    if settings.model_groups_reload_s > 0:
        # A file that is reloaded serves its good groups and refuses the bad ones by name, from the start.
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"MODEL_GROUPS: cannot read {path}: {exc.strerror or exc}") from None
        groups, refused = parse_model_groups_lenient(data, path)
    else:
        groups = load_model_groups(path)
        data = path.read_bytes()
    groups = groups.with_default(settings.default_group)
    _configure_torch(settings.torch_threads, len(settings.devices))
    app = create_app(settings, groups, groups_path=path, groups_hash=groups_digest(data), refused=refused)
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        timeout_graceful_shutdown=30,
        timeout_keep_alive=settings.keep_alive_s,  # longer than the router's pool keeps idle connections
    )
    return 0


def _configure_torch(threads: int | None, devices: int) -> None:
    import os

    import torch

    # CPU devices share the host's cores; split them rather than oversubscribe.
    torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // max(1, devices)))


def configure_demo_models(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dir", default=None, help="output folder (default: DEMO_MODELS_DIR)")
    p.add_argument("--force", action="store_true", help="rebuild even if present")


def run_demo_models(args: argparse.Namespace) -> int:
    from gpufleet.pod_server.demo_models import build_demo_models
    from gpufleet.pod_server.settings import load_settings

    root = Path(args.dir) if args.dir else load_settings().demo_models_dir
    print(build_demo_models(root, force=args.force))
    return 0


COMMANDS = [
    ("serve", "run a pod server on this machine's devices (DEVICES)", configure_serve, run_serve),
    (
        "demo-models",
        "build the tiny local demo models and their model_groups.json",
        configure_demo_models,
        run_demo_models,
    ),
]
