"""``python -m bench [PART ...] [--quick]``: run the benchmarks and write bench/results/."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from collections.abc import Callable
from typing import Any

# Quiet, offline, before anything imports transformers.
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from bench.common import RESULTS, machine_info, progress, read_result

# In run order: the switch costs feed the simulator.
PARTS = ("switch_cost", "routing_quality", "throughput", "replay", "pool", "autoscale", "engine_peer")
DESCRIPTIONS = {
    "switch_cost": "time to make a group current from disk and from the CPU cache, per GB, vs copy bandwidth",
    "routing_quality": "simulated batched devices: the real policy vs round robin, least load, LRU multiplexing, GIE",
    "throughput": "tokens/s and time to first token at concurrency 1-64: serve, up, batch-1 loop, transformers CB",
    "replay": "a scaled-down trace replayed on gpufleet up per policy, beside the simulator",
    "pool": "6 groups on a 2-pod GpuPool vs 6 dedicated pods on the real control plane, the same trace",
    "autoscale": "a simulated day: pods and residency from demand vs fixed pools and a KubeAI-style rule",
    "engine_peer": "gpufleet serve beside vllm serve (when installed): tokens/s, TTFT, CPU per 1k tokens, c=1-64",
}


def _runner(part: str) -> Callable[..., Any]:
    if part == "switch_cost":
        from bench.switch_cost import run
    elif part == "routing_quality":
        from bench.routing_quality import run
    elif part == "throughput":
        from bench.throughput import run
    elif part == "replay":
        from bench.replay import run
    elif part == "autoscale":
        from bench.autoscale import run
    elif part == "engine_peer":
        from bench.engine_peer import run
    else:
        from bench.pool import run
    return run


def write_summary() -> None:
    from bench import autoscale, engine_peer, pool, replay, routing_quality, switch_cost, throughput

    m = machine_info()
    lines = [
        "# gpufleet benchmarks",
        "",
        "Written by `python -m bench` (see bench/README.md). Each section names the command that produced it.",
        "",
        f"Machine: {m['cpu_model']}, {m['cores']} cores, {m.get('memory_gb')} GB; torch {m.get('torch')}, "
        f"transformers {m.get('transformers')}; device kinds: {', '.join(m['device_kinds'])}"
        + (f" ({', '.join(m['cuda_devices'])})" if m.get("cuda_devices") else "")
        + ".",
    ]
    lines += ["", "## Targets at a glance", "", *_targets_overview()]
    summarizers = {
        "switch_cost": switch_cost.summarize,
        "routing_quality": routing_quality.summarize,
        "throughput": throughput.summarize,
        "replay": replay.summarize,
        "pool": pool.summarize,
        "autoscale": autoscale.summarize,
        "engine_peer": engine_peer.summarize,
    }
    for part in ("routing_quality", "replay", "pool", "autoscale", "switch_cost", "throughput", "engine_peer", "gpu"):
        doc = read_result(part)
        if doc is None:
            continue
        if part == "gpu":
            lines += ["", "## GPU (bench/gpu)", "", "```", str(doc.get("table", "")).rstrip(), "```"]
            continue
        lines += ["", summarizers[part](doc), ""]
        lines.append(
            f"_Command: `{doc.get('command')}`{' (quick)' if doc.get('quick') else ''}; load average at start "
            f"{doc.get('machine', {}).get('load_average_at_start')}._"
        )
    path = RESULTS / "SUMMARY.md"
    path.write_text("\n".join(lines).rstrip() + "\n")
    progress(f"wrote {path}")


def _targets_overview() -> list[str]:
    """One line per target of issue 5, with the figure that decides it."""
    out: list[str] = []
    rq = read_result("routing_quality")
    if rq and isinstance(rq.get("targets"), list):
        by_target: dict[str, list[dict[str, Any]]] = {}
        for t in rq["targets"]:
            by_target.setdefault(t["target"], []).append(t)
        for target, rows in by_target.items():
            met = sum(r["met"] for r in rows)
            out.append(f"- Routing (simulated), {target}: met in {met} of {len(rows)} scenarios.")
    sc = read_result("switch_cost")
    if sc:
        for kind, tt in sc.get("targets", {}).items():
            out.append(
                f"- Disk path faster than from_pretrained + .to ({kind}, {tt['model_gb']:.2f} GB): fast_load at "
                f"{tt['disk_fast_vs_from_pretrained_speedup']:.2f}x its speed from storage, "
                f"{tt.get('disk_warm_fast_vs_from_pretrained_speedup', float('nan')):.2f}x from the page cache."
            )
    gpu = read_result("gpu")
    if gpu and gpu.get("targets") and not gpu.get("dry_run"):
        g = gpu["targets"]
        out.append(
            f"- CPU-cache path on the GPU ≥ 70% of pinned H2D: {100 * g['cache_share_of_pinned_h2d']:.0f}% "
            f"({'met' if g['cache_target_met'] else 'MISSED'}); disk: fast_load "
            f"{g['disk_fast_vs_from_pretrained_speedup']:.2f}x from_pretrained + .to ({gpu.get('device')})."
        )
    else:
        out.append("- CPU-cache path on a GPU ≥ 70% of pinned H2D: not measured here (no GPU); run bench/gpu.")
    if gpu and gpu.get("cb_sweep") and not gpu.get("dry_run"):
        models = gpu["cb_sweep"].get("models", {})
        cells = []
        for name, m in models.items():
            top = max(m.get("points", []), key=lambda p: p["concurrency"], default=None)
            if top:
                cells.append(
                    f"{name} {top['tokens_per_s'] or 0:,.0f} tokens/s at c={top['concurrency']} "
                    f"({top.get('vs_c1') or 0:.1f}x c=1)"
                )
        shown = "; ".join(cells) or "no point measured"
        out.append(f"- Continuous batching on the GPU ({gpu.get('device')}): {shown}.")
    tp = read_result("throughput")
    if tp and "lines" in tp:
        from bench.throughput import overview

        out += overview(tp)
    rp = read_result("replay")
    if rp:
        pairs = ", ".join(f"{p} {v['real']['switches']}/{v['sim']['switches']}" for p, v in rp["policies"].items())
        out.append(f"- Replay on gpufleet up, switches measured/simulated: {pairs}.")
    pl = read_result("pool")
    if pl:
        met = sum(t["met"] for t in pl["targets"])
        out.append(f"- GPU pool vs dedicated pods (real control plane): {met} of {len(pl['targets'])} targets met.")
    au = read_result("autoscale")
    if au and isinstance(au.get("targets"), list):
        met = sum(t["met"] for t in au["targets"])
        missed = "; ".join(
            f"{t['target']}: {t['figure'] if t['figure'] is None else format(t['figure'], '.3g')} (limit {t['limit']})"
            for t in au["targets"]
            if not t["met"]
        )
        out.append(
            f"- Autoscaling on a simulated day: {met} of {len(au['targets'])} targets met"
            + (f"; missed: {missed}." if missed else ".")
        )
    ep = read_result("engine_peer")
    if ep and isinstance(ep.get("targets"), list):
        met = sum(t["met"] for t in ep["targets"])
        out.append(f"- Engine beside vLLM (bench/engine_peer): {met} of {len(ep['targets'])} targets met.")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="gpufleet benchmarks. Parts: " + "; ".join(f"{k}: {v}" for k, v in DESCRIPTIONS.items()),
    )
    parser.add_argument("parts", nargs="*", metavar="PART", help=f"{' | '.join([*PARTS, 'summary'])} (default: all)")
    parser.add_argument("--quick", action="store_true", help="smaller runs: a few minutes in all")
    args = parser.parse_args(argv)
    unknown = [p for p in args.parts if p not in (*PARTS, "summary")]
    if unknown:
        parser.error(f"unknown part(s) {', '.join(unknown)}; choose from {', '.join([*PARTS, 'summary'])}")
    command = "python -m bench " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    parts = [p for p in PARTS if not args.parts or p in args.parts]
    started = time.monotonic()
    failed: list[str] = []
    for part in parts:
        if args.parts == ["summary"]:
            break
        progress(f"=== {part}{' (quick)' if args.quick else ''}: {DESCRIPTIONS[part]}")
        t = time.monotonic()
        try:
            _runner(part)(quick=args.quick, command=command.strip())
        except Exception as exc:  # one broken part must not hide the others' results
            import traceback

            traceback.print_exc()
            progress(f"=== {part} FAILED: {type(exc).__name__}: {exc}")
            failed.append(part)
            continue
        progress(f"=== {part} done in {time.monotonic() - t:.0f}s")
    write_summary()
    progress(f"all done in {time.monotonic() - started:.0f}s" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
