"""GPU benchmark, one bounded run (at most ~8 minutes) on a CUDA machine; a short table last.

1. packages: what is installed (torch with CUDA, transformers, safetensors, the pod
   server's web stack, nvidia-ml-py); sections that need something missing are skipped;
2. the machine's limits: pinned and pageable host-to-device copy bandwidth, host memcpy;
3. group switches on cuda:0 with locally built random Llamas (no downloads): from disk via
   ``from_pretrained`` + ``.to``, via ``fast_load`` (direct and pinned staging), and from
   the CPU cache (``DeviceResidency``: park to pinned memory, activate without blocking);
   GB/s against the pinned copy bandwidth (target: cache path >= 70%);
4. ``/api/gpu_stats`` of a real pod server against NVML read directly, idle and busy;
5. pod-server throughput by NUM_WORKERS_PER_GPU (1, 2, 4);
6. continuous batching (issue 8): tokens/s at 1, 16, 64 and 256 concurrent sequences for a
   0.5B-shaped and a 7B-shaped random-weight Llama in bfloat16, in-process
   (bench/gpu/cb_sweep.py); it runs right after the limits, before the switch sections.

Run: ``bash bench/gpu/run.sh --out "$OUT"`` (or ``python -m bench.gpu``). Every section
checks the time left; a section that would not fit is skipped and says so.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

BUDGET_S = 450.0  # leaves margin inside one 8-minute call
T0 = time.monotonic()

PACKAGES = {
    "torch": "torch",
    "transformers": "transformers",
    "safetensors": "safetensors",
    "tokenizers": "tokenizers",
    "numpy": "numpy",
    "fastapi": "fastapi",
    "uvicorn": "uvicorn",
    "httpx": "httpx",
    "pydantic_settings": "pydantic-settings",
    "prometheus_client": "prometheus-client",
    "pynvml": "nvidia-ml-py",
    "psutil": "psutil",
}
SERVER_NEEDS = ["fastapi", "uvicorn", "httpx", "pydantic_settings", "prometheus_client", "psutil", "pynvml"]


def left() -> float:
    return BUDGET_S - (time.monotonic() - T0)


def say(msg: str) -> None:
    print(f"[gpu {time.monotonic() - T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def check_packages() -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for mod, dist in PACKAGES.items():
        if importlib.util.find_spec(mod) is None:
            found[dist] = None
            continue
        try:
            from importlib.metadata import version

            found[dist] = version(dist)
        except Exception:
            found[dist] = "installed"
    return found


# The target: cuda:0 with bfloat16 models; --dry-run-cpu walks the same code on cpu:0.
DEVICE, DTYPE, MODELS, SERVED = "cuda:0", "bfloat16", ("llama-400m", "llama-1b"), "llama-400m"
MAX_TOKENS = 64
SECTIONS = ("limits", "cb", "switch", "server")
CB_SHAPES = ("llama-0.5b", "llama-7b")
CB_CONCURRENCY = (1, 16, 64, 256)
CB_PROMPT_TOKENS = 64


def dry_run_cpu() -> None:
    global DEVICE, DTYPE, MODELS, SERVED, MAX_TOKENS, CB_SHAPES, CB_CONCURRENCY, CB_PROMPT_TOKENS
    DEVICE, DTYPE, MODELS, SERVED, MAX_TOKENS = "cpu:0", "float32", ("llama-25m",), "llama-25m", 4
    CB_SHAPES, CB_CONCURRENCY, CB_PROMPT_TOKENS = ("tiny-a", "tiny-b"), (1, 4, 16), 16


def section_limits(doc: dict[str, Any]) -> None:
    from bench.switch_cost import h2d_gb_s, memcpy_gb_s

    host = memcpy_gb_s(512 << 20)
    doc["limits"] = {"cpu": {"memcpy_gb_s": host}}
    if DEVICE.startswith("cuda"):
        doc["limits"][DEVICE] = {
            "h2d_pinned_gb_s": h2d_gb_s(DEVICE, 1 << 30, pinned=True),
            "h2d_pageable_gb_s": h2d_gb_s(DEVICE, 1 << 30, pinned=False),
        }
    else:  # dry run: the host copy stands in
        doc["limits"][DEVICE] = {"h2d_pinned_gb_s": host, "h2d_pageable_gb_s": host}
    say(f"limits: {doc['limits']}")


def build_models() -> dict[str, Path]:
    import torch

    from bench.models import build_llama

    if DEVICE.startswith("cuda"):
        torch.set_default_device(DEVICE)  # random init on the GPU is much faster; saved to disk as usual
    try:
        return {n: build_llama(n, dtype=DTYPE) for n in MODELS}
    finally:
        torch.set_default_device(None)


def section_switch(doc: dict[str, Any], models: dict[str, Path]) -> None:
    from bench.models import tokenizer_dir
    from bench.switch_cost import fit_line, measure_device

    other = tokenizer_dir().parent / "tiny-chat"
    rows = measure_device(DEVICE, list(models.items()), other, reps=2)
    doc["results"] = {"cuda": rows}
    doc["fit"] = {
        "cuda": {
            path: fit_line([(r[path]["gb"], r[path]["ready_s"]) for r in rows.values()])
            for path in next(iter(rows.values()))
        }
    }
    pinned = doc["limits"][DEVICE]["h2d_pinned_gb_s"]
    big = rows[max(rows, key=lambda k: rows[k]["from_pretrained"]["gb"])]
    doc["targets"] = {
        "cache_gb_s": big["cache"]["ready_gb_s"],
        "cache_share_of_pinned_h2d": big["cache"]["ready_gb_s"] / pinned,
        "cache_target_met": big["cache"]["ready_gb_s"] >= 0.7 * pinned,
        "disk_fast_vs_from_pretrained_speedup": big["from_pretrained"]["ready_s"] / big["fast_load"]["ready_s"],
    }
    if "fast_load_pinned" in big:
        doc["targets"]["disk_fast_pinned_vs_from_pretrained_speedup"] = (
            big["from_pretrained"]["ready_s"] / big["fast_load_pinned"]["ready_s"]
        )


def _nvml_read() -> dict[str, float]:
    import pynvml
    import torch

    pynvml.nvmlInit()
    try:
        uuid = str(torch.cuda.get_device_properties(0).uuid)
        uuid = uuid if uuid.startswith("GPU-") else f"GPU-{uuid}"
        h = pynvml.nvmlDeviceGetHandleByUUID(uuid)
        mem = pynvml.nvmlDeviceGetMemoryInfo(h)
        util = pynvml.nvmlDeviceGetUtilizationRates(h)
        return {"memory_used": mem.used / 1024**3, "memory_total": mem.total / 1024**3, "utilization": float(util.gpu)}
    finally:
        pynvml.nvmlShutdown()


def _manifest(models: dict[str, Path], name: str) -> Path:
    from bench.models import model_groups_file

    path = models[name].parent / f"gpu-groups-{name}.json"
    entry = {"id": "bench-lm", "source": str(models[name]), "task": "chat", "dtype": DTYPE, "context_length": 512}
    return model_groups_file(path, {"g0": [entry]}, default_group="g0")


def section_stats_and_throughput(doc: dict[str, Any], models: dict[str, Path], seconds: float) -> None:
    import httpx

    from bench.load import closed_loop
    from bench.load import run as run_async
    from bench.procs import Fleet

    manifest = _manifest(models, SERVED)
    rows = []
    for workers in (1, 2, 4):
        if left() < seconds + 60:
            say(f"throughput workers={workers}: skipped, {left():.0f}s left")
            continue
        say(f"pod server on {DEVICE}, NUM_WORKERS_PER_GPU={workers}")
        with Fleet.pod([DEVICE], manifest, env={"NUM_WORKERS_PER_GPU": str(workers)}, timeout_s=150) as fleet:
            if workers == 1:
                doc["gpu_stats"] = {"idle": _compare_stats(fleet.url, httpx)}
            busy: list[dict[str, Any]] = []
            sampler = threading.Thread(target=_sample_later, args=(fleet.url, seconds / 2 + 3.0, busy))
            if workers == 1:
                sampler.start()
            t = run_async(
                closed_loop(
                    fleet.url, "bench-lm", concurrency=2 * workers, seconds=seconds, warmup_s=3.0, max_tokens=MAX_TOKENS
                )
            )
            if workers == 1:
                sampler.join()
                doc["gpu_stats"]["busy"] = busy[0] if busy else None
        rows.append(
            {
                "workers": workers,
                "clients": 2 * workers,
                "requests_per_s": t.rps,
                "tokens_per_s": t.tokens_per_s,
                "errors": t.errors,
            }
        )
        say(f"throughput workers={workers}: {t.rps:.2f} req/s, {t.tokens_per_s:.0f} tokens/s, {t.errors} errors")
    doc["throughput"] = {"model": f"{SERVED} {DTYPE}", "max_tokens": MAX_TOKENS, "rows": rows}


def _sample_later(url: str, delay_s: float, into: list[dict[str, Any]]) -> None:
    """Compare /api/gpu_stats with NVML once, ``delay_s`` from now (mid-load)."""
    import httpx

    time.sleep(delay_s)
    into.append(_compare_stats(url, httpx))


def _compare_stats(url: str, httpx: Any) -> dict[str, Any]:
    api = httpx.get(url + "/api/gpu_stats", timeout=10, trust_env=False).json()
    nv = _nvml_read() if DEVICE.startswith("cuda") else {"memory_used": -1.0, "memory_total": -1.0, "utilization": -1.0}
    dev = (api.get("devices") or {}).get(DEVICE, api)
    return {
        "api_available": api.get("available"),
        "api_memory_used_gb": dev.get("memory_used"),
        "nvml_memory_used_gb": round(nv["memory_used"], 3),
        "api_memory_total_gb": dev.get("memory_total"),
        "nvml_memory_total_gb": round(nv["memory_total"], 3),
        "api_utilization": dev.get("utilization"),
        "nvml_utilization": nv["utilization"],
    }


def section_cb(doc: dict[str, Any], seconds: float, warmup_s: float) -> None:
    from bench.gpu.cb_sweep import DRY_SHAPES, SHAPES, run_sweep

    shapes = [{**SHAPES, **DRY_SHAPES}[n] for n in CB_SHAPES]
    doc["cb_sweep"] = run_sweep(
        device=DEVICE,
        dtype_name="bfloat16" if DEVICE.startswith("cuda") else "float32",
        shapes=shapes,
        concurrency=CB_CONCURRENCY,
        seconds=seconds,
        warmup_s=warmup_s,
        prompt_tokens=CB_PROMPT_TOKENS,
        max_new_tokens=MAX_TOKENS if DEVICE.startswith("cuda") else 16,
        left=left,
        say=say,
    )


def table(doc: dict[str, Any]) -> str:
    out = ["GPU benchmark: " + doc.get("device", "?")]
    lim = doc.get("limits", {}).get(DEVICE)
    if lim:
        out.append(f"  pinned H2D {lim['h2d_pinned_gb_s']:.1f} GB/s | pageable H2D {lim['h2d_pageable_gb_s']:.1f} GB/s")
    for name, r in (doc.get("results", {}).get("cuda") or {}).items():
        gb = r["from_pretrained"]["gb"]
        cells = " | ".join(f"{p} {v['ready_s']:.3f}s ({v['ready_gb_s']:.1f} GB/s)" for p, v in r.items())
        out.append(f"  switch {name} {gb:.2f} GB: {cells}")
    t = doc.get("targets")
    if t:
        out.append(
            f"  cache path {t['cache_gb_s']:.1f} GB/s = {100 * t['cache_share_of_pinned_h2d']:.0f}% of pinned H2D "
            f"(target 70%: {'met' if t['cache_target_met'] else 'MISSED'}); disk: fast_load "
            f"{t['disk_fast_vs_from_pretrained_speedup']:.2f}x from_pretrained+.to"
            + (
                f", pinned staging {t['disk_fast_pinned_vs_from_pretrained_speedup']:.2f}x"
                if "disk_fast_pinned_vs_from_pretrained_speedup" in t
                else ""
            )
        )
    for phase, s in (doc.get("gpu_stats") or {}).items():
        if s:
            out.append(
                f"  /api/gpu_stats vs NVML ({phase}): memory {s['api_memory_used_gb']} vs "
                f"{s['nvml_memory_used_gb']} GB, "
                f"utilization {s['api_utilization']} vs {s['nvml_utilization']} %"
            )
    for r in (doc.get("throughput") or {}).get("rows", []):
        out.append(
            f"  throughput workers={r['workers']}: {r['requests_per_s']:.2f} req/s, "
            f"{r['tokens_per_s']:.0f} tokens/s ({r['errors']} errors)"
        )
    if doc.get("cb_sweep"):
        from bench.gpu.cb_sweep import table_lines

        out += table_lines(doc["cb_sweep"])
    for s in doc.get("skipped", []):
        out.append(f"  skipped: {s}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.gpu", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default=None, help="folder for gpu.json (default: bench/results)")
    parser.add_argument("--check", action="store_true", help="only report packages and devices, then exit")
    parser.add_argument("--seconds", type=float, default=12.0, help="measured seconds per throughput configuration")
    parser.add_argument("--dry-run-cpu", action="store_true", help="walk every section on cpu:0 with a small model")
    parser.add_argument(
        "--sections", default=",".join(SECTIONS), help=f"comma-separated, of {', '.join(SECTIONS)} (default: all)"
    )
    parser.add_argument("--cb-seconds", type=float, default=6.0, help="measured seconds per continuous-batching point")
    parser.add_argument("--cb-warmup", type=float, default=3.0, help="warm-up seconds per continuous-batching point")
    args = parser.parse_args(argv)
    sections = {s for s in args.sections.split(",") if s}
    if sections - set(SECTIONS):
        parser.error(f"unknown section(s) {', '.join(sorted(sections - set(SECTIONS)))}; choose from {SECTIONS}")
    if args.dry_run_cpu:
        dry_run_cpu()
        if args.out is None:  # never let a dry run pass for GPU figures in bench/results
            import tempfile

            args.out = tempfile.mkdtemp(prefix="gpufleet-gpu-dry-")
    repo = Path(__file__).resolve().parents[2]
    sys.path.insert(0, str(repo))
    out_dir = Path(args.out) if args.out else repo / "bench" / "results"

    doc: dict[str, Any] = {"skipped": [], "dry_run": bool(args.dry_run_cpu)}
    pkgs = check_packages()
    doc["packages"] = pkgs
    missing = [k for k, v in pkgs.items() if v is None]
    say("packages: " + ", ".join(f"{k} {v or 'MISSING'}" for k, v in pkgs.items()))
    if missing:
        say(f"MISSING packages: {', '.join(missing)} (pip install {' '.join(missing)})")
    cuda = False
    if pkgs.get("torch"):
        import torch

        cuda = torch.cuda.is_available()
        doc["device"] = torch.cuda.get_device_name(0) if cuda else "no CUDA device"
        doc["torch"] = torch.__version__
        doc["cuda_runtime"] = torch.version.cuda
        say(f"torch {torch.__version__}, CUDA {'available: ' + doc['device'] if cuda else 'NOT available'}")
    if args.check:
        print(json.dumps(doc, indent=2))
        return 0 if cuda and not missing else 2
    if not (cuda or args.dry_run_cpu) or any(
        pkgs.get(p) is None for p in ("transformers", "safetensors", "tokenizers")
    ):
        print("GPU benchmark: needs torch with CUDA, transformers, safetensors and tokenizers; nothing measured.")
        return 2

    def attempt(name: str, need_s: float, fn: Any, *a: Any) -> bool:
        if left() < need_s:
            doc["skipped"].append(f"{name} (only {left():.0f}s left)")
            say(f"{name}: skipped, {left():.0f}s left")
            return False
        say(f"=== {name}")
        try:
            fn(*a)
            return True
        except Exception as exc:  # report and go on with the next section
            import traceback

            traceback.print_exc()
            doc["skipped"].append(f"{name} failed: {type(exc).__name__}: {exc}")
            return False

    models: dict[str, Path] = {}
    if sections & {"limits", "switch"}:  # the switch section compares with the copy bandwidth
        attempt("limits", 30, section_limits, doc)
    if "cb" in sections:
        attempt("continuous batching sweep", 90, section_cb, doc, args.cb_seconds, args.cb_warmup)
    if sections & {"switch", "server"}:
        attempt("build models", 120, lambda: models.update(build_models()))
    if models and "limits" in doc and "switch" in sections:
        attempt("switch times", 150, section_switch, doc, models)
    if "server" not in sections:
        pass  # not asked for
    elif models and all(pkgs.get(PACKAGES[m]) for m in SERVER_NEEDS):
        attempt("gpu_stats and throughput", 100, section_stats_and_throughput, doc, models, args.seconds)
    elif models:
        doc["skipped"].append("gpu_stats and throughput: pod server packages missing")
    doc["table"] = table(doc)
    doc["elapsed_s"] = round(time.monotonic() - T0, 1)
    doc["written_unix"] = round(time.time())
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gpu.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
    say(f"wrote {out_dir / 'gpu.json'}")
    print(doc["table"], flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
