"""Cost of a group switch: make a group current from disk and from the CPU cache, per GB,
on every device kind this machine has, next to the machine's own copy bandwidth.

Paths timed:

- ``from_pretrained``: ``inference.load_model`` as the pod server does it today
  (``from_pretrained`` then ``.to(device)``);
- ``fast_load``: ``gpufleet.pod_server.fast_load`` (meta skeleton, safetensors straight to
  the device, ``assign=True``); on CUDA also its pinned-staging variant;

each from storage (the weight files are dropped from the page cache first, with
``posix_fadvise(DONTNEED)`` on our own files) and, as ``*_warm``, from the page cache;
- ``cache``: ``DeviceResidency.make_current`` of a group parked in the CPU cache
  (``LoadedModel.activate``; on a CPU device the weights never move, so it is a no-op).

``load_s`` is what the call takes; ``ready_s`` adds what touching every weight the first
time costs beyond touching them again (CPU loads are lazy: safetensors are memory-mapped
and the first request pays the page faults). ``ready_s`` is the switch cost the simulator
uses.
"""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import md_table, progress, pyplot, read_result, rounded, save_figure, write_result

GB = 1e9


def _torch() -> Any:
    import torch

    return torch


def _sync(device: str) -> None:
    torch = _torch()
    if device.startswith("cuda"):
        torch.cuda.synchronize(torch.device(device))


def memcpy_gb_s(nbytes: int = 256 << 20, reps: int = 5) -> float:
    """Best-of ``reps`` bandwidth of one large host-memory copy (source and target pre-faulted)."""
    torch = _torch()
    src = torch.ones(nbytes // 4)
    dst = torch.zeros_like(src)
    best = 0.0
    for _ in range(reps):
        t = time.perf_counter()
        dst.copy_(src)
        best = max(best, nbytes / (time.perf_counter() - t) / GB)
    return best


def h2d_gb_s(device: str, nbytes: int = 1 << 30, *, pinned: bool = True, reps: int = 5) -> float:
    """Best-of ``reps`` host-to-device bandwidth of one large copy."""
    torch = _torch()
    target = torch.device(device)
    src = torch.ones(nbytes // 4, pin_memory=pinned)
    dst = torch.empty(nbytes // 4, device=target)
    best = 0.0
    for _ in range(reps):
        torch.cuda.synchronize(target)
        t = time.perf_counter()
        dst.copy_(src, non_blocking=pinned)
        torch.cuda.synchronize(target)
        best = max(best, nbytes / (time.perf_counter() - t) / GB)
    return best


def touch(loaded: Any, device: str) -> None:
    torch = _torch()
    with torch.no_grad():
        total = None
        for p in loaded.model.parameters():
            s = p.detach().float().sum() if p.dtype != torch.float32 else p.detach().sum()
            total = s if total is None else total + s
    _sync(device)


def _free(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        _torch().cuda.empty_cache()


def drop_from_page_cache(folder: Path) -> None:
    """Ask the kernel to forget the cached pages of a model's weight files (our own files only),
    so that the next load reads them from storage: a load "from disk" that really is one."""
    for f in folder.glob("*.safetensors"):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def time_load(
    loader: Callable[[Any, str], Any], spec: Any, device: str, *, cold: bool = False
) -> tuple[float, float, int]:
    """(load_s, ready_s, bytes) of one load of ``spec`` onto ``device``; ``cold``: from storage."""
    _free(device)
    if cold and hasattr(os, "posix_fadvise"):
        drop_from_page_cache(Path(spec.source))
    t = time.perf_counter()
    loaded = loader(spec, device)
    _sync(device)
    load_s = time.perf_counter() - t
    t = time.perf_counter()
    touch(loaded, device)
    first = time.perf_counter() - t
    t = time.perf_counter()
    touch(loaded, device)
    again = time.perf_counter() - t
    # Only what the first touch costs beyond touching resident weights: the deferred loading.
    ready_s = load_s + max(0.0, first - again)
    nbytes = loaded.bytes
    del loaded
    _free(device)
    return load_s, ready_s, nbytes


def time_cache_switch(spec: Any, other: Any, device: str, reps: int) -> dict[str, float]:
    """Seconds for ``DeviceResidency`` to bring ``spec``'s group back from the CPU cache, and to park it."""
    from gpufleet.api.model_groups import GroupSpec
    from gpufleet.pod_server.inference import load_model
    from gpufleet.pod_server.residency import DeviceResidency

    res = DeviceResidency(device, cache_limit_models=4, loader=load_model)
    big, small = GroupSpec(models=(spec,)), GroupSpec(models=(other,))
    res.make_current("big", big)
    cache_s, park_s = [], []
    for _ in range(reps):
        t = time.perf_counter()
        res.make_current("small", small)  # parks big (to pinned host memory on a GPU)
        _sync(device)
        park_s.append(time.perf_counter() - t)
        r = res.make_current("big", big)
        _sync(device)
        assert r.source == "cache", r
        cache_s.append(r.seconds)
    del res
    _free(device)
    return {"cache_s": min(cache_s), "park_s": min(park_s)}


def time_prefetched_switch(spec: Any, other: Any, device: str, reps: int) -> dict[str, float]:
    """The prefetch path: while another group is current, the group is loaded from storage into the
    CPU cache (host copy, pinned on a GPU) as ``PodService`` prefetches it; the switch is then timed."""
    from gpufleet.api.model_groups import GroupSpec
    from gpufleet.pod_server.inference import load_model
    from gpufleet.pod_server.residency import DeviceResidency

    big, small = GroupSpec(models=(spec,)), GroupSpec(models=(other,))
    switch_s, ready_s, prefetch_s = [], [], []
    for _ in range(reps):
        res = DeviceResidency(device, cache_limit_models=4, loader=load_model)
        res.make_current("small", small)
        if hasattr(os, "posix_fadvise"):
            drop_from_page_cache(Path(spec.source))
        t = time.perf_counter()  # in the pod this runs on the prefetch thread while "small" serves
        loaded = load_model(spec, "cpu")
        loaded.ensure_host_copy(pin=device.startswith("cuda"))
        touch(loaded, "cpu")  # what the prefetch thread may spend; the switch must not
        res.host_cache.insert("big", {spec.id: loaded}, device=None, prefetched=True)
        prefetch_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        r = res.make_current("big", big)
        _sync(device)
        switched = time.perf_counter() - t
        assert r.source == "cache" and r.prefetched, r
        t = time.perf_counter()
        touch(res.current[spec.id], device)
        first = time.perf_counter() - t
        t = time.perf_counter()
        touch(res.current[spec.id], device)
        again = time.perf_counter() - t
        switch_s.append(switched)
        ready_s.append(switched + max(0.0, first - again))
        del res, loaded, r
        _free(device)
    return {"switch_s": min(switch_s), "ready_s": min(ready_s), "prefetch_s": min(prefetch_s)}


def time_engine_restart(spec: Any, device: str, reps: int) -> dict[str, float]:
    """Seconds a switch spends on the batching engines: the outgoing group's stopped (its KV cache
    freed), the incoming group's built and started, as ``DeviceScheduler._switch`` does, in a heap
    frozen as the pod server's is (``gpufleet.pod_server.heap``)."""
    from gpufleet.pod_server.group_runtime import build_group_runtime
    from gpufleet.pod_server.heap import startup_heap_frozen
    from gpufleet.pod_server.inference import load_model
    from gpufleet.pod_server.metrics import PodMetrics
    from gpufleet.pod_server.settings import PodServerSettings

    settings = PodServerSettings(devices=[device])
    metrics = PodMetrics("bench", "")

    async def run_blocking(fn: Callable[[], Any]) -> Any:
        return fn()

    with startup_heap_frozen():
        loaded = load_model(spec, device)
        start_s, stop_s = [], []
        for _ in range(reps + 1):  # the first builds the code paths
            t = time.perf_counter()
            runtime = build_group_runtime(device, "g", {spec.id: loaded}, settings, run_blocking, metrics)
            _sync(device)
            start_s.append(time.perf_counter() - t)
            t = time.perf_counter()
            for engine in runtime.engines.values():
                engine.stop()
            _sync(device)
            stop_s.append(time.perf_counter() - t)
        del loaded, runtime
    _free(device)
    return {"start_s": min(start_s[1:]), "stop_s": min(stop_s[1:])}


def fit_line(points: list[tuple[float, float]]) -> dict[str, float]:
    """Least-squares seconds = fixed_s + s_per_gb * gb (non-negative parts)."""
    if len(points) == 1:
        gb, s = points[0]
        return {"fixed_s": 0.0, "s_per_gb": s / gb if gb else 0.0}
    n = len(points)
    mx = sum(p[0] for p in points) / n
    my = sum(p[1] for p in points) / n
    sxx = sum((p[0] - mx) ** 2 for p in points)
    slope = sum((p[0] - mx) * (p[1] - my) for p in points) / sxx if sxx else 0.0
    slope = max(0.0, slope)
    return {"fixed_s": max(0.0, my - slope * mx), "s_per_gb": slope}


def measure_device(device: str, model_dirs: list[tuple[str, Path]], other: Path, reps: int) -> dict[str, Any]:
    from gpufleet.api.model_groups import ModelSpec
    from gpufleet.pod_server.fast_load import fast_load_model
    from gpufleet.pod_server.inference import load_model

    dtype = "bfloat16" if device.startswith("cuda") else "float32"
    loaders: dict[str, Callable[[Any, str], Any]] = {"from_pretrained": load_model, "fast_load": fast_load_model}
    if device.startswith("cuda"):
        loaders["fast_load_pinned"] = lambda s, d: fast_load_model(s, d, staging="pinned")
    other_spec = ModelSpec(id="other", source=str(other), task="chat", dtype=dtype)
    # Warm the code paths (imports, first-call set-up) on the tiny model before timing.
    for fn in loaders.values():
        time_load(fn, other_spec, device)
    out: dict[str, Any] = {}
    for name, path in model_dirs:
        spec = ModelSpec(id=name, source=str(path), task="chat", dtype=dtype)
        row: dict[str, Any] = {}
        for label, fn, cold in [(k, f, c) for k, f in loaders.items() for c in (True, False)]:
            if not cold:
                label = f"{label}_warm"
            runs = [time_load(fn, spec, device, cold=cold) for _ in range(reps)]
            # The fastest of the repetitions: on a shared machine the slower ones measure the neighbours.
            best = min(runs, key=lambda r: r[1])
            load_s, ready_s = best[0], best[1]
            spread = max(r[1] for r in runs) / ready_s
            gb = runs[0][2] / GB
            row[label] = {
                "load_s": load_s,
                "ready_s": ready_s,
                "gb": gb,
                "ready_gb_s": gb / ready_s,
                "max_over_min": spread,
            }
            progress(f"switch_cost {device} {name} ({gb:.2f} GB) {label}: load {load_s:.3f}s ready {ready_s:.3f}s")
        cs = time_cache_switch(spec, other_spec, device, reps)
        gb = row["from_pretrained"]["gb"]
        row["cache"] = {
            "ready_s": cs["cache_s"],
            "park_s": cs["park_s"],
            "gb": gb,
            "ready_gb_s": gb / max(cs["cache_s"], 1e-9),
        }
        progress(f"switch_cost {device} {name} cache: {cs['cache_s']:.4f}s (park {cs['park_s']:.4f}s)")
        ps = time_prefetched_switch(spec, other_spec, device, reps)
        row["prefetched"] = {
            "load_s": ps["switch_s"],
            "ready_s": ps["ready_s"],
            "prefetch_s": ps["prefetch_s"],
            "gb": gb,
            "ready_gb_s": gb / max(ps["ready_s"], 1e-9),
        }
        progress(
            f"switch_cost {device} {name} prefetched: switch {ps['ready_s']:.4f}s "
            f"(background prefetch {ps['prefetch_s']:.3f}s)"
        )
        es = time_engine_restart(spec, device, reps)
        ready = es["start_s"] + es["stop_s"]
        row["engine"] = {"ready_s": ready, **es, "gb": gb, "ready_gb_s": gb / max(ready, 1e-9)}
        progress(f"switch_cost {device} {name} engines: stop {es['stop_s']:.4f}s start {es['start_s']:.4f}s")
        out[name] = row
    return out


def run(*, quick: bool, command: str) -> dict[str, Any]:
    import torch

    from bench.models import build_llama

    torch.set_num_threads(1)  # a CPU device of a 2-device pod on this machine gets one thread
    # Three sizes even when quick: the per-GB slope the simulator uses needs more than two points.
    names = ["llama-25m", "llama-100m", "llama-200m"] + ([] if quick else ["llama-400m"])
    reps = 3 if quick else 5
    devices = ["cpu:0"] + (["cuda:0"] if torch.cuda.is_available() else [])
    limits: dict[str, Any] = {"cpu": {"memcpy_gb_s": memcpy_gb_s()}}
    progress(f"switch_cost: host memcpy {limits['cpu']['memcpy_gb_s']:.2f} GB/s (1 thread)")
    results: dict[str, Any] = {}
    fits: dict[str, Any] = {}
    from bench.models import tokenizer_dir

    other = tokenizer_dir().parent / "tiny-chat"
    for device in devices:
        kind = device.split(":")[0]
        dtype = "bfloat16" if kind == "cuda" else "float32"
        dirs = [(n, build_llama(n, dtype=dtype)) for n in names]
        if kind == "cuda":
            limits[device] = {
                "h2d_pinned_gb_s": h2d_gb_s(device, pinned=True),
                "h2d_pageable_gb_s": h2d_gb_s(device, pinned=False),
            }
        results[kind] = measure_device(device, dirs, other, reps)
        fits[kind] = {
            path: fit_line([(r[path]["gb"], r[path]["ready_s"]) for r in results[kind].values()])
            for path in next(iter(results[kind].values()))
        }
    doc: dict[str, Any] = {
        "what": "seconds to make a group current, by path and device kind; per GB; vs the machine's copy bandwidth",
        "limits": limits,
        "results": results,
        "fit": fits,
        "notes": [
            "disk paths: from storage (page cache dropped for the weight files first); *_warm: from the page cache",
            "ready_s = the load plus touching every weight once; CPU loads are lazy memory maps",
            "a CPU device keeps cached groups in place: its cache path moves no bytes",
            "prefetched: the group was loaded into the CPU cache in the background (prefetch_s, off the switch "
            "path) while another group was current; ready_s is the switch itself plus first-touch faults",
            "each figure is the fastest of its repetitions (max_over_min shows the spread): this machine is shared",
        ],
    }
    doc["targets"] = _targets(doc)
    write_result("switch_cost", doc, quick=quick, command=command)
    plot(doc)
    return doc


def _targets(doc: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kind, rows in doc["results"].items():
        largest = max(rows.values(), key=lambda r: r["from_pretrained"]["gb"])
        fp, fl = largest["from_pretrained"]["ready_s"], largest["fast_load"]["ready_s"]
        out[kind] = {
            "disk_fast_vs_from_pretrained_speedup": fp / fl,
            "disk_warm_fast_vs_from_pretrained_speedup": largest["from_pretrained_warm"]["ready_s"]
            / largest["fast_load_warm"]["ready_s"],
            "model_gb": largest["from_pretrained"]["gb"],
            # Issue 9: a switch to a group queued for (prefetched) vs a cold disk switch, target >= 3x.
            "prefetched_vs_cold_disk_speedup": min(fp, fl) / largest["prefetched"]["ready_s"],
        }
        out[kind]["prefetch_target_met"] = out[kind]["prefetched_vs_cold_disk_speedup"] >= 3
        if kind == "cuda":
            pinned = doc["limits"]["cuda:0"]["h2d_pinned_gb_s"]
            out[kind]["cache_share_of_pinned_h2d"] = largest["cache"]["ready_gb_s"] / pinned
            out[kind]["cache_target_met"] = largest["cache"]["ready_gb_s"] >= 0.7 * pinned
    return out


def plot(doc: dict[str, Any]) -> None:
    plt = pyplot()
    kinds = list(doc["results"])
    fig, axes = plt.subplots(1, len(kinds), figsize=(6.5 * len(kinds), 4.2), squeeze=False)
    for ax, kind in zip(axes[0], kinds, strict=True):
        rows = doc["results"][kind]
        # No copy on a CPU's cache path; the engines move no weights.
        paths = [p for p in next(iter(rows.values())) if not (kind == "cpu" and p == "cache") and p != "engine"]
        models = list(rows)
        width = 0.8 / len(paths)
        for i, path in enumerate(paths):
            vals = [rows[m][path]["ready_gb_s"] for m in models]
            ax.bar([j + i * width for j in range(len(models))], vals, width, label=path)
        limit = doc["limits"]["cpu"]["memcpy_gb_s"] if kind == "cpu" else doc["limits"]["cuda:0"]["h2d_pinned_gb_s"]
        ax.axhline(limit, color="k", ls="--", lw=1, label="host memcpy" if kind == "cpu" else "pinned H2D")
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(models))])
        ax.set_xticklabels([f"{m}\n{rows[m]['from_pretrained']['gb']:.2f} GB" for m in models])
        ax.set_ylabel("GB/s to a usable group (higher is better)")
        ax.set_yscale("log")
        ax.set_title(f"group switch bandwidth on {kind}" + (" (cache path: no copy)" if kind == "cpu" else ""))
        ax.legend(fontsize=8)
    save_figure(fig, "switch_cost")


def summarize(doc: dict[str, Any]) -> str:
    lines = ["## Cost of a group switch", ""]
    lim = doc["limits"]
    lines.append(f"Host memcpy: {lim['cpu']['memcpy_gb_s']:.2f} GB/s (one thread).")
    for dev, lm in lim.items():
        if dev.startswith("cuda"):
            lines.append(
                f"{dev}: pinned H2D {lm['h2d_pinned_gb_s']:.1f} GB/s, pageable {lm['h2d_pageable_gb_s']:.1f} GB/s."
            )
    lines.append("")
    rows = []
    for kind, models in doc["results"].items():
        for m, r in models.items():
            for path, f in r.items():
                rows.append(
                    [
                        kind,
                        m,
                        round(f["gb"], 3),
                        path,
                        rounded(f.get("load_s")),
                        rounded(f["ready_s"]),
                        None if (kind, path) == ("cpu", "cache") or path == "engine" else rounded(f["ready_gb_s"], 2),
                    ]
                )
    lines.append(md_table(["device", "model", "GB", "path", "load s", "ready s", "GB/s"], rows))
    lines.append("")
    lines.append(
        "On a CPU device the cache path moves no bytes (the weights stay where they are), so it has no GB/s. "
        "`engine` is the rest of every switch: the outgoing group's batching engine stopped (its KV cache "
        "freed) and the incoming one's started; the pods report their switches whole."
    )
    lines.append("")
    for kind, t in doc.get("targets", {}).items():
        speedup = t["disk_fast_vs_from_pretrained_speedup"]
        warm = t.get("disk_warm_fast_vs_from_pretrained_speedup")
        s = f"- {kind}: disk path, fast_load runs at {speedup:.2f}x the speed of from_pretrained(+.to) from storage"
        if warm:
            s += f", {warm:.2f}x from the page cache"
        if "cache_share_of_pinned_h2d" in t:
            s += f"; cache path at {100 * t['cache_share_of_pinned_h2d']:.0f}% of pinned H2D (target 70%)"
        lines.append(s + f" ({t['model_gb']:.2f} GB model).")
    lines.append("")
    lines.append("![switch cost](switch_cost.png)")
    return "\n".join(lines)


def recorded_costs(kind: str | None = None) -> tuple[dict[str, Any] | None, str]:
    """Fitted per-GB switch costs from the last recorded run: cuda (from bench/gpu) if any, else cpu."""
    for name in ("gpu", "switch_cost"):
        doc = read_result(name)
        if not doc or "fit" not in doc or doc.get("dry_run"):
            continue
        for k in [kind] if kind else ["cuda", "cpu"]:
            if k in doc["fit"]:
                return doc["fit"][k], f"bench/results/{name}.json ({k}, measured {doc.get('written_unix')})"
    return None, "defaults"
