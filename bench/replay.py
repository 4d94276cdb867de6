"""The same on the real system: replay a scaled-down trace against ``gpufleet up`` once per
routing policy, and set measured switches and latency beside the simulator's prediction.

Tiny local models on CPU devices: one model per group, more groups than devices, a CPU
cache of two models per device (the current group's and one parked: both switch paths occur). Each policy gets a fresh
fleet (every device starts with the default group, as pods preload it). The prediction
uses the service time calibrated on the idle fleet before the replay (``a + b * tokens``,
through the router) and the mean switch times the pods measured during the replay (their
first load, at start-up, takes seconds of one-off imports and is left out); the simulator
routes with the router's own policy functions (``gpufleet.routing.alternatives.POLICIES``),
so simulation and system run the same routing code.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict
from typing import Any

from bench.common import md_table, percentile, progress, pyplot, rounded, save_figure, write_result
from bench.load import replay as replay_trace
from bench.load import run as run_async
from bench.load import sequential
from bench.models import build_tiny_groups
from bench.policies import SnapshotPolicy
from bench.procs import Fleet, mean_switch_seconds, router_available, switch_counts, switch_time_totals
from bench.sim import SimConfig, StepModel, SwitchCosts, simulate
from bench.trace import TraceParams, generate
from gpufleet.routing.alternatives import POLICIES as ROUTER_POLICIES

DEVICES = ["cpu:0", "cpu:1"]
N_GROUPS = 5
CACHE_MODELS = 2  # MAX_CPU_CACHED_MODELS counts the current group's host copy too
SLO_S = 1.0
POLICY_ORDER = ("round_robin", "least_load", "lru_multiplex", "gie", "affinity")


def model_of(group: str) -> str:
    return "m" + group[1:]


def calibrate(url: str, model: str = "m00") -> dict[str, float]:
    """Service seconds = a + b * tokens of one model, sequentially on the idle fleet."""
    tokens = [4, 32, 4, 32, 16, 16, 4, 32]
    outs = run_async(sequential(url, model, tokens))[2:]  # the first two warm the path
    xs = [t for t, o in zip(tokens[2:], outs, strict=True) if o.status == 200]
    ys = [o.latency_s for o in outs if o.status == 200]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
    return {"fixed_s": max(0.0, my - b * mx), "per_token_s": max(0.0, b)}


def predict(
    trace: Any, policy: str, cal: dict[str, float], disk_s: float, cache_s: float, queue_policy: Any = None
) -> dict[str, Any]:
    """The simulator on the same trace: batched devices whose speed alone is the calibration and
    whose speed-up with the batch is the measured throughput curve (bench/results/throughput.json)."""
    from bench.routing_quality import measured_steps

    shape = measured_steps()
    per_token = max(cal["per_token_s"], 1e-4)
    alone = shape.tokens_per_s(1)
    steps = StepModel(
        points=tuple((b, tps / alone / per_token) for b, tps in shape.points),
        prefill_tokens=cal["fixed_s"] / per_token,
        origin="calibrated on the fleet, shaped by bench/results/throughput.json",
    )
    cfg = SimConfig(
        n_devices=len(DEVICES),
        cache_limit_models=CACHE_MODELS,
        models_per_group=1,
        group_gb=0.0,
        costs=SwitchCosts(disk_fixed_s=disk_s, disk_s_per_gb=0.0, cache_fixed_s=max(cache_s, 1e-4), cache_s_per_gb=0.0),
        steps=steps,
        initial_group="g00",
        **({"queue_policy": queue_policy} if queue_policy is not None else {}),
    )
    fn = ROUTER_POLICIES[policy]
    r = simulate(trace, cfg, SnapshotPolicy(policy, fn), slo_s=SLO_S)
    s = r.summary(SLO_S)
    return {
        "switches": s["switches"],
        "switches_from_disk": s["switches_from_disk"],
        "switches_from_cache": s["switches_from_cache"],
        "p50_latency_s": s["p50_latency_s"],
        "p99_latency_s": s["p99_latency_s"],
        "mean_latency_s": s["mean_latency_s"],
        "slo_attainment": s["slo_attainment"],
    }


def measure(policy: str, trace: Any, mg: Any) -> dict[str, Any]:
    env = {"MAX_CPU_CACHED_MODELS": str(CACHE_MODELS)}
    progress(f"replay {policy}: starting gpufleet up on {','.join(DEVICES)}")
    with Fleet.up(DEVICES, mg, policy, env=env) as fleet:
        preload = mean_switch_seconds(switch_time_totals(fleet.pod_urls))
        cal = calibrate(fleet.url)
        before, times_before = switch_counts(fleet.pod_urls), switch_time_totals(fleet.pod_urls)
        progress(f"replay {policy}: service {cal['fixed_s']:.4f}s + {cal['per_token_s']:.4f}s/token; replaying")
        outcomes = run_async(replay_trace(fleet.url, trace, model_of))
        after = switch_counts(fleet.pod_urls)
        seen = mean_switch_seconds(switch_time_totals(fleet.pod_urls), times_before)
    disk_s = seen.get("disk", 0.05)
    lat = [o.latency_s if o.status == 200 else math.inf for o in outcomes]
    ok = [x for x in lat if not math.isinf(x)]
    errors = sorted({f"{o.status}: {o.error}" for o in outcomes if o.status != 200})[:5]
    real = {
        "switches": round(sum(after.values()) - sum(before.values())),
        "switches_from_disk": round(after.get("disk", 0) - before.get("disk", 0)),
        "switches_from_cache": round(after.get("cache", 0) - before.get("cache", 0)),
        "p50_latency_s": percentile(lat, 50),
        "p99_latency_s": percentile(lat, 99),
        "mean_latency_s": statistics.fmean(ok) if ok else math.nan,
        "slo_attainment": sum(1 for x in lat if x <= SLO_S) / len(lat),
        "errors": len(lat) - len(ok),
        "error_samples": errors,
        "switch_seconds_measured": seen,
    }
    sim = predict(trace, policy, cal, disk_s, seen.get("cache", 5e-4))
    progress(
        f"replay {policy}: real switches {real['switches']} (disk {real['switches_from_disk']}) p99 "
        f"{real['p99_latency_s']:.3f}s | sim switches {sim['switches']} (disk {sim['switches_from_disk']}) p99 "
        f"{sim['p99_latency_s']:.3f}s"
    )
    return {"real": real, "sim": sim, "calibration": cal, "switch_s_at_preload": preload}


def run(*, quick: bool, command: str, seed: int = 11) -> dict[str, Any] | None:
    if not router_available():
        progress("replay: gpufleet.router is not available here; skipped")
        return None
    mg = build_tiny_groups(N_GROUPS)
    params = TraceParams(
        n_requests=100 if quick else 400,  # 400: about 80 s a policy, and ~60-110 switches to compare
        n_groups=N_GROUPS,
        alpha=1.0,
        rate=5.0,
        arrivals="poisson",
        service_mean_s=0.4,
        service_cv=0.5,
        tokens_per_s=40.0,  # tokens per request: about 16 on average
        seed=seed,
    )
    trace = generate(params)
    available = ROUTER_POLICIES
    results: dict[str, Any] = {}
    for policy in POLICY_ORDER:
        if policy not in available:
            progress(f"replay: the router has no policy {policy!r}; skipped")
            continue
        results[policy] = measure(policy, trace, mg)
    agreement = {
        p: {
            "real": v["real"]["switches"],
            "sim": v["sim"]["switches"],
            "relative_difference": abs(v["sim"]["switches"] - v["real"]["switches"]) / max(1, v["real"]["switches"]),
        }
        for p, v in results.items()
    }
    targets = [
        {
            "scenario": "replay",
            "target": f"{p}: simulated switches within 10% of measured",
            "ours": a["sim"],
            "measured": a["real"],
            "relative_difference": a["relative_difference"],
            "met": a["relative_difference"] <= 0.10,
        }
        for p, a in agreement.items()
    ]
    doc = {
        "what": "a scaled-down trace replayed against gpufleet up, once per routing policy, beside the simulator",
        "devices": DEVICES,
        "groups": N_GROUPS,
        "cache_models_per_device": CACHE_MODELS,
        "max_sequences_per_device": 64,
        "slo_s": SLO_S,
        "trace": asdict(params),
        "policies": results,
        "switch_agreement": agreement,
        "targets": targets,
        "notes": [
            "switches are the pods' gpufleet_group_switches_total over the replay (preload and calibration excluded)",
            "latency is measured by the client through the router; "
            "the simulator's service time is calibrated the same way",
            "the router sees pods through the load report on every answer, a status refetch when its version "
            "changes (status checked every 0.5 s here) and its own in-flight counts; the simulator sees device "
            "state exactly; its devices batch, follow the pod's queue_order rules, cache with the pod's HostCache "
            "and prefetch queued groups as the pods do",
            "switch seconds are the pods' own, whole: the old engine stopped, the weights moved, the new engine "
            "started (a switch that waited for a prefetch includes that wait)",
        ],
    }
    write_result("replay", doc, quick=quick, command=command)
    plot(doc)
    return doc


def plot(doc: dict[str, Any]) -> None:
    plt = pyplot()
    pols = list(doc["policies"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for ax, key, title in (
        (axes[0], "switches", "group switches over the replay"),
        (axes[1], "p99_latency_s", "p99 latency (s)"),
    ):
        real = [doc["policies"][p]["real"][key] for p in pols]
        sim = [doc["policies"][p]["sim"][key] for p in pols]
        xs = range(len(pols))
        ax.bar([x - 0.2 for x in xs], [v if v is not None else math.nan for v in real], 0.4, label="measured")
        ax.bar([x + 0.2 for x in xs], [v if v is not None else math.nan for v in sim], 0.4, label="simulated")
        ax.set_xticks(list(xs))
        ax.set_xticklabels(pols, fontsize=8)
        ax.set_title(title, fontsize=10)
    axes[0].legend(fontsize=8)
    fig.suptitle(
        f"Replay of {doc['trace']['n_requests']} requests on gpufleet up ({', '.join(doc['devices'])})", fontsize=11
    )
    save_figure(fig, "replay")


def summarize(doc: dict[str, Any]) -> str:
    lines = ["## The same on the real system (replay against `gpufleet up`)", ""]
    t = doc["trace"]
    lines.append(
        f"{t['n_requests']} requests, {doc['groups']} groups of one tiny model, Zipf alpha {t['alpha']}, Poisson "
        f"{t['rate']}/s, seed {t['seed']}; devices {', '.join(doc['devices'])}, "
        f"up to {doc.get('max_sequences_per_device', 64)} sequences each, "
        f"CPU cache {doc['cache_models_per_device']} model; objective {doc['slo_s']} s."
    )
    lines.append("")
    rows = []
    for p, v in doc["policies"].items():
        r, s = v["real"], v["sim"]
        rows.append(
            [
                p,
                f"{r['switches']} ({r['switches_from_disk']} disk)",
                f"{s['switches']} ({s['switches_from_disk']} disk)",
                f"{100 * doc['switch_agreement'][p]['relative_difference']:.1f}%" if "switch_agreement" in doc else "",
                rounded(r["p50_latency_s"]),
                rounded(s["p50_latency_s"]),
                rounded(r["p99_latency_s"]),
                rounded(s["p99_latency_s"]),
                r["errors"],
            ]
        )
    lines.append(
        md_table(
            [
                "policy",
                "switches measured",
                "switches simulated",
                "difference",
                "p50 s meas.",
                "p50 s sim.",
                "p99 s meas.",
                "p99 s sim.",
                "errors",
            ],
            rows,
        )
    )
    lines += [
        "",
        "Switch counts are the check of the simulator's device model and of the routing code it runs (the router's "
        "own policy functions); latencies agree less, for reasons the simulator leaves out on purpose: the p99 of "
        "a few hundred requests is their few slowest; the two pods, the router and the client share 2 cores (a "
        "request's "
        "service time grows while the other pod computes or loads, and the calibration ran on an idle fleet); HTTP "
        "and proxy time vary; and the router sees pods through their load reports and status refetches plus its "
        "own in-flight counts, where the simulator sees device state exactly.",
        "",
        "![replay](replay.png)",
    ]
    return "\n".join(lines)
