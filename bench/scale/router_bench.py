"""The router half of issue 14's scale benchmark: ``python -m bench.scale router``.

1. decision time p50/p99 and the state's memory per fleet size, in-process through the real
   ``FleetState`` + ``Decider`` (bench/scale/decision.py);
2. background traffic per idle pod with the router as it is (``background.measure``): a
   window that starts once every pod is ready, beside the steady rate the settings imply
   (2 polls per IDLE_POLL_S per idle pod: one status, one load), checked by a run with a
   short IDLE_POLL_S whose measured rate is scaled to the default;
3. proxied throughput through the router process at 2 pods and at 1,000 pods: a closed-loop
   load generator (aiohttp, fixed concurrency, bounded in time) against emulated pods that
   answer at once;
4. restart: the router in front of 1,000 emulated pods is killed (SIGKILL) and started again
   on the same port; the time until requests for the fleet's rarest groups land on pods
   holding them current (``x-served-by-pod``/``x-served-by-device`` vs the seeded layout,
   no group switch);
5. ``bench/results/scale.json`` with every figure, the command and the ``targets`` (with
   the operator's from ``scale_operator.json`` when that exists), and ``scale.png``.

Every step is bounded in time and says what it does on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import random
import signal
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx

from bench.common import RESULTS, progress, pyplot, read_result, save_figure, write_result
from bench.scale import background, decision
from bench.scale.emulator import EmulatorProcess, Timing, start_emulator
from bench.scale.layout import EmulatedDevice, EmulatedPod, FleetLayout, make_layout
from bench.scale.router_proc import start_router, state_counts, wait_all_ready
from gpufleet.api.pod_status import PodStatus
from gpufleet.local.processes import Process, free_port
from gpufleet.router.settings import RouterSettings

NAME = "scale"
DEVICES_PER_POD = 8
GROUPS = 32  # the emulator's default catalog
FAST = Timing(ttft_s=0.0, per_token_s=0.0, switch_cache_s=0.0, switch_disk_s=0.0)  # answers at once
RESTART_READY_WAIT_S = 100.0  # after a restart, how long to wait for every pod ready (bounds the run)
PROBE_GROUPS = 4  # restart: the rarest groups (by pods holding them current) must land right


def _setting(name: str) -> float:
    value = RouterSettings.model_fields[name].default
    assert isinstance(value, int | float)
    return float(value)


# ---- 2. background -----------------------------------------------------------------------------


def background_step(pods: list[int], window_s: float, check_pods: int, check_idle_s: float, log_dir: Path,
                    ready_timeout_s: float) -> dict[str, Any]:
    idle_poll_s = _setting("idle_poll_s")
    rows = [background.measure(n, DEVICES_PER_POD, window_s, log_dir, ready_timeout_s) for n in pods]
    check = background.measure(check_pods, DEVICES_PER_POD, max(window_s, 3 * check_idle_s), log_dir,
                               ready_timeout_s, env={"IDLE_POLL_S": str(check_idle_s)})
    analytic = 2.0 / idle_poll_s
    scaled = check["per_pod_per_s"] * check_idle_s / idle_poll_s
    progress(f"background: steady rate from the settings 2/IDLE_POLL_S = {analytic:.4f}/pod/s; measured at "
             f"IDLE_POLL_S={check_idle_s:g}: {check['per_pod_per_s']:.4f}/pod/s (analytic {2 / check_idle_s:.4f}), "
             f"scaled to {idle_poll_s:g}s: {scaled:.4f}/pod/s")
    return {
        "what": "requests/s the router sends to idle emulated pods, counted at the emulator over a window that "
        "starts once the router calls every pod ready (start-up polls are before it)",
        "idle_poll_s": idle_poll_s,
        "status_interval_s": _setting("status_interval_s"),
        "queue_interval_s": _setting("queue_interval_s"),
        "window_s": window_s,
        "sizes": rows,
        "analytic_steady_per_pod_per_s": round(analytic, 5),
        "analytic_note": "an idle pod is polled twice per IDLE_POLL_S (GET /api/status and GET /api/queue once "
        "each; at most, since either poll resets the other's contact age); a window shorter than IDLE_POLL_S "
        "after start-up sees none of them",
        "check_at_short_idle_poll": {
            **check,
            "idle_poll_s": check_idle_s,
            "analytic_per_pod_per_s": round(2 / check_idle_s, 5),
            "scaled_to_default_per_pod_per_s": round(scaled, 5),
        },
        "steady_per_pod_per_s": round(max(analytic, scaled), 5),
    }


# ---- 3. throughput -----------------------------------------------------------------------------


def _zipf_models(layout: FleetLayout, n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    weights = [1.0 / (rank + 1) ** decision.ZIPF_S for rank in range(len(layout.groups))]
    return [f"{g}-complete" for g in rng.choices(layout.groups, weights, k=n)]


async def _closed_loop(url: str, models: list[str], concurrency: int, warmup_s: float, window_s: float
                       ) -> dict[str, Any]:
    import aiohttp

    start = time.monotonic()
    t_open, t_close = start + warmup_s, start + warmup_s + window_s
    ok = failed = 0
    statuses: dict[str, int] = {}
    latencies: list[float] = []
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=30)

    async def worker(k: int) -> None:
        nonlocal ok, failed
        i = k
        async with aiohttp.ClientSession(connector=connector, connector_owner=False, timeout=timeout) as session:
            while (now := time.monotonic()) < t_close:
                body = {"model": models[i % len(models)], "prompt": "x", "max_tokens": 1}
                i += concurrency
                try:
                    async with session.post(url + "/v1/completions", json=body) as resp:
                        await resp.read()
                        code = str(resp.status)
                except (aiohttp.ClientError, TimeoutError) as exc:
                    code = type(exc).__name__
                done = time.monotonic()
                if t_open <= done <= t_close:  # answered inside the window (the rate of completions)
                    statuses[code] = statuses.get(code, 0) + 1
                    if code == "200":
                        ok += 1
                        latencies.append(done - now)
                    else:
                        failed += 1

    try:
        await asyncio.gather(*(worker(k) for k in range(concurrency)))
    finally:
        await connector.close()
    latencies.sort()
    return {
        "concurrency": concurrency,
        "window_s": window_s,
        "counted": "answers completed inside the window, after a warm-up; latency of those answers",
        "ok": ok,
        "failed": failed,
        "statuses": statuses,
        "requests_per_s": round(ok / window_s, 1),
        "p50_ms": round(latencies[len(latencies) // 2] * 1000, 2) if latencies else None,
        "p99_ms": round(latencies[min(len(latencies) - 1, math.ceil(0.99 * len(latencies)) - 1)] * 1000, 2)
        if latencies else None,
    }


def throughput(router: Process, layout: FleetLayout, pods: int, concurrency: int, window_s: float) -> dict[str, Any]:
    progress(f"throughput: {pods} pods, concurrency {concurrency}, {window_s:g}s window after 2s warm-up")
    row = asyncio.run(_closed_loop(router.url, _zipf_models(layout, 4096, 3), concurrency, 2.0, window_s))
    row["pods"] = pods
    row["load_average"] = _load()
    row["router_pod_states_before"] = state_counts(router.url)
    row["router_rss_mib"] = _rss_mib(router)
    progress(f"throughput: {pods} pods: {row['requests_per_s']} requests/s ({row['statuses']}), "
             f"p50 {row['p50_ms']} ms, p99 {row['p99_ms']} ms; router RSS {row['router_rss_mib']} MiB")
    return row


def _load() -> list[float]:
    """The machine's load average: on a shared box, the figures depend on it."""
    return [round(x, 2) for x in os.getloadavg()]


def _rss_mib(proc: Process) -> float | None:
    try:
        import psutil

        return round(psutil.Process(proc.pid).memory_info().rss / 2**20, 1)
    except (ImportError, OSError):
        return None


# ---- 4. restart --------------------------------------------------------------------------------


def probe_groups(layout: FleetLayout, count: int) -> dict[str, set[str]]:
    """The ``count`` groups current on the fewest pods (but some), each with its holding pods."""
    holders: dict[str, set[str]] = {}
    for pod in layout.pods:
        for d in pod.devices:
            if d.current_group:
                holders.setdefault(d.current_group, set()).add(pod.name)
    rarest = sorted(holders, key=lambda g: (len(holders[g]), g))[:count]
    return {g: holders[g] for g in rarest}


def _probe(client: httpx.Client, url: str, group: str, layout_devices: dict[str, dict[str, str | None]]
           ) -> tuple[str, bool]:
    """One request for ``group``: (what happened, whether it landed on a device holding it current)."""
    try:
        r = client.post(url + "/v1/completions", json={"model": f"{group}-complete", "prompt": "x", "max_tokens": 1})
    except httpx.HTTPError as exc:
        return type(exc).__name__, False
    if r.status_code != 200:
        return str(r.status_code), False
    pod, device = r.headers.get("x-served-by-pod", ""), r.headers.get("x-served-by-device", "")
    current = layout_devices.get(pod, {}).get(device)
    return "200", current == group and r.headers.get("x-group-switch") == "false"


def restart(router: Process, urls: list[str], layout: FleetLayout, log_dir: Path, env: Mapping[str, str],
            deadline_s: float, ready_timeout_s: float) -> tuple[Process, dict[str, Any]]:
    """Kill ``router`` and start it again on its port; the time until it routes the rarest groups right."""
    port = int(router.url.rsplit(":", 1)[1])
    probes = probe_groups(layout, PROBE_GROUPS)
    devices = {p.name: {d.device: d.current_group for d in p.devices} for p in layout.pods}
    progress(f"restart: killing the router (pid {router.pid}) in front of {len(urls)} pods; probes "
             f"{ {g: len(h) for g, h in probes.items()} } (group: pods holding it current)")
    router.signal(signal.SIGKILL)
    router.wait_or_kill(time.monotonic() + 5)
    t0 = time.monotonic()
    fresh = start_router(urls, log_dir / "router-restarted", env, port=port)
    first: dict[str, float] = {}
    first_answer: float | None = None
    listening: float | None = None  # its first HTTP answer of any status
    routed_right: float | None = None
    rounds = wrong = 0
    seen: dict[str, int] = {}
    with httpx.Client(timeout=5) as client:
        while time.monotonic() - t0 < deadline_s:
            if not fresh.alive():
                raise RuntimeError(f"restarted router exited: {fresh.log_tail()}")
            rounds += 1
            results = [(g, *_probe(client, fresh.url, g, devices)) for g in probes]
            now = time.monotonic() - t0
            for g, what, right in results:
                seen[what] = seen.get(what, 0) + 1
                if what.isdigit() and listening is None:
                    listening = now
                if what == "200" and first_answer is None:
                    first_answer = now
                if right:
                    first.setdefault(g, now)
                elif what == "200":
                    wrong += 1
            if all(right for _, _, right in results):
                routed_right = now
                break
            time.sleep(0.1)  # the next round of probes; the deadline bounds the loop
    progress(f"restart: listening after {listening}s, first 200 after {first_answer}s, every probe group "
             f"routed right {routed_right}s after the "
             f"start ({rounds} rounds, {wrong} answers on a pod without the group, outcomes {seen})")
    ready_at: float | None = None
    ready_wait_s = min(ready_timeout_s, RESTART_READY_WAIT_S)
    try:
        wait_all_ready(fresh, len(urls), timeout_s=max(5.0, ready_wait_s - (time.monotonic() - t0)))
        ready_at = round(time.monotonic() - t0, 2)
    except TimeoutError:
        pass
    states = state_counts(fresh.url)
    progress(f"restart: every pod ready {ready_at}s after the start (None: not within {ready_wait_s:g}s; {states})")
    return fresh, {
        "pods": len(urls),
        "devices": len(urls) * DEVICES_PER_POD,
        "kill": "SIGKILL, then the same command on the same port",
        "probe_groups": {g: len(h) for g, h in probes.items()},
        "check": "each probe group's request answered 200 from a pod and device that hold it current in the "
        "seeded layout (x-served-by-pod, x-served-by-device), with x-group-switch false",
        "listening_after_s": round(listening, 2) if listening is not None else None,
        "first_answer_s": round(first_answer, 2) if first_answer is not None else None,
        "routes_correctly_after_listening_s": round(routed_right - listening, 2)
        if routed_right is not None and listening is not None else None,
        "load_average_at_kill": _load(),
        "first_right_per_group_s": {g: round(t, 2) for g, t in first.items()},
        "routes_correctly_after_s": round(routed_right, 2) if routed_right is not None else None,
        "probe_rounds": rounds,
        "answers_on_wrong_pod": wrong,
        "probe_outcomes": seen,
        "all_pods_ready_after_s": ready_at,
        "all_pods_ready_waited_s": ready_wait_s,
        "pod_states_at_the_end": states,
        "deadline_s": deadline_s,
    }


def idle_window(emu: EmulatorProcess, router: Process, pods: int, window_s: float, ready_after: float | None
                ) -> dict[str, Any]:
    """What ``background.measure`` counts, on a fleet already up: requests at the emulator in a window."""
    states = state_counts(router.url)
    progress(f"background: {pods} idle pods: counting for {window_s:g}s (router pod states {states})")
    emu.reset()
    time.sleep(window_s)  # the measurement window itself, not a synchronisation
    counts = emu.counts()
    elapsed = counts["since_s"]
    row = {
        "pods": pods,
        "devices": pods * DEVICES_PER_POD,
        "window_s": round(elapsed, 3),
        "requests": counts["total"],
        "requests_per_s": round(counts["total"] / elapsed, 2),
        "per_pod_per_s": round(counts["total"] / pods / elapsed, 4),
        "per_pod_per_s_by_route": {k: round(v / pods / elapsed, 4) for k, v in sorted(counts["routes"].items())},
        "busiest_pod_per_s": round(max(counts["per_pod"].values()) / elapsed, 4) if counts["per_pod"] else 0.0,
        "all_ready_after_s": ready_after,
        "router_pod_states_before": states,
        "router_pod_states_after": state_counts(router.url),
        "load_average": _load(),
    }
    progress(f"background: {pods} pods: {row['requests']} requests in {elapsed:.1f}s = {row['per_pod_per_s']}/pod/s")
    return row


def current_layout(urls: list[str], seeded: FleetLayout) -> FleetLayout:
    """The fleet as the emulated pods' status documents say it is now."""
    pods = []
    with httpx.Client(timeout=10) as client:
        for url in urls:
            doc = PodStatus.model_validate(client.get(url + "/api/status").json())
            devices = [EmulatedDevice(d.device, d.current_group, list(d.cached_groups)) for d in doc.devices]
            pods.append(EmulatedPod(doc.pod, doc.node or "", devices))
    return FleetLayout(pods, seeded.groups, seeded.models)


def fleet_step(pods: int, concurrency: int, window_s: float, restart_deadline_s: float, log_dir: Path,
               ready_timeout_s: float, bg_window_s: float) -> dict[str, Any]:
    """At ``pods`` pods: cold start, idle window, throughput, restart; then throughput at 2 pods."""
    env = {"LOG_LEVEL": "WARNING"}
    layout = make_layout(pods, DEVICES_PER_POD, GROUPS)
    out: dict[str, Any] = {}
    progress(f"fleet: starting {pods} emulated pods x {DEVICES_PER_POD} devices (answers at once) and the router")
    with start_emulator(pods, devices=DEVICES_PER_POD, groups=GROUPS, timing=FAST,
                        log_path=log_dir / f"emulator-fleet-{pods}.log") as emu:
        router = start_router(emu.urls, log_dir / "router-cold", env, port=free_port())
        try:
            t0 = time.monotonic()
            cold: float | None = None
            try:
                wait_all_ready(router, pods, timeout_s=ready_timeout_s)
                cold = round(time.monotonic() - t0, 2)
            except TimeoutError:
                pass  # measured anyway: the states say how far it got
            out["cold_start_all_ready_s"] = cold
            out["cold_start_pod_states"] = state_counts(router.url)
            out["router_rss_mib_idle"] = _rss_mib(router)
            progress(f"fleet: router calls all {pods} pods ready after {cold}s (None: not within "
                     f"{ready_timeout_s:g}s; states {out['cold_start_pod_states']}); "
                     f"RSS {out['router_rss_mib_idle']} MiB")
            out["idle"] = idle_window(emu, router, pods, bg_window_s, cold)
            out["large"] = throughput(router, layout, pods, concurrency, window_s)
            now = current_layout(emu.urls, layout)  # the load switched groups: probe what holds them now
            router, out["restart"] = restart(router, emu.urls, now, log_dir, env, restart_deadline_s,
                                             ready_timeout_s)
        finally:
            router.stop()
    small_layout = make_layout(2, DEVICES_PER_POD, GROUPS)
    with start_emulator(2, devices=DEVICES_PER_POD, groups=GROUPS, timing=FAST,
                        log_path=log_dir / "emulator-fleet-2.log") as emu:
        router = start_router(emu.urls, log_dir / "router-small", env)
        try:
            wait_all_ready(router, 2, timeout_s=60)
            out["small"] = throughput(router, small_layout, 2, concurrency, window_s)
        finally:
            router.stop()
    if "large" in out:
        out["large_over_small"] = round(out["large"]["requests_per_s"] / out["small"]["requests_per_s"], 3)
    return out


# ---- the document ------------------------------------------------------------------------------


def _t(target: str, figure: Any, limit: Any, met: bool | None) -> dict[str, Any]:
    return {"target": target, "figure": figure, "limit": limit, "met": met}


def router_targets(doc: dict[str, Any], baseline: float | None) -> list[dict[str, Any]]:
    big = next((r for r in doc["decision"]["sizes"] if r["devices"] == 10_000), None)
    out = [
        _t("decision p50 < 100 us at 10,000 devices (us)", big["p50_us"] if big else None, 100,
           big["p50_us"] < 100 if big else None),
        _t("decision p99 < 1 ms at 10,000 devices (us)", big["p99_us"] if big else None, 1000,
           big["p99_us"] < 1000 if big else None),
    ]
    bg = doc.get("background")
    limit = round(baseline * 0.01, 5) if baseline else None
    figure = bg["steady_per_pod_per_s"] if bg else None
    entry = _t("background traffic per idle pod <= 1% of today's (requests/pod/s, steady state)", figure, limit,
               figure <= limit if figure is not None and limit is not None else None)
    if bg:
        windows = {r["pods"]: r["per_pod_per_s"] for r in bg["sizes"]}
        check = bg["check_at_short_idle_poll"]
        entry["note"] = (
            f"figure: the larger of 2/IDLE_POLL_S ({bg['analytic_steady_per_pod_per_s']}) and the rate measured at "
            f"IDLE_POLL_S={check['idle_poll_s']:g} scaled to {bg['idle_poll_s']:g}s "
            f"({check['scaled_to_default_per_pod_per_s']}); the {bg['window_s']:g}s windows after ready measured "
            f"{windows} per pod (pods: rate), which hold the one load poll per pod that follows start-up and, "
            "where the router does not keep every pod ready, its retries"
        )
    out.append(entry)
    fleet = doc.get("fleet") or {}
    ratio = fleet.get("large_over_small")
    pods = (fleet.get("large") or {}).get("pods")
    entry = _t(f"proxied throughput at {pods or 1000} pods within 10% of 2 pods (ratio)", ratio, 0.9,
               ratio >= 0.9 if ratio is not None else None)
    if fleet.get("large") and fleet.get("small"):
        large, small = fleet["large"], fleet["small"]
        entry["note"] = (
            f"{large['requests_per_s']} vs {small['requests_per_s']} answers/s at concurrency {large['concurrency']}"
            f" over {large['window_s']:g}s; router pod states at the large size: {large['router_pod_states_before']}"
            + ("; no answer completed inside the window" if not large["ok"] else "")
        )
    out.append(entry)
    rs = fleet.get("restart") or {}
    after = rs.get("routes_correctly_after_s")
    entry = _t(f"restart with {rs.get('pods', 1000)} pods routes correctly within 10 s (s)", after, 10,
               after is not None and after <= 10 if rs else None)
    if rs:
        entry["note"] = (
            f"from the new process's start; it listened after {rs['listening_after_s']}s and routed every probe "
            f"group right {rs['routes_correctly_after_listening_s']}s later; every pod ready after "
            f"{rs['all_pods_ready_after_s']}s (None: not within {rs['all_pods_ready_waited_s']:g}s)"
        )
    out.append(entry)
    return out


def plot(doc: dict[str, Any], out: Path) -> None:
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    rows = doc["decision"]["sizes"]
    xs = [r["devices"] for r in rows]
    left.plot(xs, [r["p50_us"] for r in rows], "o-", label="p50")
    left.plot(xs, [r["p99_us"] for r in rows], "s-", label="p99")
    left.axhline(100, color="tab:blue", ls=":", lw=1, label="p50 target 100 us")
    left.axhline(1000, color="tab:orange", ls=":", lw=1, label="p99 target 1 ms")
    left.set(xscale="log", yscale="log", xlabel="devices in the fleet", ylabel="decision time (us)",
             title="Decision time (FleetState + Decider, in-process)")
    left.legend(fontsize=8)
    bg = doc.get("background")
    if bg:
        sizes = bg["sizes"]
        devs = [r["devices"] for r in sizes]
        right.plot(devs, [max(r["per_pod_per_s"], 1e-4) for r in sizes], "o-",
                   label=f"measured, {bg['window_s']:g}s window after ready")
        right.plot(devs, [bg["analytic_steady_per_pod_per_s"]] * len(devs), "--",
                   label=f"steady: 2 / IDLE_POLL_S ({bg['idle_poll_s']:g}s)")
        base = doc.get("baseline_per_pod_per_s")
        if base:
            right.axhline(base, color="tab:red", lw=1, label=f"before (polling): {base:.2f}")
            right.axhline(base * 0.01, color="tab:red", ls=":", lw=1, label="target: 1% of before")
        right.set(xscale="log", yscale="log", xlabel="devices in the fleet (8 per pod)",
                  ylabel="requests per idle pod per second", title="Background traffic (no user requests)")
        right.legend(fontsize=8)
    save_figure(fig, NAME, out)


def run(args: argparse.Namespace, command: str, out: Path = RESULTS) -> dict[str, Any]:
    sizes = [int(x) for x in args.devices.split(",") if x.strip()]
    quick = bool(args.quick)
    doc: dict[str, Any] = {
        "what": "issue 14, router half: decision time and memory over the real router state, background "
        "traffic to idle pods, proxied throughput at 2 vs many pods, restart in front of many pods",
        "decision": {
            "how": "in-process: FleetState with N emulated devices (upsert + observe_status with the emulator's "
            "status documents, random observe_load reports), Decider(state, RouterMetrics(per_pod), 'affinity') "
            "with per_pod as METRICS_POD_LABELS=auto resolves it for that many pods; "
            "decider.decide(...) timed alone for Zipf-chosen groups while state.begin/finish and observe_load "
            "move the load between decisions. The decision log stays at WARNING (logging is not measured).",
            "sizes": [decision.measure(n, decisions=args.decisions, budget_s=args.decision_budget_s)
                      for n in sizes],
        },
    }
    base_doc = read_result(background.NAME, out)
    doc["baseline_per_pod_per_s"] = base_doc.get("baseline_per_pod_per_s") if base_doc else None
    with tempfile.TemporaryDirectory(prefix="gpufleet-scale-") as tmp:
        if not args.skip_processes:
            bg_pods = [10] if quick else [10, 100]
            doc["background"] = background_step(
                bg_pods, args.window_s, 10 if quick else 100, args.check_idle_s, Path(tmp), 60.0)
            doc["fleet"] = fleet_step(50 if quick else args.pods, args.concurrency, args.throughput_s,
                                      args.restart_deadline_s, Path(tmp), args.ready_timeout_s, args.window_s)
            # The large fleet's idle window was counted on the fleet step's router (one cold start, not two).
            doc["background"]["sizes"].append(doc["fleet"]["idle"])
    doc["targets"] = router_targets(doc, doc["baseline_per_pod_per_s"])
    operator = read_result("scale_operator", out)
    if operator is not None:
        doc["operator"] = {k: v for k, v in operator.items() if k != "targets"}
        doc["targets"] += [{**t, "part": "operator"} for t in operator.get("targets") or []]
    for t in doc["targets"]:
        progress(f"target: {t['target']}: {t['figure']} (limit {t['limit']}) met={t['met']}")
    write_result(NAME, doc, quick=quick, command=command, out=out)
    plot(doc, out)
    return doc


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--devices", default="10,100,1000,10000", help="fleet sizes (devices) for decision time")
    p.add_argument("--quick", action="store_true", help="small sizes and short windows (a smoke run)")
    p.add_argument("--decisions", type=int, default=5000, help="decisions timed per size (at most)")
    p.add_argument("--decision-budget-s", type=float, default=10.0, help="time per size for decisions")
    p.add_argument("--window-s", type=float, default=30.0, help="background window after every pod is ready")
    p.add_argument("--check-idle-s", type=float, default=10.0, help="short IDLE_POLL_S the analytic rate is checked at")
    p.add_argument("--pods", type=int, default=1000, help="pods for throughput and restart")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--throughput-s", type=float, default=10.0)
    p.add_argument("--restart-deadline-s", type=float, default=60.0)
    p.add_argument("--ready-timeout-s", type=float, default=240.0, help="wait this long for every pod ready")
    p.add_argument("--skip-processes", action="store_true", help="decision time only (no router processes)")


def main(args: argparse.Namespace, command: str) -> int:
    if args.quick and args.devices == "10,100,1000,10000":
        args.devices = "10,100"
        args.window_s, args.check_idle_s, args.throughput_s = 5.0, 2.0, 3.0
    run(args, command)
    return 0
