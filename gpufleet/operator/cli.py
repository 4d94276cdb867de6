"""`gpufleet operator` (run the ModelGroup and GpuPool operator) and `gpufleet crd` (print the CRDs)."""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import socket
import sys
from pathlib import Path


def configure_operator(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--namespace",
        "-n",
        action="append",
        dest="namespaces",
        default=None,
        help="watch only this namespace (repeatable; default: GPUFLEET_OPERATOR_NAMESPACES, else all)",
    )
    p.add_argument("--resync-seconds", type=float, default=None, help="re-check interval per ModelGroup")
    p.add_argument("--health-port", type=int, default=None, help="port of GET /healthz (0: none)")
    p.add_argument("--pod-server-image", default=None, help="default pod server image")


def run_operator(args: argparse.Namespace) -> int:
    import kopf

    from gpufleet.logs import setup_logging
    from gpufleet.operator.handlers import kopf_settings, register
    from gpufleet.operator.kube import Kube, load_api_client
    from gpufleet.operator.metrics import OperatorMetrics
    from gpufleet.operator.peering import ensure_peering_objects
    from gpufleet.operator.reconcile import Reconciler
    from gpufleet.operator.settings import load_settings
    from gpufleet.operator.startup import wait_until_served

    settings = load_settings(
        namespaces=args.namespaces,
        resync_seconds=args.resync_seconds,
        health_port=args.health_port,
        pod_server_image=args.pod_server_image,
    )
    setup_logging("operator", settings.log_level)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_drop_kopf_extras)
    if settings.log_level.upper() != "DEBUG":
        # kopf logs every handler run at INFO (each pod event); ours say what changed.
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    metrics = OperatorMetrics()
    reconciler = Reconciler(Kube(load_api_client(), settings.field_manager), settings.build_options(), metrics)
    if settings.metrics_port:
        from prometheus_client import start_http_server

        start_http_server(settings.metrics_port, addr=settings.health_host, registry=metrics.registry)
    registry = kopf.OperatorRegistry()
    register(registry, reconciler, settings)
    identity = f"{socket.gethostname()}@{os.getpid()}-{secrets.token_hex(3)}"
    if settings.peering:
        ensure_peering_objects(reconciler.kube, settings.peering, settings.namespaces)
    wait_until_served(reconciler.kube, settings.namespaces)
    liveness = f"http://{settings.health_host}:{settings.health_port}/healthz" if settings.health_port else None
    kopf.run(
        registry=registry,
        settings=kopf_settings(settings),
        # Peering (several replicas, one acting) when configured; else standalone: no peering objects.
        standalone=not settings.peering,
        identity=identity,  # type: ignore[arg-type]  # kopf's Identity is a NewType of str
        memo=kopf.Memo(peering_identity=identity),
        clusterwide=not settings.namespaces,
        namespaces=settings.namespaces,
        liveness_endpoint=liveness,
    )
    return 0


def _drop_kopf_extras(record: logging.LogRecord) -> bool:
    """kopf attaches its whole settings object to every record; keep the JSON lines short."""
    for key in ("settings", "k8s_skip"):
        record.__dict__.pop(key, None)
    return True


CRD_KINDS = ("modelgroup", "gpupool")


def configure_crd(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kind", "-k", choices=CRD_KINDS, default="modelgroup", help="which CRD (default: modelgroup)")
    p.add_argument("--output", "-o", default=None, help="write to this file instead of stdout")
    p.add_argument(
        "--output-dir", "-d", default=None,
        help="write every CRD into this folder as <kind>.yaml (crds/modelgroup.yaml, crds/gpupool.yaml)",
    )


def run_crd(args: argparse.Namespace) -> int:
    from gpufleet.operator.crd import crd_yaml

    if args.output_dir:
        for kind in CRD_KINDS:
            (Path(args.output_dir) / f"{kind}.yaml").write_text(crd_yaml(kind))
        return 0
    text = crd_yaml(args.kind)
    if args.output:
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


COMMANDS = [
    (
        "operator",
        "run the ModelGroup and GpuPool operator (kopf) against KUBECONFIG or the in-cluster API",
        configure_operator,
        run_operator,
    ),
    (
        "crd",
        "print the ModelGroup or GpuPool CustomResourceDefinition, or write both (crds/*.yaml)",
        configure_crd,
        run_crd,
    ),
]
