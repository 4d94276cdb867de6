"""Routing quality by simulation: the real policy (``choose_device``) against four baselines.

Every policy serves the same seeded trace on the same simulated batched devices (``bench.sim``),
for each cost set, arrival process and Zipf exponent. Cost sets:

- ``measured``: this machine's figures, decode step time by batch size from ``bench.throughput``
  (the ``serve`` line of ``bench/results/throughput.json``) and switch times fitted by
  ``bench.switch_cost``;
- ``gpu_like``: an H100-class decode curve for a 7-8B model and the policy's GPU defaults for
  switches (0.5 s from the CPU cache, 3 s from disk), unless ``bench/results/gpu.json`` holds
  measured ones.

Figures per policy: switches per 1,000 requests, p50 / p99 latency and the share within the
objective at one common rate, and the highest rate that keeps 99% within the objective (a
search). ``targets`` lists, per scenario, each target of the routing issue and whether it holds.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

from bench.common import md_table, progress, pyplot, read_result, save_figure, write_result
from bench.policies import ORDER, OURS, make_policy
from bench.sim import SimConfig, StepModel, SwitchCosts, simulate
from bench.trace import Arrivals, TraceParams, generate

ALPHAS = ("0.8", "1.0", "1.2")
ARRIVALS: tuple[Arrivals, ...] = ("poisson", "bursty")
FIELDS = ("switches_per_1000", "p50_latency_s", "p99_latency_s", "slo_attainment", "max_rate_at_99pct_slo")
BASELINES = tuple(p for p in ORDER if p != OURS)


@dataclass(frozen=True)
class Scenario:
    n_devices: int = 4
    max_sequences: int = 64  # MAX_SEQUENCES_PER_DEVICE (default)
    queue_limit: int = 256  # MAX_QUEUE_PER_DEVICE (default)
    cache_limit_models: int = 4  # MAX_CPU_CACHED_MODELS (default)
    models_per_group: int = 2  # like the demo groups
    group_gb: float = 1.0  # weights per group
    n_groups: int = 8  # twice the devices
    tokens_mean: float = 32.0  # completion tokens per request, lognormal
    tokens_cv: float = 0.5
    slo_s: float = 3.0  # latency objective, end to end (each cost set sets its own)

    def nominal_rate(self, steps: StepModel) -> float:
        """Requests/s the devices could serve saturated if no switch ever happened."""
        per_request_tokens = self.tokens_mean + steps.prefill_tokens
        return self.n_devices * steps.tokens_per_s(self.max_sequences) / per_request_tokens


@dataclass(frozen=True)
class CostSet:
    name: str
    steps: StepModel
    switches: SwitchCosts
    slo_s: float
    rate: float  # the common rate (req/s): switches and latency are compared there
    what: str


def measured_steps() -> StepModel:
    doc = read_result("throughput")
    line = next((ln for ln in (doc or {}).get("lines", []) if ln.get("name") == "serve"), None)
    if not line:
        progress("routing_quality: no bench/results/throughput.json serve line; default step model")
        return StepModel(origin="defaults (no throughput.json)")
    pts = tuple((int(p["concurrency"]), float(p["tokens_per_s"])) for p in line["points"] if p.get("tokens_per_s"))
    return StepModel(points=pts, origin=f"bench/results/throughput.json serve ({doc.get('written_unix')})")


def measured_switches() -> SwitchCosts:
    from bench.switch_cost import recorded_costs

    fit, origin = recorded_costs("cpu")
    if fit is None:
        progress("routing_quality: no recorded switch costs; using defaults")
        return SwitchCosts(origin="defaults (no switch_cost.json)")
    disk, cache = fit["from_pretrained"], fit.get("prefetched") or fit["cache"]
    return SwitchCosts(
        disk_fixed_s=disk["fixed_s"],
        disk_s_per_gb=disk["s_per_gb"],
        # A switch is never free: the scheduler's own bookkeeping takes a moment.
        cache_fixed_s=max(cache["fixed_s"], 1e-3),
        cache_s_per_gb=cache["s_per_gb"],
        # Stopping one batching engine and starting the next, on every switch, whatever the group's
        # size (the fit's slope is 0); older records lack it.
        engine_s=fit["engine"]["fixed_s"] if "engine" in fit else 0.0,
        origin=origin,
    )


# An H100-class decode curve for a 7-8B model (bf16): ~12 ms a step alone, ~20 ms at 64 sequences.
GPU_LIKE_STEPS = StepModel(
    points=((1, 80.0), (8, 600.0), (32, 2000.0), (64, 3200.0)), origin="assumed H100-class 8B decode"
)
GPU_LIKE_SWITCHES = SwitchCosts(
    disk_fixed_s=3.0, disk_s_per_gb=0.0, cache_fixed_s=0.5, cache_s_per_gb=0.0, origin="Costs() GPU defaults"
)


def cost_sets() -> tuple[CostSet, ...]:
    gpu_fit = None
    doc = read_result("gpu")
    if doc and not doc.get("dry_run") and "fit" in doc and "cuda" in doc["fit"]:
        gpu_fit = doc["fit"]["cuda"]
    gpu_sw = GPU_LIKE_SWITCHES
    if gpu_fit:
        gpu_sw = SwitchCosts(
            disk_fixed_s=gpu_fit["from_pretrained"]["fixed_s"],
            disk_s_per_gb=gpu_fit["from_pretrained"]["s_per_gb"],
            cache_fixed_s=max(gpu_fit["cache"]["fixed_s"], 1e-3),
            cache_s_per_gb=gpu_fit["cache"]["s_per_gb"],
            origin="bench/results/gpu.json (cuda)",
        )
    return (
        CostSet("measured", measured_steps(), measured_switches(), 3.0, 10.0, "this machine: throughput + switch_cost"),
        # Switches of seconds and the pod's 5 s bound on waiting for one (SWITCH_MAX_WAIT_S) need a longer objective.
        CostSet("gpu_like", GPU_LIKE_STEPS, gpu_sw, 10.0, 4.0, "GPU-like decode curve and switch times"),
    )


def sim_config(scn: Scenario, cs: CostSet) -> SimConfig:
    return SimConfig(
        n_devices=scn.n_devices,
        max_sequences=scn.max_sequences,
        queue_limit=scn.queue_limit,
        cache_limit_models=scn.cache_limit_models,
        models_per_group=scn.models_per_group,
        group_gb=scn.group_gb,
        costs=cs.switches,
        steps=cs.steps,
        initial_group="g00",
    )


def trace_params(scn: Scenario, cs: CostSet, alpha: float, arrivals: Arrivals, n: int, seed: int) -> TraceParams:
    # The trace draws a service time and turns it into tokens at tokens_per_s: draw tokens directly.
    return TraceParams(
        n_requests=n,
        n_groups=scn.n_groups,
        alpha=alpha,
        rate=cs.rate,
        arrivals=arrivals,
        service_mean_s=scn.tokens_mean,
        service_cv=scn.tokens_cv,
        tokens_per_s=1.0,
        seed=seed,
    )


def attainment_at(policy: str, p: TraceParams, cfg: SimConfig, slo_s: float, seed: int) -> float:
    """SLO attainment at p.rate, stopping early once 1% of the trace has missed."""
    r = simulate(
        generate(p), cfg, make_policy(policy, seed), slo_s=slo_s, give_up_misses=math.floor(0.01 * p.n_requests)
    )
    return 0.0 if r.aborted else float(r.summary(slo_s)["slo_attainment"])


def max_rate(
    policy: str, p: TraceParams, cfg: SimConfig, slo_s: float, seed: int, *, steps: int, nominal: float
) -> tuple[float, list[tuple[float, float]]]:
    """Highest rate keeping 99% of requests within ``slo_s``: bracket by doubling/halving from
    p.rate, then bisect geometrically. Returns the rate and every (rate, attainment) tried."""
    tried: list[tuple[float, float]] = []

    def ok(rate: float) -> bool:
        a = attainment_at(policy, p.at_rate(rate), cfg, slo_s, seed)
        tried.append((rate, a))
        return a >= 0.99

    floor, ceiling = nominal / 256, nominal * 2
    r = p.rate
    if ok(r):
        lo, hi = r, r * 2
        while hi <= ceiling and ok(hi):
            lo, hi = hi, hi * 2
        if hi > ceiling:
            return lo, tried
    else:
        hi, lo = r, r / 2
        while lo >= floor and not ok(lo):
            hi, lo = lo, lo / 2
        if lo < floor:
            return 0.0, tried
    for _ in range(steps):
        mid = math.sqrt(lo * hi)
        if ok(mid):
            lo = mid
        else:
            hi = mid
    return lo, tried


def evaluate(
    scn: Scenario, cs: CostSet, arrivals: Arrivals, alpha: str, n: int, seed: int, steps: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    cfg = sim_config(scn, cs)
    p = trace_params(scn, cs, float(alpha), arrivals, n, seed)
    trace = generate(p)
    rows: dict[str, Any] = {}
    curves: dict[str, Any] = {}
    for name in ORDER:
        policy = make_policy(name, seed)
        s = simulate(trace, cfg, policy, slo_s=cs.slo_s).summary(cs.slo_s)
        best, tried = max_rate(name, p, cfg, cs.slo_s, seed, steps=steps, nominal=scn.nominal_rate(cs.steps))
        row = {
            "switches_per_1000": s["switches_per_1000"],
            "p50_latency_s": s["p50_latency_s"],
            "p99_latency_s": s["p99_latency_s"],
            "slo_attainment": s["slo_attainment"],
            "max_rate_at_99pct_slo": best,
            "mean_latency_s": s["mean_latency_s"],
            "switches_from_disk_per_1000": 1000.0 * float(s["switches_from_disk"]) / n,
            # Device time spent switching: a cache switch on this CPU is a millisecond, a disk load seconds.
            "switch_seconds_per_1000": (
                float(s["switches_from_cache"]) * cs.switches.seconds("cache", scn.group_gb)
                + float(s["switches_from_disk"]) * cs.switches.seconds("disk", scn.group_gb)
            )
            * 1000.0
            / n,
            "rejected": s["rejected"],
            "route_reasons": dict(sorted(policy.reasons.items(), key=lambda kv: -kv[1])[:6]),
        }
        rows[name] = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}
        curves[name] = sorted(tried)
        progress(
            f"routing_quality {cs.name} {arrivals} alpha={alpha} {name:13s} "
            f"switches/1000={s['switches_per_1000']:6.1f} (disk {row['switches_from_disk_per_1000']:5.1f}) "
            f"p99={s['p99_latency_s']:.3f}s within={s['slo_attainment']:.4f} max_rate={best:.1f}/s"
        )
    return rows, curves


def scenario_targets(scenario: str, rows: dict[str, Any]) -> list[dict[str, Any]]:
    """The routing issue's targets for one scenario: p99 at most the best baseline's, max rate at
    least the best baseline's, switches at most half of least_load's and at most lru_multiplex's."""
    ours = rows[OURS]

    def best(field: str, low: bool) -> tuple[str, float]:
        vals = [(b, rows[b][field]) for b in BASELINES if rows[b][field] is not None]
        return min(vals, key=lambda kv: kv[1]) if low else max(vals, key=lambda kv: kv[1])

    out = []
    p99_name, p99 = best("p99_latency_s", low=True)
    ours_p99 = ours["p99_latency_s"]
    out.append(_target(scenario, "p99_latency_s <= best baseline", ours_p99, p99_name, p99,
                       ours_p99 is not None and ours_p99 <= p99 * 1.0001))
    rate_name, rate = best("max_rate_at_99pct_slo", low=False)
    out.append(_target(scenario, "max_rate_at_99pct_slo >= best baseline", ours["max_rate_at_99pct_slo"],
                       rate_name, rate, ours["max_rate_at_99pct_slo"] >= rate * 0.9999))
    ll = rows["least_load"]["switches_per_1000"]
    out.append(_target(scenario, "switches_per_1000 <= 0.5 x least_load", ours["switches_per_1000"],
                       "least_load", ll, ours["switches_per_1000"] <= 0.5 * ll))
    lru = rows["lru_multiplex"]["switches_per_1000"]
    out.append(_target(scenario, "switches_per_1000 <= lru_multiplex", ours["switches_per_1000"],
                       "lru_multiplex", lru, ours["switches_per_1000"] <= lru))
    return out


def _target(scenario: str, target: str, ours: Any, name: str, figure: Any, met: bool) -> dict[str, Any]:
    return {"scenario": scenario, "target": target, "ours": ours,
            "best_baseline": {"name": name, "figure": figure}, "met": bool(met)}


LINGERS = (0.0, 0.25, 0.5, 1.0, 2.0, 3.0, 4.0)
CURVE_POLICIES = ("least_load", "lru_multiplex", "gie", OURS)


def tradeoff(scn: Scenario, cs: CostSet, n: int, seed: int) -> dict[str, Any]:
    """Switches against latency as the device lingers on its group (SWITCH_LINGER_S), alpha 1.0,
    Poisson: the curve where "fewest switches" and "best p99" pull apart."""
    from gpufleet.pod_server.queue_order import QueuePolicy

    trace = generate(trace_params(scn, cs, 1.0, "poisson", n, seed))
    out: dict[str, Any] = {}
    for linger in LINGERS:
        cfg = replace(sim_config(scn, cs), queue_policy=QueuePolicy(linger_s=linger))
        row = {}
        for name in CURVE_POLICIES:
            r = simulate(trace, cfg, make_policy(name, seed), slo_s=cs.slo_s).summary(cs.slo_s)
            row[name] = {
                "switches_per_1000": round(float(r["switches_per_1000"]), 2),
                "p99_latency_s": r["p99_latency_s"] if math.isfinite(float(r["p99_latency_s"])) else None,
                "slo_attainment": round(float(r["slo_attainment"]), 4),
            }
        out[str(linger)] = row
        o, ll = row[OURS], row["least_load"]
        progress(
            f"routing_quality tradeoff {cs.name} linger={linger}s: ours switches/1000={o['switches_per_1000']} "
            f"p99={o['p99_latency_s']} within={o['slo_attainment']} | least_load {ll['switches_per_1000']} "
            f"p99={ll['p99_latency_s']}"
        )
    return out


def run(*, quick: bool, command: str, seed: int = 7, scenario: Scenario | None = None) -> dict[str, Any]:
    scn = scenario or Scenario()
    n = 2000 if quick else 6000
    steps = 3 if quick else 4
    results: dict[str, Any] = {}
    curves: dict[str, Any] = {}
    all_targets: list[dict[str, Any]] = []
    tradeoffs: dict[str, Any] = {}
    sets = cost_sets()
    for cs in sets:
        progress(
            f"routing_quality {cs.name}: {scn.n_groups} groups on {scn.n_devices} devices x {scn.max_sequences} "
            f"sequences; step {cs.steps.step_s(1) * 1000:.1f} ms alone, {cs.steps.step_s(scn.max_sequences) * 1000:.1f}"
            f" ms at {scn.max_sequences}; switch disk {cs.switches.seconds('disk', scn.group_gb):.3f}s, cache "
            f"{cs.switches.seconds('cache', scn.group_gb):.4f}s; common rate {cs.rate:.1f}/s; "
            f"{n} requests"
        )
        tradeoffs[cs.name] = tradeoff(replace(scn, slo_s=cs.slo_s), cs, n, seed)
        for arrivals in ARRIVALS:
            for alpha in ALPHAS:
                key = f"{cs.name}/{arrivals}/alpha={alpha}"
                rows, tried = evaluate(replace(scn, slo_s=cs.slo_s), cs, arrivals, alpha, n, seed, steps)
                results[key] = rows
                curves[key] = tried
                all_targets += scenario_targets(key, rows)
    doc: dict[str, Any] = {
        "what": "simulated routing on batched devices: the real policy vs round robin, least load, LRU "
        "multiplexing and the Gateway API Inference Extension's default scoring",
        "seed": seed,
        "requests_per_scenario": n,
        "scenario": asdict(scn),
        "cost_sets": {
            cs.name: {
                "what": cs.what,
                "slo_s": cs.slo_s,
                "steps": asdict(cs.steps),
                "step_ms_by_batch": {b: round(cs.steps.step_s(b) * 1000, 2) for b in (1, 8, 32, 64)},
                "switches": asdict(cs.switches),
                "switch_s": {
                    "disk": cs.switches.seconds("disk", scn.group_gb),
                    "cache": cs.switches.seconds("cache", scn.group_gb),
                },
                "nominal_rate": scn.nominal_rate(cs.steps),
                "common_rate": cs.rate,
            }
            for cs in sets
        },
        "policies": list(ORDER),
        "results": results,
        "targets": all_targets,
        "targets_met": sum(t["met"] for t in all_targets),
        "targets_total": len(all_targets),
        "rate_search": curves,
        "tradeoff_linger": {
            "what": "switches vs p99 as each device lingers on its current group (SWITCH_LINGER_S), alpha 1.0, "
            "Poisson, at the common rate; the default is "
            f"{_default_linger()} s",
            "by_cost_set": tradeoffs,
        },
        "notes": [
            "every policy is a function of gpufleet.routing.alternatives.POLICIES called as is; affinity is "
            "gpufleet.routing.policy.choose_device with Costs() and the service time learned as the router learns it",
            "switches, latencies and slo_attainment are at the scenario's common rate; max_rate_at_99pct_slo "
            "searches the rate with the same seed",
            "refused requests count as misses and as infinite latency (null in JSON when a percentile is infinite)",
            "the device's queue follows gpufleet.pod_server.queue_order.next_action with its defaults",
        ],
    }
    write_result("routing_quality", doc, quick=quick, command=command)
    plot(doc)
    return doc


def _default_linger() -> float:
    from gpufleet.pod_server.queue_order import QueuePolicy

    return QueuePolicy().linger_s


def plot(doc: dict[str, Any]) -> None:
    plt = pyplot()
    keys = list(doc["results"])
    fig, axes = plt.subplots(3, 1, figsize=(13, 10), sharex=True)
    panels = [("switches_per_1000", "switches / 1,000"), ("p99_latency_s", "p99 latency (s)"),
              ("max_rate_at_99pct_slo", "max rate at 99% in objective (req/s)")]
    width = 0.8 / len(ORDER)
    for ax, (field, title) in zip(axes, panels, strict=True):
        for i, pol in enumerate(ORDER):
            vals = [doc["results"][k][pol][field] for k in keys]
            ax.bar([j + i * width for j in range(len(keys))], [v if v is not None else math.nan for v in vals],
                   width, label=pol)
        ax.set_ylabel(title, fontsize=9)
    axes[-1].set_xticks([j + 0.4 - width / 2 for j in range(len(keys))])
    axes[-1].set_xticklabels([k.replace("/", "\n") for k in keys], fontsize=7)
    axes[0].legend(fontsize=8, ncol=len(ORDER))
    fig.suptitle("Routing quality (simulated batched devices)", fontsize=11)
    save_figure(fig, "routing_quality")


def summarize(doc: dict[str, Any]) -> str:
    lines = ["## Routing quality (simulation over the real policies)", ""]
    sc = doc["scenario"]
    lines.append(
        f"{sc['n_groups']} groups ({sc['models_per_group']} models, {sc['group_gb']} GB each) on {sc['n_devices']} "
        f"batched devices of {sc['max_sequences']} sequences, CPU cache {sc['cache_limit_models']} models/device; "
        f"{doc['requests_per_scenario']} requests per scenario of ~{sc['tokens_mean']:.0f} tokens, seed {doc['seed']}."
    )
    for name, c in doc["cost_sets"].items():
        lines.append(
            f"- `{name}`: {c['what']}; step ms by batch {c['step_ms_by_batch']}; "
            f"switch disk {c['switch_s']['disk']:.3f} s, cache {c['switch_s']['cache']:.4f} s; "
            f"objective {c['slo_s']} s; common rate {c['common_rate']:.1f}/s."
        )
    lines.append("")
    rows = []
    for key, table in doc["results"].items():
        for pol in doc["policies"]:
            r = table[pol]
            rows.append([key, pol, *(r[f] for f in FIELDS)])
    lines.append(md_table(["scenario", "policy", "switches/1000", "p50 s", "p99 s", "within objective",
                           "max rate (req/s)"], rows))
    lines += ["", f"Targets met: {doc['targets_met']} of {doc['targets_total']}.", ""]
    missed = [t for t in doc["targets"] if not t["met"]]
    for t in missed:
        b = t["best_baseline"]
        lines.append(f"- MISSED {t['scenario']}: {t['target']}: ours {t['ours']}, {b['name']} {b['figure']}")
    t = doc.get("tradeoff_linger")
    if t:
        lines += ["", f"### Trade-off: {t['what']}", ""]
        rows = []
        for cs_name, by_linger in t["by_cost_set"].items():
            for linger, row in by_linger.items():
                rows.append([cs_name, linger, *(
                    f"{row[p]['switches_per_1000']} / {row[p]['p99_latency_s']}" for p in CURVE_POLICIES
                )])
        lines.append(md_table(["cost set", "linger s", *(f"{p}: switches/1000 / p99 s" for p in CURVE_POLICIES)], rows))
    lines += ["", "![routing quality](routing_quality.png)"]
    return "\n".join(lines)


__all__ = ["FIELDS", "Scenario", "run", "summarize"]
