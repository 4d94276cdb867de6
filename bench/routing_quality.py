"""Routing quality by simulation over the real policy (``choose_device``) and three baselines.

For each Zipf exponent and arrival process, every policy serves the same seeded trace on
the same simulated devices (see ``bench.sim``); the switch costs come from the measured
switch times (``bench/results/switch_cost.json``, or ``gpu.json`` when a GPU run was
recorded) scaled to the scenario's group size. Figures per policy and alpha: switches per
1,000 requests, p50 / mean / p99 latency and the share within the latency objective at
one common rate, and the highest rate that keeps 99% within the objective (a search).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

from bench.common import md_table, progress, pyplot, rounded, save_figure, write_result
from bench.policies import POLICIES, make_policy
from bench.sim import SimConfig, SwitchCosts, simulate
from bench.trace import Arrivals, TraceParams, generate

ALPHAS = ("0.8", "1.0", "1.2")
FIELDS = ("switches_per_1000", "p50_latency_s", "p99_latency_s", "slo_attainment", "max_rate_at_99pct_slo")


@dataclass(frozen=True)
class Scenario:
    n_devices: int = 4
    workers: int = 1  # NUM_WORKERS_PER_GPU (the pod server's default)
    queue_limit: int = 64  # MAX_QUEUE_PER_DEVICE (default)
    cache_limit_models: int = 4  # MAX_CPU_CACHED_MODELS (default)
    models_per_group: int = 2  # like the demo groups
    group_gb: float = 2.0  # weights per group
    n_groups: int = 8  # twice the devices
    service_mean_s: float = 0.5
    service_cv: float = 0.5
    slo_s: float = 5.0  # latency objective: 10x the mean service time
    base_load: float = 0.1  # the common rate, as a share of the devices' nominal capacity
    load_counts_held: bool = True  # the router's in-flight count (False: DeviceScheduler.load)
    expect_switches: bool = True  # the router's FleetState.expect overlay

    @property
    def nominal_rate(self) -> float:
        """Requests/s the devices could serve if no switch ever happened."""
        return self.n_devices * self.workers / self.service_mean_s

    @property
    def base_rate(self) -> float:
        return self.base_load * self.nominal_rate


def switch_costs() -> SwitchCosts:
    from bench.switch_cost import recorded_costs

    fit, origin = recorded_costs()
    if fit is None:
        progress("routing_quality: no recorded switch costs; using defaults")
        return SwitchCosts(origin="defaults (no switch_cost.json)")
    disk, cache = fit["from_pretrained"], fit["cache"]
    return SwitchCosts(
        disk_fixed_s=disk["fixed_s"],
        disk_s_per_gb=disk["s_per_gb"],
        # A switch is never free: the scheduler's own bookkeeping takes a moment.
        cache_fixed_s=max(cache["fixed_s"], 1e-4),
        cache_s_per_gb=cache["s_per_gb"],
        origin=origin,
    )


def sim_config(scn: Scenario, costs: SwitchCosts) -> SimConfig:
    return SimConfig(
        n_devices=scn.n_devices,
        workers=scn.workers,
        queue_limit=scn.queue_limit,
        cache_limit_models=scn.cache_limit_models,
        models_per_group=scn.models_per_group,
        group_gb=scn.group_gb,
        costs=costs,
        initial_group="g00",
        load_counts_held=scn.load_counts_held,
        expect_switches=scn.expect_switches,
    )


def trace_params(scn: Scenario, alpha: float, arrivals: Arrivals, n: int, seed: int) -> TraceParams:
    return TraceParams(
        n_requests=n,
        n_groups=scn.n_groups,
        alpha=alpha,
        rate=scn.base_rate,
        arrivals=arrivals,
        service_mean_s=scn.service_mean_s,
        service_cv=scn.service_cv,
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
    scn: Scenario,
    costs: SwitchCosts,
    arrivals: Arrivals,
    n: int,
    seed: int,
    steps: int,
    alphas: tuple[str, ...] = ALPHAS,
    label: str = "",
) -> tuple[dict[str, Any], dict[str, Any]]:
    cfg = sim_config(scn, costs)
    table: dict[str, Any] = {name: {} for name in POLICIES}
    curves: dict[str, Any] = {name: {} for name in POLICIES}
    for alpha in alphas:
        p = trace_params(scn, float(alpha), arrivals, n, seed)
        trace = generate(p)
        for name in POLICIES:
            policy = make_policy(name, seed)
            s = simulate(trace, cfg, policy, slo_s=scn.slo_s).summary(scn.slo_s)
            best, tried = max_rate(name, p, cfg, scn.slo_s, seed, steps=steps, nominal=scn.nominal_rate)
            row = {
                "switches_per_1000": s["switches_per_1000"],
                "p50_latency_s": s["p50_latency_s"],
                "p99_latency_s": s["p99_latency_s"],
                "slo_attainment": s["slo_attainment"],
                "max_rate_at_99pct_slo": best,
                "mean_latency_s": s["mean_latency_s"],
                "switches_from_disk_per_1000": 1000.0 * float(s["switches_from_disk"]) / n,
                "rejected": s["rejected"],
            }
            reasons = getattr(policy, "reasons", None)
            if reasons:
                row["route_reasons"] = dict(sorted(reasons.items(), key=lambda kv: -kv[1]))
            table[name][alpha] = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}
            curves[name][alpha] = sorted(tried)
            progress(
                f"routing_quality {label or arrivals} alpha={alpha} {name:13s} "
                f"switches/1000={s['switches_per_1000']:6.1f} "
                f"(disk {row['switches_from_disk_per_1000']:5.1f}) p99={s['p99_latency_s']:.3f}s "
                f"within={s['slo_attainment']:.4f} max_rate={best:.2f}/s"
            )
    return table, curves


def targets(table: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for alpha in table["affinity"]:
        ours, ll, lru = table["affinity"][alpha], table["least_load"][alpha], table["lru_multiplex"][alpha]
        others = [table[p][alpha]["p99_latency_s"] for p in POLICIES if p != "affinity"]
        p99 = ours["p99_latency_s"]
        ll_rate = ll["max_rate_at_99pct_slo"]
        rate_ratio = ours["max_rate_at_99pct_slo"] / ll_rate if ll_rate else math.inf
        out[alpha] = {
            "switches_vs_least_load": ours["switches_per_1000"] / ll["switches_per_1000"]
            if ll["switches_per_1000"]
            else None,
            "switches_half_of_least_load": ours["switches_per_1000"] <= 0.5 * ll["switches_per_1000"],
            "switches_vs_lru_multiplex": ours["switches_per_1000"] / lru["switches_per_1000"]
            if lru["switches_per_1000"]
            else None,
            "switches_at_most_lru_multiplex": ours["switches_per_1000"] <= lru["switches_per_1000"],
            "p99_best": p99 is not None and all(o is None or p99 < o for o in others),
            "p99_vs_best_other": p99 / min(o for o in others if o is not None) if p99 is not None else None,
            "max_rate_vs_least_load": rate_ratio,
            "max_rate_1_5x_least_load": rate_ratio >= 1.5,
        }
    return out


# What-if variations, at alpha 1.0 with Poisson arrivals: each changes one thing of the scenario.
SENSITIVITY: dict[str, tuple[str, dict[str, Any], SwitchCosts | None]] = {
    "pod_dispatch_view": (
        "routing on what a multi-device pod's own dispatcher sees: DeviceScheduler.load (misses jobs held "
        "for a switch) and no expected switches",
        {"load_counts_held": False, "expect_switches": False},
        None,
    ),
    "no_expected_switches": ("the router's view without FleetState.expect", {"expect_switches": False}, None),
    "gpu_like_costs": (
        "switch costs of the policy's own defaults (cache 0.5 s, disk 3 s per group), GPU-like",
        {},
        SwitchCosts(
            disk_fixed_s=3.0, disk_s_per_gb=0.0, cache_fixed_s=0.5, cache_s_per_gb=0.0, origin="Costs() defaults"
        ),
    ),
    "more_groups": ("12 groups instead of 8 (3x the devices)", {"n_groups": 12}, None),
    "two_workers": (
        "2 workers per device (NUM_WORKERS_PER_GPU=2), same common rate",
        {"workers": 2, "base_load": 0.05},
        None,
    ),
}


def router_baselines(scn: Scenario, costs: SwitchCosts, n: int, seed: int, steps: int) -> dict[str, Any]:
    """The router's own baseline implementations (gpufleet.routing.alternatives), alpha 1.0, Poisson."""
    from bench.policies import SnapshotPolicy, router_policies

    cfg = sim_config(scn, costs)
    p = trace_params(scn, 1.0, "poisson", n, seed)
    trace = generate(p)
    out: dict[str, Any] = {}
    for name, fn in router_policies().items():
        if name == "affinity":
            continue

        def factory(s: int, name: str = name, fn: Any = fn) -> SnapshotPolicy:
            return SnapshotPolicy(name, fn)

        key = f"router:{name}"
        POLICIES[key] = factory  # type: ignore[assignment]
        try:
            s = simulate(trace, cfg, factory(seed), slo_s=scn.slo_s).summary(scn.slo_s)
            best, _ = max_rate(key, p, cfg, scn.slo_s, seed, steps=steps, nominal=scn.nominal_rate)
        finally:
            del POLICIES[key]
        out[name] = {
            "switches_per_1000": round(float(s["switches_per_1000"]), 4),
            "p50_latency_s": rounded(float(s["p50_latency_s"])),
            "p99_latency_s": rounded(float(s["p99_latency_s"])),
            "slo_attainment": round(float(s["slo_attainment"]), 4),
            "max_rate_at_99pct_slo": round(best, 4),
        }
        progress(f"routing_quality router baseline {name}: {out[name]}")
    return out


# Cost parameters of the real policy tried, each alone, to see whether tuning closes a gap.
COSTS_VARIANTS: dict[str, dict[str, float]] = {
    "defaults": {},
    "residency_penalty_s=5 (the default before this benchmark)": {"residency_penalty_s": 5.0},
    "residency_penalty_s=1": {"residency_penalty_s": 1.0},
    "min_residency_s=60": {"min_residency_s": 60.0},
    "residency_penalty_s=1, min_residency_s=60": {"residency_penalty_s": 1.0, "min_residency_s": 60.0},
}


def policy_tuning(scn: Scenario, costs: SwitchCosts, n: int, seed: int, steps: int) -> dict[str, Any]:
    """choose_device with other Costs, alpha 1.0, Poisson: does tuning close the gaps?"""
    from bench.policies import Affinity
    from gpufleet.routing.policy import Costs

    cfg = sim_config(scn, costs)
    p = trace_params(scn, 1.0, "poisson", n, seed)
    trace = generate(p)
    out: dict[str, Any] = {}
    for label, changes in COSTS_VARIANTS.items():
        c = Costs(**changes)

        def factory(s: int, c: Costs = c) -> Affinity:
            return Affinity(s, c)

        key = f"tuning:{label}"
        POLICIES[key] = factory  # type: ignore[assignment]
        try:
            r = simulate(trace, cfg, factory(seed), slo_s=scn.slo_s).summary(scn.slo_s)
            best, _ = max_rate(key, p, cfg, scn.slo_s, seed, steps=steps, nominal=scn.nominal_rate)
        finally:
            del POLICIES[key]
        out[label] = {
            "costs": changes,
            "switches_per_1000": round(float(r["switches_per_1000"]), 2),
            "switches_from_disk_per_1000": round(1000.0 * float(r["switches_from_disk"]) / n, 2),
            "p99_latency_s": rounded(float(r["p99_latency_s"])),
            "slo_attainment": round(float(r["slo_attainment"]), 4),
            "max_rate_at_99pct_slo": round(best, 4),
        }
        progress(f"routing_quality tuning {label}: {out[label]}")
    return out


def run(*, quick: bool, command: str, seed: int = 7, scenario: Scenario | None = None) -> dict[str, Any]:
    scn = scenario or Scenario()
    costs = switch_costs()
    n = 4000 if quick else 20_000
    steps = 4 if quick else 6
    cfg = sim_config(scn, costs)
    progress(
        f"routing_quality: {scn.n_groups} groups on {scn.n_devices} devices x {scn.workers} workers, {n} requests, "
        f"switch from disk {costs.seconds('disk', scn.group_gb):.3f}s, "
        f"from cache {costs.seconds('cache', scn.group_gb):.4f}s "
        f"({costs.origin}); common rate {scn.base_rate:.2f}/s"
    )
    poisson, poisson_curves = evaluate(scn, costs, "poisson", n, seed, steps)
    bursty, bursty_curves = evaluate(scn, costs, "bursty", n, seed, steps)
    sensitivity: dict[str, Any] = {}
    for key, (what, changes, alt_costs) in SENSITIVITY.items():
        s_scn = replace(scn, **changes)
        s_costs = alt_costs or costs
        table, _ = evaluate(s_scn, s_costs, "poisson", n, seed, steps, alphas=("1.0",), label=key)
        sensitivity[key] = {
            "what": what,
            "changes": changes,
            "switch_costs": {
                "disk_s": s_costs.seconds("disk", s_scn.group_gb),
                "cache_s": s_costs.seconds("cache", s_scn.group_gb),
            },
            "rate": s_scn.base_rate,
            "figures": {pol: table[pol]["1.0"] for pol in POLICIES},
            "targets": targets(table)["1.0"],
        }
    router_table = router_baselines(scn, costs, n, seed, steps)
    tuning = policy_tuning(scn, costs, n, seed, steps)
    params = trace_params(scn, 1.0, "poisson", n, seed).to_dict()
    params.pop("alpha")
    main, main_details = _split(poisson)
    burst, burst_details = _split(bursty)
    doc: dict[str, Any] = {
        **main,
        "seed": seed,
        "trace": {**params, "alphas": [float(a) for a in ALPHAS], "rate": round(scn.base_rate, 4)},
        "scenario": {**asdict(scn), "nominal_rate": scn.nominal_rate, "base_rate": scn.base_rate},
        "switch_costs": {
            **asdict(costs),
            "disk_s_for_group": costs.seconds("disk", scn.group_gb),
            "cache_s_for_group": costs.seconds("cache", scn.group_gb),
        },
        "sim": asdict(replace(cfg, costs=costs)) | {"group_gb_overrides": {}},
        "policy_costs": _policy_costs(),
        "targets": targets(poisson),
        "bursty": burst,
        "bursty_targets": targets(bursty),
        "details": {"poisson": main_details, "bursty": burst_details},
        "sensitivity": sensitivity,
        "router_baselines": router_table,
        "policy_tuning": tuning,
        "rate_search": {"poisson": poisson_curves, "bursty": bursty_curves},
        "notes": [
            "top-level policy -> alpha figures are for Poisson arrivals; 'bursty' holds the same for bursty arrivals; "
            "'details' holds mean latency, switches from disk, refusals and the policy's route reasons",
            "switches_per_1000, latencies and slo_attainment are at the common rate trace.rate; "
            "max_rate_at_99pct_slo searches the rate with the same seed",
            "refused requests count as misses and as infinite latency (null in JSON when a percentile is infinite)",
            "affinity is gpufleet.routing.policy.choose_device with its default Costs(), fed exact device states",
        ],
    }
    write_result("routing_quality", doc, quick=quick, command=command)
    plot(doc)
    return doc


def _split(table: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """policy -> alpha -> exactly the five headline fields, and the other figures apart."""
    head = {p: {a: {f: row[f] for f in FIELDS} for a, row in rows.items()} for p, rows in table.items()}
    rest = {
        p: {a: {k: v for k, v in row.items() if k not in FIELDS} for a, row in rows.items()}
        for p, rows in table.items()
    }
    return head, rest


def _policy_costs() -> dict[str, Any]:
    from gpufleet.routing.policy import Costs

    return asdict(Costs())


def plot(doc: dict[str, Any]) -> None:
    plt = pyplot()
    policies = list(POLICIES)
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    panels = [
        ("switches_per_1000", "switches per 1,000 requests", False),
        ("p99_latency_s", "p99 latency (s) at the common rate", True),
        ("slo_attainment", "share within the objective at the common rate", False),
        ("max_rate_at_99pct_slo", "max rate at 99% within objective (req/s)", False),
    ]
    width = 0.8 / len(policies)
    for ax, (key, title, log) in zip(axes.flat, panels, strict=True):
        for i, pol in enumerate(policies):
            vals = [doc[pol][a][key] for a in ALPHAS]
            vals = [v if v is not None else float("nan") for v in vals]
            ax.bar([j + i * width for j in range(len(ALPHAS))], vals, width, label=pol)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(ALPHAS))])
        ax.set_xticklabels([f"alpha {a}" for a in ALPHAS])
        ax.set_title(title, fontsize=10)
        if log:
            ax.set_yscale("log")
        if key == "p99_latency_s":
            ax.axhline(doc["scenario"]["slo_s"], color="k", ls="--", lw=1, label="objective")
    handles, labels = axes.flat[1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=9)
    fig.subplots_adjust(bottom=0.1)
    fig.suptitle(
        f"Routing quality (simulated, Poisson, {doc['trace']['n_requests']} "
        f"requests, rate {doc['trace']['rate']:.2f}/s)",
        fontsize=11,
    )
    save_figure(fig, "routing_quality")

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), sharey=True)
    for ax, alpha in zip(axes, ALPHAS, strict=True):
        for pol in policies:
            pts = doc["rate_search"]["poisson"][pol][alpha]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=pol)
        ax.axhline(0.99, color="k", ls="--", lw=1)
        ax.set_xscale("log")
        ax.set_title(f"alpha {alpha}: share within objective vs rate", fontsize=10)
        ax.set_xlabel("arrival rate (req/s)")
    axes[0].set_ylabel("share within objective (early stop: 0)")
    axes[0].legend(fontsize=8)
    save_figure(fig, "routing_quality_rate")


def summarize(doc: dict[str, Any]) -> str:
    lines = ["## Routing quality (simulation over the real policy)", ""]
    sc, tr, co = doc["scenario"], doc["trace"], doc["switch_costs"]
    lines.append(
        f"{sc['n_groups']} groups ({sc['models_per_group']} models, "
        f"{sc['group_gb']} GB each) on {sc['n_devices']} devices "
        f"x {sc['workers']} workers, CPU cache {sc['cache_limit_models']} models/device; {tr['n_requests']} requests, "
        f"seed {doc['seed']}, service lognormal mean {sc['service_mean_s']} s; objective {sc['slo_s']} s; common rate "
        f"{tr['rate']:.2f}/s ({sc['base_load']:.0%} of nominal). Switch "
        f"from disk {co['disk_s_for_group']:.3f} s, from cache "
        f"{co['cache_s_for_group']:.4f} s ({co['origin']})."
    )
    pc = doc.get("policy_costs") or {}
    lines.append("")
    lines.append(
        "Policies see the router's view (every request in flight counts as load; a request sent to a device that does "
        "not hold its group makes the router expect that switch); affinity is `choose_device` with `Costs()` "
        f"(residency_penalty_s={pc.get('residency_penalty_s')}, min_residency_s={pc.get('min_residency_s')}) and the "
        "service time learned as the router learns it."
    )
    for label, key in (("Poisson arrivals", None), ("Bursty arrivals", "bursty")):
        table = doc if key is None else doc[key]
        lines += ["", f"### {label}", ""]
        rows = []
        for pol in POLICIES:
            for a in ALPHAS:
                r = table[pol][a]
                rows.append([pol, a, *(r[f] for f in FIELDS)])
        lines.append(
            md_table(
                ["policy", "alpha", "switches/1000", "p50 s", "p99 s", "within objective", "max rate (req/s)"], rows
            )
        )
        tg = doc["targets" if key is None else "bursty_targets"]
        lines.append("")
        for a in ALPHAS:
            t = tg[a]
            lines.append(
                f"- alpha {a}: switches {_ratio(t['switches_vs_least_load'])} of least_load (target ≤ 0.5: "
                f"{_ok(t['switches_half_of_least_load'])}), {_ratio(t['switches_vs_lru_multiplex'])} of lru_multiplex "
                f"(target ≤ 1: {_ok(t['switches_at_most_lru_multiplex'])}), best p99: {_ok(t['p99_best'])}, max rate "
                f"{_ratio(t['max_rate_vs_least_load'])} of least_load (target "
                f"≥ 1.5: {_ok(t['max_rate_1_5x_least_load'])})"
            )
    sens = doc.get("sensitivity") or {}
    if sens:
        lines += ["", "### What if (alpha 1.0, Poisson; one change each)", ""]
        rows = []
        for key, v in sens.items():
            for pol in POLICIES:
                f = v["figures"][pol]
                rows.append([key, pol, *(f[k] for k in FIELDS)])
        lines.append(
            md_table(["variation", "policy", "switches/1000", "p50 s", "p99 s", "within objective", "max rate"], rows)
        )
        lines.append("")
        for key, v in sens.items():
            t = v["targets"]
            lines.append(
                f"- {key}: {v['what']}. Ours: switches {_ratio(t['switches_vs_least_load'])} of least_load, "
                f"{_ratio(t['switches_vs_lru_multiplex'])} of lru_multiplex; "
                f"p99 {_ratio(t['p99_vs_best_other'])} of the best "
                f"other; max rate {_ratio(t['max_rate_vs_least_load'])} of least_load."
            )
    rb = doc.get("router_baselines") or {}
    if rb:
        lines += [
            "",
            "### The router's own baselines (gpufleet.routing.alternatives), alpha 1.0, Poisson",
            "",
            "These differ from the issue's definitions above: its lru_multiplex "
            "only counts a group *current* on a device "
            "as loaded (not one parked in the CPU cache) and evicts "
            "the least recently used device; its least_load breaks "
            "ties by device name.",
            "",
        ]
        lines.append(md_table(["policy", *FIELDS], [[k, *(v[f] for f in FIELDS)] for k, v in rb.items()]))
    tun = doc.get("policy_tuning") or {}
    if tun:
        lines += ["", "### Tuning the real policy's Costs (affinity only, alpha 1.0, Poisson)", ""]
        lines.append(
            md_table(
                ["Costs", "switches/1000", "from disk/1000", "p99 s", "within objective", "max rate"],
                [
                    [
                        k,
                        v["switches_per_1000"],
                        v["switches_from_disk_per_1000"],
                        v["p99_latency_s"],
                        v["slo_attainment"],
                        v["max_rate_at_99pct_slo"],
                    ]
                    for k, v in tun.items()
                ],
            )
        )
    lines += ["", "![routing quality](routing_quality.png)", "", "![rate search](routing_quality_rate.png)"]
    return "\n".join(lines)


def _ratio(x: float | None) -> str:
    if x is None:
        return "n/a"
    return "∞x" if math.isinf(x) else f"{x:.2f}x"


def _ok(b: bool) -> str:
    return "met" if b else "MISSED"


__all__ = ["FIELDS", "Scenario", "rounded", "run", "summarize"]
