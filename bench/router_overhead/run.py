"""Router overhead: latency direct vs through the router, chunk delays, saturation.

Starts two echo backends and a real ``gpufleet router`` process pinned to one core
(``taskset``), and, when it is installed, the peer vllm-router (the vLLM project's Rust router,
in a virtualenv of its own: never a project or CI dependency) pinned to the same core; runs
each case for a few seconds from this process on the other core, prints a table and writes
``bench/results/router_overhead.json`` with the ratios to the peer as its ``targets``.

    python -m bench.router_overhead [--duration 3] [--router-core 0] [--client-core 1] [--peer PATH|none]
                                    [--profile]

``--profile`` then runs the non-streaming c=16 case once more with py-spy (when installed) sampling
the router, and records where its CPU went, by part of the request path, as ``profile_c16``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil  # type: ignore[import-untyped]

from bench.router_overhead import profile
from bench.router_overhead.loadgen import Sample, run_load
from gpufleet.local.processes import free_port, http_ok, wait_until
from tests.support.echo_backend import loop_factory

RESULTS = Path(__file__).resolve().parent.parent / "results" / "router_overhead.json"
TARGETS = {"added_p50_ms_c1": 1.0, "added_p99_ms_c1": 3.0, "max_chunk_delay_ms": 5.0, "router_rps_c16": 1500.0}
CHAT = json.dumps({"model": "echo-chat", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 8}).encode()
CHAT_STREAM = json.dumps(
    {"model": "echo-chat", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 8, "stream": True}
).encode()


def pinned(cmd: list[str], core: int | None) -> list[str]:
    if core is None or shutil.which("taskset") is None:
        return cmd
    return ["taskset", "-c", str(core), *cmd]


def wait_ready(url: str, timeout_s: float = 60.0) -> None:
    wait_until(lambda: http_ok(url, timeout_s=1.0), timeout_s, url, interval_s=0.1)


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summarise(samples: list[Sample], elapsed: float) -> dict[str, Any]:
    ok = [s for s in samples if s.status == 200]
    lat = [s.latency_s * 1000 for s in ok]
    delays = [d * 1000 for s in ok for d in s.chunk_delays_s]
    gaps = [g * 1000 for s in ok for g in s.chunk_gaps_s]
    out: dict[str, Any] = {
        "requests": len(samples),
        "errors": len(samples) - len(ok),
        "rps": round(len(samples) / elapsed, 1) if elapsed else 0.0,
        "p50_ms": round(pct(lat, 0.50), 3),
        "p99_ms": round(pct(lat, 0.99), 3),
        "mean_ms": round(statistics.fmean(lat), 3) if lat else None,
    }
    if delays:
        out.update(
            {
                "chunk_delay_p50_ms": round(pct(delays, 0.5), 3),
                "chunk_delay_p99_ms": round(pct(delays, 0.99), 3),
                "chunk_delay_max_ms": round(max(delays), 3),
                "chunk_extra_gap_max_ms": round(max(gaps), 3) if gaps else None,
            }
        )
    return out


def cpu_seconds(pid: int | None) -> float:
    if pid is None:
        return 0.0
    t = psutil.Process(pid).cpu_times()
    return float(t.user + t.system)


async def measure(port: int, stream: bool, concurrency: int, duration_s: float, pid: int | None) -> dict[str, Any]:
    """Warm up, then load for ``duration_s``; with ``pid``, also the CPU that process spent per request."""
    body = CHAT_STREAM if stream else CHAT
    await run_load("127.0.0.1", port, "/v1/chat/completions", body, concurrency, min(0.5, duration_s), 100_000)
    cpu_before = cpu_seconds(pid)
    samples, elapsed = await run_load(
        "127.0.0.1", port, "/v1/chat/completions", body, concurrency, duration_s, 1_000_000
    )
    out = summarise(samples, elapsed)
    if pid is not None and samples:
        # Contention-proof: what one request costs the router's core, and the rate one core could give.
        per_request = (cpu_seconds(pid) - cpu_before) / len(samples)
        out["router_cpu_us_per_req"] = round(per_request * 1e6, 1)
        out["router_rps_per_core"] = round(1 / per_request, 1) if per_request else None
    return out


def print_table(rows: list[dict[str, Any]]) -> None:
    cols = [
        "target",
        "stream",
        "conc",
        "requests",
        "errors",
        "rps",
        "p50_ms",
        "p99_ms",
        "chunk_delay_p99_ms",
        "chunk_delay_max_ms",
        "chunk_extra_gap_max_ms",
    ]
    print(" | ".join(f"{c[:12]:>12}" for c in cols))
    for r in rows:
        print(" | ".join(f"{r.get(c) if r.get(c) is not None else '':>12}" for c in cols))


PEER_VENV_ROUTER = Path.home() / ".cache" / "gpufleet" / "peers" / "vllm-router" / "bin" / "vllm-router"
# The targets against the peer, on one core each (non-streaming).
PEER_TARGETS = {"rps_c16_vs_peer": 0.8, "added_p50_c1_vs_peer": 1.5}


def find_peer(given: str | None) -> str | None:
    """vllm-router, from --peer, its own virtualenv (see bench/README.md) or PATH; None: no peer."""
    if given == "none":
        return None
    for candidate in (given, str(PEER_VENV_ROUTER), shutil.which("vllm-router")):
        if candidate and Path(candidate).exists():
            return candidate
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="gpufleet router overhead benchmark")
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per case")
    parser.add_argument("--router-core", type=int, default=0)
    parser.add_argument("--client-core", type=int, default=1, help="this process and the echo backends")
    parser.add_argument("--chunks", type=int, default=8)
    parser.add_argument("--chunk-gap-ms", type=float, default=2.0)
    parser.add_argument("--log-level", default="INFO", help="router LOG_LEVEL (INFO logs every decision)")
    parser.add_argument(
        "--peer", default=None, help="the vllm-router binary (default: its own virtualenv, then PATH); 'none': skip"
    )
    parser.add_argument("--profile", action="store_true", help="sample the router (py-spy) at non-streaming c=16")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    profiled: dict[str, float] | None = None

    if args.client_core is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {args.client_core})
    load_before = os.getloadavg()[0]
    logs = Path(tempfile.mkdtemp(prefix="router-bench-"))
    echo_ports, router_port, peer_port = [free_port(), free_port()], free_port(), free_port()
    peer = find_peer(args.peer)
    procs: list[subprocess.Popen[bytes]] = []

    def spawn(name: str, cmd: list[str], core: int | None, env: dict[str, str] | None = None) -> int:
        procs.append(
            subprocess.Popen(pinned(cmd, core), env=env, stdout=subprocess.DEVNULL, stderr=(logs / name).open("wb"))
        )
        return procs[-1].pid  # taskset execs the command: the same process

    try:
        for i, port in enumerate(echo_ports):
            echo = [sys.executable, "-m", "tests.support.echo_backend", "--port", str(port), "--name", f"echo-{i}"]
            spawn(f"echo-{i}.log", [*echo, "--chunks", str(args.chunks), "--chunk-gap-ms", str(args.chunk_gap_ms)],
                  args.client_core)
        backends = [f"http://127.0.0.1:{p}" for p in echo_ports]
        env = {**os.environ, "POD_URLS": ",".join(backends), "PORT": str(router_port), "HOST": "127.0.0.1",
               "LOG_LEVEL": args.log_level}
        targets = [("direct", echo_ports[0], None),
                   ("router", router_port, spawn("router.log", [sys.executable, "-m", "gpufleet.cli", "router"],
                                                 args.router_core, env))]
        if peer is not None:
            cmd = [peer, "--host", "127.0.0.1", "--port", str(peer_port), "--worker-urls", *backends,
                   "--policy", "round_robin", "--log-level", "warning"]
            targets.append(("vllm-router", peer_port, spawn("vllm-router.log", cmd, args.router_core)))
        for port in echo_ports:
            wait_ready(f"http://127.0.0.1:{port}/ready")
        wait_ready(f"http://127.0.0.1:{router_port}/ready")
        if peer is not None:
            wait_ready(f"http://127.0.0.1:{peer_port}/health")
        rows: list[dict[str, Any]] = []
        with asyncio.Runner(loop_factory=loop_factory()) as runner:
            for stream in (False, True):
                for conc in (1, 16):
                    for target, port, pid in targets:
                        figures = runner.run(measure(port, stream, conc, args.duration, pid))
                        rows.append({"target": target, "stream": stream, "conc": conc, **figures})
                        print(f"  {target:11} stream={stream!s:5} c={conc:<2} {figures}", file=sys.stderr, flush=True)
            if args.profile:
                # A pass of its own after the measured ones: sampling costs CPU (on the client's core).
                _, port, pid = targets[1]
                assert pid is not None  # the router's process, spawned above
                sampler = profile.start(pid, args.duration, logs / "router.raw")
                runner.run(measure(port, False, 16, args.duration, pid))
                if sampler is not None and sampler.wait(60) == 0:
                    profiled = profile.summarise(logs / "router.raw")
    finally:
        for p in procs:
            p.send_signal(signal.SIGINT)
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()

    def row(target: str, stream: bool, conc: int) -> dict[str, Any]:
        return next(r for r in rows if r["target"] == target and r["stream"] == stream and r["conc"] == conc)

    def added(target: str, key: str, stream: bool = False) -> float:
        return round(row(target, stream, 1)[key] - row("direct", stream, 1)[key], 3)

    figures = {
        "added_p50_ms_c1": added("router", "p50_ms"),
        "added_p99_ms_c1": added("router", "p99_ms"),
        "added_p50_ms_c1_stream": added("router", "p50_ms", True),
        "added_p99_ms_c1_stream": added("router", "p99_ms", True),
        "max_chunk_delay_ms": row("router", True, 1)["chunk_delay_max_ms"],
        "max_chunk_delay_ms_c16": row("router", True, 16)["chunk_delay_max_ms"],
        "router_rps_c16": row("router", False, 16)["rps"],
        "router_cpu_us_per_req_c16": row("router", False, 16).get("router_cpu_us_per_req"),
        "router_rps_per_core_c16": row("router", False, 16).get("router_rps_per_core"),
        "direct_rps_c16": row("direct", False, 16)["rps"],
    }
    verdict = {
        "added_p50_ms_c1": figures["added_p50_ms_c1"] <= TARGETS["added_p50_ms_c1"],
        "added_p99_ms_c1": figures["added_p99_ms_c1"] <= TARGETS["added_p99_ms_c1"],
        "max_chunk_delay_ms": figures["max_chunk_delay_ms"] <= TARGETS["max_chunk_delay_ms"],
        "router_rps_c16": figures["router_rps_c16"] >= TARGETS["router_rps_c16"],
    }
    target_list: list[dict[str, Any]] = []
    if peer is not None:
        figures |= {
            "peer_added_p50_ms_c1": added("vllm-router", "p50_ms"),
            "peer_rps_c16": row("vllm-router", False, 16)["rps"],
            "peer_cpu_us_per_req_c16": row("vllm-router", False, 16).get("router_cpu_us_per_req"),
            "peer_rps_c16_stream": row("vllm-router", True, 16)["rps"],
            "router_rps_c16_stream": row("router", True, 16)["rps"],
        }
        rps_ratio = figures["router_rps_c16"] / figures["peer_rps_c16"]
        p50_ratio = figures["added_p50_ms_c1"] / max(figures["peer_added_p50_ms_c1"], 1e-6)
        figures |= {"rps_c16_vs_peer": round(rps_ratio, 3), "added_p50_c1_vs_peer": round(p50_ratio, 3)}
        target_list = [
            {"target": "non-streaming c=16 answers/s >= 0.8x vllm-router's (one core each)",
             "measured": figures["rps_c16_vs_peer"], "met": rps_ratio >= PEER_TARGETS["rps_c16_vs_peer"]},
            {"target": "added p50 at c=1 <= 1.5x vllm-router's", "measured": figures["added_p50_c1_vs_peer"],
             "met": p50_ratio <= PEER_TARGETS["added_p50_c1_vs_peer"]},
        ]
    result = {
        "benchmark": "router_overhead",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "load_avg_1m_before": load_before,
        },
        "setup": {
            "duration_s": args.duration,
            "router_core": args.router_core,
            "client_core": args.client_core,
            "backends": len(echo_ports),
            "chunks": args.chunks,
            "chunk_gap_ms": args.chunk_gap_ms,
            "router_log_level": args.log_level,
            "peer": peer,
        },
        "rows": rows,
        "figures": figures,
        "targets": target_list,
        "profile_c16": profiled,
        "overhead_targets": TARGETS,
        "met": verdict,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print_table(rows)
    print()
    for key, value in figures.items():
        mark = "" if key not in verdict else ("  ok" if verdict[key] else "  MISSED")
        print(f"{key:>26}: {value}{mark}")
    for t in target_list:
        print(f"{'met' if t['met'] else 'MISSED':>6}: {t['target']}: {t['measured']}")
    if profiled:
        print("\nrouter CPU by part (non-streaming c=16, py-spy):")
        for part, share in profiled.items():
            print(f"{share:>8.1f}%  {part}")
    print(f"\nload average (1 min) before/after: {load_before:.2f}/{os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    print(f"written: {args.out}")
    return 0
