"""Throughput: requests/s and tokens/s of one pod server by NUM_WORKERS_PER_GPU and by number
of devices, and of the fleet through the router (``gpufleet up``), with the tiny demo chat
model and closed-loop clients on loopback. Bounded: a few seconds per configuration.

On a CPU host every ``cpu:N`` device shares the same cores (``TORCH_THREADS`` is set to 1
per device): more workers or devices only help as far as free cores and the Python
serving overhead allow. The figures measure the serving stack, not a GPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from bench.common import md_table, percentile, progress, pyplot, save_figure, write_result
from bench.load import closed_loop
from bench.load import run as run_async
from bench.procs import Fleet, router_available

MAX_TOKENS = 32
MODEL = "tiny-chat"


@dataclass(frozen=True)
class Config:
    name: str
    kind: str  # "pod" or "fleet"
    devices: tuple[str, ...]
    workers: int
    concurrency: int


def configs() -> list[Config]:
    out = [Config(f"pod cpu:0 workers={w}", "pod", ("cpu:0",), w, max(2, 2 * w)) for w in (1, 2, 4)]
    out.append(Config("pod cpu:0,cpu:1 workers=1", "pod", ("cpu:0", "cpu:1"), 1, 4))
    if router_available():
        out.append(Config("router + 2 pods (gpufleet up) workers=1", "fleet", ("cpu:0", "cpu:1"), 1, 4))
    return out


def measure(c: Config, manifest: Any, seconds: float, warmup_s: float) -> dict[str, Any]:
    env = {"NUM_WORKERS_PER_GPU": str(c.workers)}
    progress(f"throughput {c.name}: starting")
    start = Fleet.up if c.kind == "fleet" else Fleet.pod
    kwargs: dict[str, Any] = {"policy": "affinity"} if c.kind == "fleet" else {}
    with start(list(c.devices), manifest, env=env, **kwargs) as fleet:
        cpu0 = fleet.cpu_seconds()
        t = run_async(
            closed_loop(
                fleet.url, MODEL, concurrency=c.concurrency, seconds=seconds, warmup_s=warmup_s, max_tokens=MAX_TOKENS
            )
        )
        cpu = fleet.cpu_seconds() - cpu0
    load = os.getloadavg()[0]
    row = {
        "config": c.name,
        "kind": c.kind,
        "devices": list(c.devices),
        "workers_per_device": c.workers,
        "concurrency": c.concurrency,
        "requests": t.requests,
        "errors": t.errors,
        "seconds": t.seconds,
        "requests_per_s": t.rps,
        "tokens_per_s": t.tokens_per_s,
        "p50_latency_s": percentile(t.latencies, 50),
        "p99_latency_s": percentile(t.latencies, 99),
        "server_cpu_s": cpu,
        "requests_per_server_cpu_s": t.all_ok / cpu if cpu else None,
        "load_average_1m": round(load, 2),
    }
    progress(
        f"throughput {c.name}: {t.rps:.1f} req/s, {t.tokens_per_s:.0f} tokens/s, {t.errors} errors, "
        f"{row['requests_per_server_cpu_s'] or 0:.1f} req per server CPU-second (load average {load:.1f})"
    )
    return row


def run(*, quick: bool, command: str) -> dict[str, Any]:
    from bench.models import tokenizer_dir

    manifest = tokenizer_dir().parent / "model_groups.json"  # the demo models
    seconds, warmup = (5.0, 1.5) if quick else (20.0, 3.0)
    rows = [measure(c, manifest, seconds, warmup) for c in configs()]
    doc = {
        "what": "closed-loop throughput of the pod server and the fleet on CPU devices",
        "model": MODEL,
        "max_tokens": MAX_TOKENS,
        "torch_threads_per_device": 1,
        "rows": rows,
        "notes": [
            "cpu:N devices share this machine's cores; a 2-core host cannot scale past 2 busy devices",
            "concurrency is the number of clients sending back to back",
            "this machine is shared: see load_average_1m per row; requests_per_server_cpu_s (completed requests per "
            "CPU-second the serving processes used) is the figure least disturbed by other work",
        ],
    }
    write_result("throughput", doc, quick=quick, command=command)
    plot(doc)
    return doc


def plot(doc: dict[str, Any]) -> None:
    plt = pyplot()
    rows = doc["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    labels = [r["config"].replace(" workers", "\nworkers").replace(" (gpufleet up)", "") for r in rows]
    for ax, key, title in ((axes[0], "requests_per_s", "requests/s"), (axes[1], "tokens_per_s", "generated tokens/s")):
        ax.bar(range(len(rows)), [r[key] for r in rows], color=["C0" if r["kind"] == "pod" else "C1" for r in rows])
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels(labels, fontsize=7)
        ax.set_title(title, fontsize=10)
    fig.suptitle(f"Throughput, {doc['model']}, max_tokens={doc['max_tokens']} (CPU devices)", fontsize=11)
    save_figure(fig, "throughput")


def summarize(doc: dict[str, Any]) -> str:
    lines = [
        "## Throughput",
        "",
        f"Model {doc['model']}, max_tokens {doc['max_tokens']}, one torch thread per device.",
        "",
    ]
    rows = [
        [
            r["config"],
            r["concurrency"],
            r["requests_per_s"],
            r["tokens_per_s"],
            r["p50_latency_s"],
            r["p99_latency_s"],
            r.get("requests_per_server_cpu_s"),
            r.get("load_average_1m"),
            r["errors"],
        ]
        for r in doc["rows"]
    ]
    header = ["configuration", "clients", "req/s", "tokens/s", "p50 s", "p99 s", "req/CPU-s", "load avg", "errors"]
    lines.append(md_table(header, rows))
    lines += ["", "![throughput](throughput.png)"]
    return "\n".join(lines)
