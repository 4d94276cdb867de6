"""GPU pools on the real control plane: 6 groups on a 2-pod GpuPool vs the same 6 groups as
dedicated ModelGroups on 6 pods, the same Zipf trace through the router.

A real kube-apiserver, scheduler and controller manager with kwok GPU nodes
(tests/e2e/cluster), the chart installed as users install it, ``gpufleet operator`` and
``gpufleet router`` here as processes with the chart's env and tokens, and a real
``gpufleet serve`` per pod kwok runs (one CPU device each, as tests/e2e does). Each layout
is warmed (every model answers once), its service time calibrated through the router, then
the trace is replayed open loop. The simulator (bench/sim.py, the router's own policy) is run
on the same trace with the pool's measured costs: its switches are the check on the pool's.

Not a GPU figure: the 6 dedicated pods share this machine's 2 cores (on a cluster they would
have a GPU each), and a tiny model's switch is cheap. What it shows is the shape: the same
trace served on a third of the pods, with every request answered and few, cheap switches.

    python -m bench pool [--quick]
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml  # type: ignore[import-untyped]

from bench.common import REPO, md_table, percentile, progress, pyplot, rounded, save_figure, write_result
from bench.load import replay as replay_trace
from bench.load import run as run_async
from bench.load import sequential
from bench.models import build_tiny_groups
from bench.procs import mean_switch_seconds, switch_counts, switch_time_totals
from bench.replay import calibrate, predict
from bench.trace import TraceParams, generate
from gpufleet.pod_server.queue_order import QueuePolicy

NAME = "pool"
N_GROUPS = 6
POOL_PODS = 2
HOST_CACHE_MODELS = 2  # the current group's host copy and one parked group, as bench replay
RATE = 3.0  # requests/s: keeps the pool's two devices busy (about 60% of what they serve) but not saturated
NS = "pool-bench"
RELEASE = "gfpool"
SYSTEM_NS = f"{RELEASE}-system"
POD_SELECTOR = "gpufleet.io/component=pod-server"
READY_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class Model:
    group: str
    id: str
    source: str


def models() -> list[Model]:
    doc = json.loads(build_tiny_groups(N_GROUPS).read_text())
    return [Model(g, spec["models"][0]["id"], spec["models"][0]["source"]) for g, spec in sorted(doc["groups"].items())]


# The layouts measured: the pool with the pod's default linger (a device waits SWITCH_LINGER_S for
# more of its group before switching away: fewer switches), the pool without it (lower latency,
# more switches: the trade-off between the two pool targets), and the dedicated pods.
LAYOUTS: dict[str, float | None] = {"pool": QueuePolicy().linger_s, "pool-no-linger": 0.0, "dedicated": None}


def manifests(layout: str, ms: list[Model]) -> list[dict[str, Any]]:
    """The layout as a user would apply it."""
    docs: list[dict[str, Any]] = []
    linger = LAYOUTS[layout]
    pooled = linger is not None
    if pooled:
        docs.append({"apiVersion": "gpufleet.io/v1alpha1", "kind": "GpuPool", "metadata": {"name": "bench"},
                     "spec": {"replicas": POOL_PODS, "hostCache": {"models": HOST_CACHE_MODELS},
                              "switch": {"lingerSeconds": linger}}})
    for m in ms:
        spec: dict[str, Any] = {"models": [{"id": m.id, "source": m.source, "dtype": "float32",
                                            "contextLength": 256}]}
        spec.update({"pool": "bench"} if pooled else {"replicas": 1, "cpuCacheSize": HOST_CACHE_MODELS})
        docs.append({"apiVersion": "gpufleet.io/v1alpha1", "kind": "ModelGroup", "metadata": {"name": m.group},
                     "spec": spec})
    return docs


@contextmanager
def control_plane(workdir: Path) -> Iterator[Any]:
    """The cluster, the chart, the local operator and router, and the pod-server farm."""
    sys.path.insert(0, str(REPO / "tests" / "e2e"))  # the e2e harness is the top-level package `cluster`
    from cluster import TestCluster
    from cluster.binaries import ensure_binaries
    from operator_support import PodServerFarm, install_chart, local_control, which

    bin_dir = ensure_binaries()
    with ExitStack() as stack:
        c = stack.enter_context(TestCluster(workdir / "cluster"))
        for i in range(2):
            c.add_gpu_node(f"{RELEASE}-gpu-{i}", gpus=4)
        for ns in (SYSTEM_NS, NS):
            c.api.create("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
        progress("pool: installing the chart")
        install_chart(which("kubectl", bin_dir), which("helm", bin_dir), c.kubeconfig, c.api, RELEASE, SYSTEM_NS,
                      [NS])
        control = local_control(c.api, RELEASE, SYSTEM_NS, workdir, router_env={"LOG_LEVEL": "WARNING"})
        farm = PodServerFarm(c.api, NS, workdir / "pods", {}, extra_env={"LOG_LEVEL": "WARNING"})
        stack.enter_context(control.operator)
        stack.enter_context(control.router)
        stack.enter_context(farm)
        yield c, control, farm, which("kubectl", bin_dir)


def _apply(kubectl: str, kubeconfig: str, docs: list[dict[str, Any]]) -> None:
    import subprocess

    text = yaml.safe_dump_all(docs)
    subprocess.run([kubectl, "--kubeconfig", kubeconfig, "apply", "-n", NS, "-f", "-"], input=text, text=True,
                   check=True, capture_output=True)


def _pods(api: Any) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = api.get(f"/api/v1/namespaces/{NS}/pods?labelSelector={POD_SELECTOR}")["items"]
    return [p for p in items if not p["metadata"].get("deletionTimestamp")]


def _wait(check: Any, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"pool bench: {what} not within {timeout:.0f} s")
        time.sleep(1.0)


def _routable(router: str, ms: list[Model], pods: list[str]) -> bool:
    try:
        with httpx.Client(base_url=router, timeout=10, trust_env=False) as http:
            ids = {m["id"] for m in http.get("/v1/models").json()["data"]}
            fleet = http.get("/api/fleet").json()["pods"]
    except httpx.HTTPError:
        return False
    return {f"{NS}/{m.id}" for m in ms} <= ids and all(
        fleet.get(p, {}).get("state") == "ready" and not fleet[p]["ejected"] for p in pods
    )


def measure(layout: str, ms: list[Model], trace: Any, env: Any) -> dict[str, Any]:
    c, control, farm, kubectl = env
    progress(f"pool: {layout}: applying {N_GROUPS} ModelGroups")
    _apply(kubectl, c.kubeconfig, manifests(layout, ms))
    want = POOL_PODS if LAYOUTS[layout] is not None else N_GROUPS
    _wait(lambda: len(_pods(c.api)) == want and len(farm.running) == want, f"{want} pod servers running",
          READY_TIMEOUT_S)
    names = sorted(p["metadata"]["name"] for p in _pods(c.api))
    _wait(lambda: _routable(control.router_url, ms, names), "the router routes every model", READY_TIMEOUT_S)
    pod_urls = [f"http://{p['status']['podIP']}:8000" for p in _pods(c.api)]
    model_of = {m.group: f"{NS}/{m.id}" for m in ms}
    progress(f"pool: {layout}: warming every model, then calibrating the service time")
    for m in ms:  # each model's first load (and one-off imports) stays out of the replay
        run_async(sequential(control.router_url, model_of[m.group], [4]))
    cal = calibrate(control.router_url, model_of[ms[0].group])
    before, times_before = switch_counts(pod_urls), switch_time_totals(pod_urls)
    progress(f"pool: {layout}: replaying {len(trace)} requests at {RATE}/s on {len(pod_urls)} pods")
    started = time.perf_counter()
    outcomes = run_async(replay_trace(control.router_url, trace, model_of.__getitem__))
    wall = time.perf_counter() - started
    after, seen = switch_counts(pod_urls), mean_switch_seconds(switch_time_totals(pod_urls), times_before)
    lat = [o.latency_s if o.status == 200 else math.inf for o in outcomes]
    ok = [x for x in lat if not math.isinf(x)]
    refused = [o for o in outcomes if o.status == 429]
    switches = round(sum(after.values()) - sum(before.values()))
    result = {
        "pods": len(pod_urls),
        "gpu_pods": len(pod_urls),
        "answered": len(ok),
        "answers_per_s": len(ok) / wall,
        "p50_latency_s": percentile(lat, 50),
        "p99_latency_s": percentile(lat, 99),
        "mean_latency_s": statistics.fmean(ok) if ok else math.nan,
        "switches": switches,
        "switches_from_disk": round(after.get("disk", 0) - before.get("disk", 0)),
        "switches_from_cache": round(after.get("cache", 0) - before.get("cache", 0)),
        "switches_per_1000": 1000 * switches / len(trace),
        "refused_429": len(refused),
        "refused_429_without_retry_after": sum(1 for o in refused if not o.retry_after),
        "failed_other": sum(1 for o in outcomes if o.status not in (200, 429)),
        "error_samples": sorted({f"{o.status}: {o.error}" for o in outcomes if o.status != 200})[:5],
        "switch_seconds_measured": seen,
        "calibration": cal,
    }
    progress(
        f"pool: {layout}: {result['answered']}/{len(trace)} answered, p50 {result['p50_latency_s']:.3f}s "
        f"p99 {result['p99_latency_s']:.3f}s, {switches} switches"
    )
    progress(f"pool: {layout}: removing it")
    import subprocess

    for kind in ("modelgroups", "gpupools"):
        subprocess.run([kubectl, "--kubeconfig", c.kubeconfig, "delete", kind, "--all", "-n", NS],
                       check=True, capture_output=True, timeout=120)
    _wait(lambda: not _pods(c.api) and not farm.running, "every pod gone", 180)
    return result


def run(*, quick: bool, command: str, seed: int = 11) -> dict[str, Any]:
    ms = models()
    params = TraceParams(
        n_requests=100 if quick else 400,
        n_groups=N_GROUPS,
        alpha=1.0,
        rate=RATE,
        arrivals="poisson",
        service_mean_s=0.4,
        service_cv=0.5,
        tokens_per_s=40.0,
        seed=seed,
    )
    trace = generate(params)
    layouts: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="gpufleet-pool-bench-") as tmp, control_plane(Path(tmp)) as env:
        for layout in LAYOUTS:
            layouts[layout] = measure(layout, ms, trace, env)
    dedicated = layouts["dedicated"]
    unanswered = sum(v["failed_other"] + v["refused_429_without_retry_after"] for v in layouts.values())
    targets: list[dict[str, Any]] = [
        {"target": "every request answered (no non-2xx but 429 with Retry-After), every layout",
         "measured": unanswered, "met": unanswered == 0},
    ]
    for layout, linger in LAYOUTS.items():
        if linger is None:
            continue
        pool = layouts[layout]
        seen = pool["switch_seconds_measured"]
        sim = predict(trace, "affinity", pool["calibration"], seen.get("disk", 0.05), seen.get("cache", 5e-4),
                      QueuePolicy(linger_s=linger))
        pool["simulated"] = sim
        sim_per_1000 = 1000 * sim["switches"] / len(trace)
        diff = abs(pool["switches_per_1000"] - sim_per_1000) / max(sim_per_1000, 1e-9)
        targets += [
            {"target": f"{layout} (linger {linger} s): p99 within 3x of the dedicated layout's",
             "measured": pool["p99_latency_s"] / dedicated["p99_latency_s"],
             "met": pool["p99_latency_s"] <= 3 * dedicated["p99_latency_s"]},
            {"target": f"{layout}: switches per 1,000 requests within 20% of the simulator's (same trace, costs)",
             "measured": pool["switches_per_1000"], "simulated": sim_per_1000, "relative_difference": diff,
             "met": diff <= 0.20},
        ]
    doc = {
        "what": f"{N_GROUPS} groups on a {POOL_PODS}-pod GpuPool vs {N_GROUPS} dedicated ModelGroups, the same trace "
        "through the router, on the real control plane with kwok GPU nodes and real CPU pod servers",
        "trace": asdict(params),
        "rate_note": f"{RATE} requests/s keeps the pool's two devices busy but not saturated",
        "host_cache_models": HOST_CACHE_MODELS,
        "lingers": LAYOUTS,
        "layouts": layouts,
        "targets": targets,
        "notes": [
            "the dedicated layout's 6 pod servers share this machine's 2 cores; on a cluster each has a GPU",
            "switches are the pods' gpufleet_group_switches_total over the replay (warm-up and calibration "
            "excluded); the simulator runs the router's affinity policy on the same trace with each pool "
            "layout's calibrated service time, measured switch seconds and linger",
        ],
    }
    write_result(NAME, doc, quick=quick, command=command)
    plot(doc)
    return doc


def plot(doc: dict[str, Any]) -> None:
    plt = pyplot()
    layouts = list(doc["layouts"])
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, key, title in (
        (axes[0], "gpu_pods", "GPU pods used"),
        (axes[1], "p99_latency_s", "p50 / p99 latency (s)"),
        (axes[2], "switches_per_1000", "switches per 1,000 requests"),
    ):
        vals = [doc["layouts"][k][key] for k in layouts]
        xs = list(range(len(layouts)))
        ax.bar(xs, vals, 0.5)
        if key == "p99_latency_s":
            ax.plot(xs, [doc["layouts"][k]["p50_latency_s"] for k in layouts], "ko", label="p50")
            ax.legend(fontsize=8)
        if key == "switches_per_1000":
            sims = [1000 * doc["layouts"][k]["simulated"]["switches"] / doc["trace"]["n_requests"]
                    if "simulated" in doc["layouts"][k] else math.nan for k in layouts]
            ax.plot(xs, sims, "k_", markersize=20, label="simulated")
            ax.legend(fontsize=8)
        ax.set_xticks(xs)
        ax.set_xticklabels(layouts)
        ax.set_title(title, fontsize=10)
    fig.suptitle(f"{N_GROUPS} groups, Zipf 1.0, {doc['trace']['n_requests']} requests at {RATE}/s", fontsize=11)
    save_figure(fig, NAME)


def summarize(doc: dict[str, Any]) -> str:
    rows = [
        [k, v["gpu_pods"], rounded(v["answers_per_s"], 2), rounded(v["p50_latency_s"]), rounded(v["p99_latency_s"]),
         v["switches"], rounded(v["switches_per_1000"], 1), v["refused_429"], v["failed_other"]]
        for k, v in doc["layouts"].items()
    ]
    sims = "; ".join(
        f"{k}: {v['simulated']['switches']} switches, p99 {rounded(v['simulated']['p99_latency_s'])} s"
        for k, v in doc["layouts"].items() if "simulated" in v
    )
    return "\n".join([
        "## GPU pools on the real control plane (`python -m bench pool`)",
        "",
        f"{doc['what']}. {doc['rate_note']}.",
        "",
        md_table(["layout", "GPU pods", "answers/s", "p50 s", "p99 s", "switches", "per 1,000", "429", "failed"],
                 rows),
        "",
        f"Simulated (same trace, each pool layout's costs and linger): {sims}.",
        "",
        "![pool](pool.png)",
    ])
