"""The engine beside vLLM (issue 21): the same streaming client against ``gpufleet serve`` and
``vllm serve`` on the same model folder, one after the other, in one run.

Per model (``llama-25m``, ``llama-100m`` from bench/models.py, and the demo ``tiny-chat``), per
output length (32 and 128 tokens, ``ignore_eos`` on both sides so they generate the same
lengths), per concurrency (1, 8, 32, 64): aggregate tokens/s, p50/p99 time to first token, and
server CPU seconds per 1,000 tokens, with gpufleet's ratio to vLLM at each point. Both servers
get float32, one compute thread and 1 GB of KV cache; vLLM runs its engine in the API server's
process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, ``--distributed-executor-backend uni``: the
faster of its front-end modes on 2 cores, ../shared/reference/engine-peers.md).

vLLM stays out of the project: the benchmark finds it at ``--vllm`` (default
``~/.cache/gpufleet/peers/vllm-cpu/bin/vllm``) and runs gpufleet alone when it is missing. The
demo model's 16-wide attention heads are below what vLLM's CPU kernels take, so its vLLM side
is recorded as unsupported.

``python -m bench.engine_peer [--quick]`` or ``python -m bench engine_peer [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from bench.common import md_table, progress, pyplot, save_figure, write_result
from bench.sweep import Record, summarize_point

CONCURRENCY = (1, 8, 32, 64)
LENGTHS = (32, 128)
MODELS = ("llama-25m", "llama-100m", "tiny-chat")
VLLM_UNSUPPORTED = {"tiny-chat": "attention head size 16: vLLM's CPU kernels take 32 and up"}
DEFAULT_VLLM = Path.home() / ".cache" / "gpufleet" / "peers" / "vllm-cpu" / "bin" / "vllm"
SERVED_ID = "m"
CONTEXT = 256
KV_GB = 1.0
MAX_REQUESTS_PER_POINT = 20_000
EXTRA = {"ignore_eos": True}  # both sides generate exactly max_tokens
# Requests in flight at the window's end finish (their tokens inside the window count): 64 sequences of
# 128 tokens at ~100 tokens/s take over a minute, so the default 60 s drain would drop them all.
DRAIN_S = 300.0
TCMALLOC = "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"

Measure = Callable[[int, float], list[Record]]


def model_dir(name: str) -> Path:
    from bench.models import build_llama, tokenizer_dir

    if name == "tiny-chat":
        return tokenizer_dir().parent / "tiny-chat"
    return build_llama(name)


def _cpu_of(pid: int) -> float:
    import psutil

    try:
        proc = psutil.Process(pid)
        procs = [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return 0.0
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def sweep(label: str, measure: Measure, concurrency: Sequence[int], seconds: float, warmup_s: float,
          cpu: Callable[[], float]) -> list[dict[str, Any]]:  # fmt: skip
    points = []
    for c in concurrency:
        t0 = time.perf_counter()
        start, end = t0 + warmup_s, t0 + warmup_s + seconds
        cpu0 = cpu()
        records = measure(c, end)
        p = summarize_point(records, start, end, c)
        used = cpu() - cpu0
        tokens = sum(r.tokens for r in records if r.ok)
        p["server_cpu_s"] = round(used, 2)
        p["server_cpu_s_per_1k_tokens"] = round(1000 * used / tokens, 3) if tokens else None
        p["load_average_1m"] = round(os.getloadavg()[0], 2)
        points.append(p)
        progress(
            f"engine_peer {label} c={c}: {p['tokens_per_s'] or 0:.0f} tokens/s, p50 TTFT "
            f"{p['p50_ttft_s'] or float('nan'):.3f} s, CPU/1k tokens {p['server_cpu_s_per_1k_tokens']}, "
            f"{p['requests_completed_in_window']} requests, {p['errors']} errors"
            + (f" ({p['error_sample']})" if p["error_sample"] else "")
        )
    return points


def _client(url: str, max_tokens: int) -> Measure:
    from bench.load import closed_loop_stream
    from bench.load import run as run_async

    def measure(c: int, stop_at: float) -> list[Record]:
        records: list[Record] = run_async(
            closed_loop_stream(url, SERVED_ID, concurrency=c, max_tokens=max_tokens, stop_at=stop_at,
                               max_requests=MAX_REQUESTS_PER_POINT, extra=EXTRA, drain_timeout_s=DRAIN_S)
        )  # fmt: skip
        return records

    return measure


def gpufleet_server(path: Path, workdir: Path, env: Mapping[str, str]) -> Any:
    from bench.procs import Fleet

    manifest = workdir / "model_groups.json"
    manifest.write_text(json.dumps({"default_group": "g", "groups": {"g": {"models": [
        {"id": SERVED_ID, "source": str(path), "task": "chat", "dtype": "float32", "context_length": CONTEXT}]}}}))
    return Fleet.pod(["cpu:0"], manifest, env={"TORCH_THREADS": "1", "KV_CACHE_GB": str(KV_GB),
                                               "MAX_QUEUE_PER_DEVICE": "512", **env})  # fmt: skip


def vllm_env(vllm: Path) -> dict[str, str]:
    preload = [TCMALLOC] if Path(TCMALLOC).exists() else []
    iomp = next(iter(sorted(vllm.parent.parent.glob("lib/libiomp5.so"))), None)
    if iomp is not None:
        preload.append(str(iomp))
    return {
        "VLLM_CPU_KVCACHE_SPACE": str(int(KV_GB)),
        "VLLM_CPU_OMP_THREADS_BIND": "1",
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        **({"LD_PRELOAD": ":".join(preload)} if preload else {}),
    }


def vllm_server(vllm: Path, path: Path, workdir: Path) -> Any:
    from bench.procs import free_port
    from gpufleet.local.processes import Process

    port = free_port()
    argv = [str(vllm), "serve", str(path), "--served-model-name", SERVED_ID, "--dtype", "float32",
            "--max-model-len", str(CONTEXT), "--host", "127.0.0.1", "--port", str(port),
            "--distributed-executor-backend", "uni", "--max-num-seqs", str(max(CONCURRENCY)),
            ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("VIRTUAL_ENV")}
    proc = Process("vllm", argv, {**env, **vllm_env(vllm)}, workdir / "vllm.log", f"http://127.0.0.1:{port}")
    return proc.start()


def measure_model(
    name: str, vllm: Path | None, lengths: Sequence[int], concurrency: Sequence[int], seconds: float,
    warmup_s: float, env: Mapping[str, str],
) -> dict[str, Any]:  # fmt: skip
    path = model_dir(name)
    out: dict[str, Any] = {"model": name, "path": str(path), "runs": {}}
    with tempfile.TemporaryDirectory(prefix="engine-peer-") as tmp:
        work = Path(tmp)
        progress(f"engine_peer {name}: starting gpufleet serve")
        t0 = time.monotonic()
        with gpufleet_server(path, work, env) as fleet:
            out["gpufleet_ready_s"] = round(time.monotonic() - t0, 1)
            for n in lengths:
                out["runs"].setdefault(str(n), {})["gpufleet"] = sweep(
                    f"{name} {n} tokens gpufleet", _client(fleet.url, n), concurrency, seconds, warmup_s,
                    fleet.cpu_seconds,
                )  # fmt: skip
        if name in VLLM_UNSUPPORTED:
            out["vllm_skipped"] = VLLM_UNSUPPORTED[name]
            return out
        if vllm is None:
            out["vllm_skipped"] = "vLLM not installed"
            return out
        progress(f"engine_peer {name}: starting vllm serve (first start compiles: 20-60 s)")
        t0 = time.monotonic()
        proc = vllm_server(vllm, path, work)
        try:
            try:
                proc.wait_ready(300, path="/v1/models")
            except Exception as exc:
                out["vllm_skipped"] = f"vllm serve did not start: {exc}; log: {proc.log_tail(1500)}"
                return out
            out["vllm_ready_s"] = round(time.monotonic() - t0, 1)
            for n in lengths:
                out["runs"][str(n)]["vllm"] = sweep(
                    f"{name} {n} tokens vllm", _client(proc.url, n), concurrency, seconds, warmup_s,
                    lambda: _cpu_of(proc.pid),
                )  # fmt: skip
        finally:
            proc.stop()
    return out


def ratios(doc: dict[str, Any]) -> None:
    """gpufleet / vLLM per point, in place."""
    for m in doc["models"]:
        for run in m["runs"].values():
            ours, theirs = run.get("gpufleet"), run.get("vllm")
            if not ours or not theirs:
                continue
            run["ratio"] = []
            for a, b in zip(ours, theirs, strict=True):
                def r(key: str, a: dict[str, Any] = a, b: dict[str, Any] = b) -> float | None:
                    return round(a[key] / b[key], 3) if a.get(key) and b.get(key) else None

                run["ratio"].append({"concurrency": a["concurrency"], "tokens_per_s": r("tokens_per_s"),
                                     "p50_ttft_s": r("p50_ttft_s"),
                                     "cpu_per_1k_tokens": r("server_cpu_s_per_1k_tokens")})  # fmt: skip


def targets(doc: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for m in doc["models"]:
        for n, run in m["runs"].items():
            ours = run.get("gpufleet") or []
            by_c = {p["concurrency"]: p for p in ours}
            if 32 in by_c and 64 in by_c and by_c[32]["tokens_per_s"]:
                fig = by_c[64]["tokens_per_s"] / by_c[32]["tokens_per_s"]
                out.append({"target": f"{m['model']} {n} tokens: gpufleet tokens/s at c=64 >= 0.95x c=32",
                            "figure": round(fig, 3), "limit": 0.95, "met": fig >= 0.95})  # fmt: skip
            if m["model"] in VLLM_UNSUPPORTED:
                continue
            for x in run.get("ratio") or []:
                c = x["concurrency"]
                if x["tokens_per_s"] is not None:
                    out.append({"target": f"{m['model']} {n} tokens c={c}: tokens/s >= 0.8x vLLM",
                                "figure": x["tokens_per_s"], "limit": 0.8, "met": x["tokens_per_s"] >= 0.8})
                if c <= 32 and x["p50_ttft_s"] is not None:
                    out.append({"target": f"{m['model']} {n} tokens c={c}: p50 TTFT <= 1.2x vLLM",
                                "figure": x["p50_ttft_s"], "limit": 1.2, "met": x["p50_ttft_s"] <= 1.2})
    return out


def run(*, quick: bool, command: str, models: Sequence[str] = MODELS, lengths: Sequence[int] = LENGTHS,
        concurrency: Sequence[int] = CONCURRENCY, seconds: float | None = None, warmup_s: float | None = None,
        vllm: Path | None = DEFAULT_VLLM, env: Mapping[str, str] | None = None) -> dict[str, Any]:  # fmt: skip
    default_s, default_w = (3.0, 1.0) if quick else (10.0, 2.0)
    seconds = seconds if seconds is not None else default_s
    warmup_s = warmup_s if warmup_s is not None else default_w
    found = vllm if vllm is not None and vllm.exists() else None
    if found is None:
        progress(f"engine_peer: vLLM not found at {vllm}: gpufleet alone (see ../shared/reference/engine-peers.md)")
    doc: dict[str, Any] = {
        "what": "gpufleet serve beside vllm serve: tokens/s, TTFT and server CPU per 1k tokens by concurrency",
        "concurrency": list(concurrency),
        "lengths": list(lengths),
        "seconds_per_point": seconds,
        "warmup_s_per_point": warmup_s,
        "settings": {"dtype": "float32", "compute_threads": 1, "kv_cache_gb": KV_GB, "context": CONTEXT,
                     "ignore_eos": True, "temperature": 0, "gpufleet_env": dict(env or {}),
                     "vllm": str(found) if found else None},
        "models": [measure_model(m, found, lengths, concurrency, seconds, warmup_s, env or {}) for m in models],
    }
    ratios(doc)
    doc["targets"] = targets(doc)
    write_result("engine_peer", doc, quick=quick, command=command)
    plot(doc)
    return doc


def plot(doc: dict[str, Any]) -> None:
    plt = pyplot()
    panels = [(m, n) for m in doc["models"] for n in m["runs"]]
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(3.4 * max(1, len(panels)), 3.6), squeeze=False)
    for ax, (m, n) in zip(axes[0], panels, strict=False):
        for side, style in (("gpufleet", "o-"), ("vllm", "s--")):
            pts = m["runs"][n].get(side)
            if pts:
                ax.plot([p["concurrency"] for p in pts], [p["tokens_per_s"] for p in pts], style, label=side)
        ax.set_xscale("log", base=2)
        ax.set_xticks(doc["concurrency"])
        ax.set_xticklabels([str(c) for c in doc["concurrency"]])
        ax.set_title(f"{m['model']}, {n} tokens", fontsize=9)
        ax.set_xlabel("concurrent clients", fontsize=8)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("tokens/s")
    axes[0][0].legend(fontsize=8)
    fig.suptitle("gpufleet serve vs vllm serve (CPU, float32, 1 compute thread, 1 GB KV)", fontsize=10)
    save_figure(fig, "engine_peer")


def summarize(doc: dict[str, Any]) -> str:
    lines = ["## Engine beside vLLM", "", f"{doc['seconds_per_point']:g} s per point after "
             f"{doc['warmup_s_per_point']:g} s of warm-up; float32, 1 compute thread, 1 GB KV, ignore_eos.", ""]
    rows = []
    for m in doc["models"]:
        for n, run in m["runs"].items():
            ours = run.get("gpufleet") or []
            theirs = {p["concurrency"]: p for p in run.get("vllm") or []}
            for p in ours:
                v = theirs.get(p["concurrency"], {})
                ratio = p["tokens_per_s"] / v["tokens_per_s"] if v.get("tokens_per_s") and p["tokens_per_s"] else None
                rows.append([m["model"], n, p["concurrency"], p["tokens_per_s"], v.get("tokens_per_s"),
                             f"{ratio:.2f}x" if ratio else m.get("vllm_skipped", "")[:40], p["p50_ttft_s"],
                             v.get("p50_ttft_s"), p["server_cpu_s_per_1k_tokens"],
                             v.get("server_cpu_s_per_1k_tokens")])  # fmt: skip
    lines.append(md_table(["model", "tokens", "clients", "gpufleet tok/s", "vLLM tok/s", "ratio", "gpufleet p50 TTFT",
                           "vLLM p50 TTFT", "gpufleet CPU s/1k", "vLLM CPU s/1k"], rows))  # fmt: skip
    met = sum(1 for t in doc.get("targets", []) if t["met"])
    lines += ["", f"Targets: {met} of {len(doc.get('targets', []))} met.", "", "![engine_peer](engine_peer.png)"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.engine_peer", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 s per point after 1 s of warm-up (default 10 s + 2 s)")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--lengths", default=",".join(map(str, LENGTHS)))
    parser.add_argument("--concurrency", default=",".join(map(str, CONCURRENCY)))
    parser.add_argument("--seconds", type=float, default=None)
    parser.add_argument("--warmup", type=float, default=None)
    parser.add_argument("--vllm", default=str(DEFAULT_VLLM), help="the vllm command ('none': gpufleet alone)")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="extra pod server setting")
    args = parser.parse_args(argv)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    given = argv if argv is not None else sys.argv[1:]
    run(
        quick=args.quick,
        command=("python -m bench.engine_peer " + " ".join(shlex.quote(a) for a in given)).strip(),
        models=[m for m in args.models.split(",") if m],
        lengths=[int(n) for n in args.lengths.split(",")],
        concurrency=[int(c) for c in args.concurrency.split(",")],
        seconds=args.seconds,
        warmup_s=args.warmup,
        vllm=None if args.vllm == "none" else Path(args.vllm).expanduser(),
        env=dict(kv.split("=", 1) for kv in args.env if "=" in kv),
    )
    from bench.__main__ import write_summary

    write_summary()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
