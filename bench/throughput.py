"""Throughput by concurrency (issue 8): aggregate completion tokens/s and time to first token
at concurrency 1, 8, 32 and 64, in one run, with the tiny demo chat model (32 completion
tokens per chat request), for

- ``serve``: one ``gpufleet serve`` on cpu:0, streaming chat straight to it;
- ``up``: ``gpufleet up`` with one CPU device (the router in front of one pod);
- ``baseline``: the batch-1 token loop the pod server ran before batching
  (bench/baseline_loop.py), in-process, one thread per client;
- ``cb_direct``: transformers' continuous-batching manager driven in-process
  (bench/cb_direct.py): what the library batches before any HTTP.

Clients are closed-loop (each sends its next request when its last one ends), bounded in
time (warm-up, then the measured window; no new request after it) and in count. Served
targets stream (``stream_options.include_usage``): time to first token is measured at the
client, completion tokens come from the usage the server reports. Tokens/s counts the
tokens generated inside the window, each request's spread evenly from its first token to
its end (bench/sweep.py).

Targets (issue 8, on the 2-core CPU): for each served target, tokens/s at c=32 >= 8x the same
server's figure at c=1 in the same run, and p99 time to first token at c=32 < 2 s. Issue 21's,
when both lines run: ``serve`` >= 0.9x ``cb_direct`` at c=1 and c=32.

``python -m bench.throughput [--quick]`` or ``python -m bench throughput [--quick]``.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from bench.common import md_table, progress, pyplot, save_figure, write_result
from bench.sweep import Record, add_ratios, library_targets, summarize_point, targets

MAX_TOKENS = 32
MODEL = "tiny-chat"
CONCURRENCY = (1, 8, 32, 64)
SERVED = ("serve", "up")
LINES = (*SERVED, "baseline", "cb_direct")
LABELS = {
    "serve": "gpufleet serve, cpu:0",
    "up": "gpufleet up, 1 CPU device (router + pod)",
    "baseline": "batch-1 loop, in-process (before batching)",
    "cb_direct": "transformers CB manager, in-process",
}
MAX_REQUESTS_PER_POINT = 20_000
# A pod's queue must hold every client's request when the engine runs fewer at once.
SERVER_ENV = {"MAX_QUEUE_PER_DEVICE": "512"}

QUIET_ENV = {
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "TOKENIZERS_PARALLELISM": "false",
}

Sweep = Callable[[int, float], list[Record]]  # (concurrency, stop_at) -> records


def sweep(
    name: str, measure: Sweep, concurrency: Sequence[int], seconds: float, warmup_s: float, cpu: Callable[[], float]
) -> list[dict[str, Any]]:
    """One line: a closed-loop point per concurrency, each with its own warm-up."""
    points = []
    for c in concurrency:
        t0 = time.perf_counter()
        start, end = t0 + warmup_s, t0 + warmup_s + seconds
        cpu0, own0 = cpu(), time.process_time()
        records = measure(c, end)
        p = summarize_point(records, start, end, c)
        p["elapsed_s"] = round(time.perf_counter() - t0, 2)
        p["server_cpu_s"] = round(cpu() - cpu0, 2)
        p["client_cpu_s"] = round(time.process_time() - own0, 2)  # this process: clients, or the in-process model
        p["load_average_1m"] = round(os.getloadavg()[0], 2)
        points.append(p)
        progress(
            f"throughput {name} c={c}: {p['tokens_per_s'] or 0:.0f} tokens/s, p50/p99 TTFT "
            f"{p['p50_ttft_s'] or float('nan'):.3f}/{p['p99_ttft_s'] or float('nan'):.3f} s, "
            f"{p['requests_completed_in_window']} requests, {p['errors']} errors"
            + (f" ({p['error_sample']})" if p["error_sample"] else "")
            + f", load average {p['load_average_1m']}"
        )
    return add_ratios(points)


def served_line(
    name: str, manifest: Path, concurrency: Sequence[int], seconds: float, warmup_s: float, env: Mapping[str, str]
) -> dict[str, Any]:
    from bench.load import closed_loop_stream
    from bench.load import run as run_async
    from bench.procs import Fleet

    progress(f"throughput {name}: starting {LABELS[name]}")
    full_env = {**SERVER_ENV, **env}
    started = time.monotonic()
    fleet = (
        Fleet.up(["cpu:0"], manifest, policy="affinity", env=full_env)
        if name == "up"
        else Fleet.pod(["cpu:0"], manifest, env=full_env)
    )
    with fleet:
        ready_s = time.monotonic() - started

        def measure(c: int, stop_at: float) -> list[Record]:
            records: list[Record] = run_async(
                closed_loop_stream(
                    fleet.url,
                    MODEL,
                    concurrency=c,
                    max_tokens=MAX_TOKENS,
                    stop_at=stop_at,
                    max_requests=MAX_REQUESTS_PER_POINT,
                )
            )
            return records

        points = sweep(name, measure, concurrency, seconds, warmup_s, fleet.cpu_seconds)
    return {
        "name": name,
        "label": LABELS[name],
        "kind": "served",
        "ready_s": round(ready_s, 1),
        "env": full_env,
        "points": points,
    }


def in_process_line(
    name: str, model_dir: Path, concurrency: Sequence[int], seconds: float, warmup_s: float
) -> dict[str, Any]:
    from bench.baseline_loop import Batch1Model, Params, chat_prompt_ids
    from bench.load import chat_body

    m = Batch1Model.load(model_dir)
    prompt = chat_prompt_ids(m.tokenizer, chat_body(MODEL, MAX_TOKENS)["messages"])
    extra: dict[str, Any] = {}
    if name == "baseline":
        from bench.baseline_loop import closed_loop

        def measure(c: int, stop_at: float) -> list[Record]:
            return closed_loop(
                m, prompt, Params(MAX_TOKENS), concurrency=c, stop_at=stop_at, max_requests=MAX_REQUESTS_PER_POINT
            )

        points = sweep(name, measure, concurrency, seconds, warmup_s, lambda: 0.0)
    else:
        from bench import cb_direct

        mgr = cb_direct.start_manager(
            m.model, max_new_tokens=MAX_TOKENS, max_concurrency=max(concurrency), prompt_tokens=len(prompt)
        )
        extra = {"num_blocks": mgr.num_blocks, "page_size": mgr.page_size, "attention": mgr.attn_implementation}
        try:

            def measure(c: int, stop_at: float) -> list[Record]:
                return cb_direct.closed_loop(
                    mgr,
                    prompt,
                    concurrency=c,
                    max_new_tokens=MAX_TOKENS,
                    stop_at=stop_at,
                    max_requests=MAX_REQUESTS_PER_POINT,
                )

            points = sweep(name, measure, concurrency, seconds, warmup_s, lambda: 0.0)
        finally:
            cb_direct.stop_manager(mgr)
    for p in points:  # one process: what it used is the model's work, not a client's
        p["server_cpu_s"] = p.pop("client_cpu_s")
    return {"name": name, "label": LABELS[name], "kind": "in-process", "prompt_tokens": len(prompt), **extra,
            "points": points}  # fmt: skip


def run(
    *,
    quick: bool,
    command: str,
    lines: Sequence[str] = LINES,
    concurrency: Sequence[int] = CONCURRENCY,
    seconds: float | None = None,
    warmup_s: float | None = None,
    env: Mapping[str, str] | None = None,
    torch_threads: int = 1,
) -> dict[str, Any]:
    import torch

    from bench.models import tokenizer_dir
    from bench.procs import router_available

    demo = tokenizer_dir().parent  # the demo models, built once
    manifest = demo / "model_groups.json"
    default_s, default_w = (3.0, 1.0) if quick else (10.0, 2.0)
    seconds = seconds if seconds is not None else default_s
    warmup_s = warmup_s if warmup_s is not None else default_w
    env = {"TORCH_THREADS": str(torch_threads), **(env or {})}
    torch.set_num_threads(torch_threads)  # the in-process lines get what one device gets
    done: list[dict[str, Any]] = []
    skipped: list[str] = []
    for name in lines:
        if name == "up" and not router_available():
            skipped.append("up: the router is not installed")
            continue
        if name in SERVED:
            done.append(served_line(name, manifest, concurrency, seconds, warmup_s, env))
        else:
            done.append(in_process_line(name, demo / MODEL, concurrency, seconds, warmup_s))
    by_name = {ln["name"]: ln["points"] for ln in done}
    doc = {
        "what": "aggregate completion tokens/s and time to first token by concurrency, served and in-process",
        "model": MODEL,
        "max_tokens": MAX_TOKENS,
        "concurrency": list(concurrency),
        "seconds_per_point": seconds,
        "warmup_s_per_point": warmup_s,
        "torch_threads": torch_threads,
        "lines": done,
        "targets": [
            t.as_dict()
            for t in (*targets(by_name, [n for n in SERVED if n in by_name]), *library_targets(by_name))
        ],
        "skipped": skipped,
        "notes": [
            "closed loop: each client sends its next request when its last one ends; no new request after the window",
            "tokens/s: tokens generated inside the window (each request's usage spread from its first token to its "
            "end); vs_c1: tokens/s over the same line's figure at c=1 in this run",
            "TTFT: client side, to the first chunk with text, of requests sent inside the window",
            "served lines count completion tokens from the usage chunk (stream_options.include_usage)",
            "in-process lines: server_cpu_s is this process's CPU time (the model's work)",
            "a target at a point with errors is missed; cpu:0 shares this machine's cores with the client",
        ],
    }
    write_result("throughput", doc, quick=quick, command=command)
    plot(doc)
    return doc


def plot(doc: dict[str, Any]) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {"serve": "o-", "up": "s-", "baseline": "^--", "cb_direct": "x:"}
    for ln in doc["lines"]:
        pts = ln["points"]
        cs = [p["concurrency"] for p in pts]
        axes[0].plot(cs, [p["tokens_per_s"] for p in pts], styles.get(ln["name"], "o-"), label=ln["label"])
        axes[1].plot(cs, [p["p99_ttft_s"] for p in pts], styles.get(ln["name"], "o-"), label=ln["label"])
    for ax, title in ((axes[0], "aggregate completion tokens/s"), (axes[1], "p99 time to first token (s)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(doc["concurrency"])
        ax.set_xticklabels([str(c) for c in doc["concurrency"]])
        ax.set_xlabel("concurrent clients")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[1].set_yscale("log")
    axes[1].axhline(2.0, color="grey", lw=0.8, ls="--")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    fig.suptitle(
        f"Throughput by concurrency, {doc['model']}, {doc['max_tokens']} tokens per request "
        f"(CPU, {doc['torch_threads']} torch thread)",
        fontsize=11,
    )
    save_figure(fig, "throughput")


def overview(doc: dict[str, Any]) -> list[str]:
    """The targets, one line each, for SUMMARY.md's 'Targets at a glance'."""

    def fig(t: dict[str, Any]) -> str:
        if t["figure"] is None:
            return "not measured"
        return f"{t['figure']:.2f}x" if "tokens/s" in t["target"] else f"{t['figure']:.3f} s"

    return [f"- {t['target']}: {fig(t)} → {'met' if t['met'] else 'MISSED'}." for t in doc.get("targets", [])]


def summarize(doc: dict[str, Any]) -> str:
    if "lines" not in doc:  # a result written before the concurrency sweep
        return "## Throughput\n\n(throughput.json is of an older format: rerun `python -m bench throughput`.)"
    lines = [
        "## Throughput by concurrency",
        "",
        f"Model {doc['model']}, {doc['max_tokens']} completion tokens per chat request, {doc['torch_threads']} torch "
        f"thread; closed-loop clients, {doc['seconds_per_point']:g} s measured per point after "
        f"{doc['warmup_s_per_point']:g} s of warm-up. Served lines stream; TTFT at the client; tokens from usage.",
        "",
    ]
    rows = []
    for ln in doc["lines"]:
        for p in ln["points"]:
            rows.append(
                [
                    ln["label"],
                    p["concurrency"],
                    p["tokens_per_s"],
                    f"{p['vs_c1']:.2f}x" if p.get("vs_c1") is not None else None,
                    p["p50_ttft_s"],
                    p["p99_ttft_s"],
                    p["p99_latency_s"],
                    p["requests_completed_in_window"],
                    p["errors"],
                    p.get("server_cpu_s"),
                    p.get("load_average_1m"),
                ]
            )
    header = ["line", "clients", "tokens/s", "vs c=1", "p50 TTFT s", "p99 TTFT s", "p99 s", "requests", "errors",
              "server CPU s", "load avg"]  # fmt: skip
    lines.append(md_table(header, rows))
    lines += ["", "Targets (issue 8):", "", *overview(doc)]
    lines += ["", "![throughput](throughput.png)"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.throughput", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 s per point after 1 s of warm-up (default 10 s + 2 s)")
    parser.add_argument("--lines", default=",".join(LINES), help=f"comma-separated, of {', '.join(LINES)}")
    parser.add_argument("--concurrency", default=",".join(map(str, CONCURRENCY)), help="comma-separated client counts")
    parser.add_argument("--seconds", type=float, default=None, help="measured seconds per point")
    parser.add_argument("--warmup", type=float, default=None, help="warm-up seconds per point")
    parser.add_argument("--torch-threads", type=int, default=1, help="TORCH_THREADS of the servers and in-process")
    parser.add_argument(
        "--env", action="append", default=[], metavar="KEY=VALUE", help="extra pod server setting (repeatable)"
    )
    args = parser.parse_args(argv)
    for key, value in QUIET_ENV.items():  # before anything imports transformers
        os.environ.setdefault(key, value)
    lines = [s for s in args.lines.split(",") if s]
    bad = [s for s in lines if s not in LINES]
    if bad:
        parser.error(f"unknown line(s) {', '.join(bad)}; choose from {', '.join(LINES)}")
    env = dict(kv.split("=", 1) for kv in args.env if "=" in kv)
    given = argv if argv is not None else sys.argv[1:]
    command = "python -m bench.throughput " + " ".join(shlex.quote(a) for a in given)
    run(
        quick=args.quick,
        command=command.strip(),
        lines=lines,
        concurrency=[int(c) for c in args.concurrency.split(",")],
        seconds=args.seconds,
        warmup_s=args.warmup,
        env=env,
        torch_threads=args.torch_threads,
    )
    from bench.__main__ import write_summary

    write_summary()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
