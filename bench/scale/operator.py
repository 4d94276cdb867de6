"""The operator at scale: N ModelGroups on a real control plane with kwok GPU nodes.

Starts etcd, kube-apiserver (with an audit log of everything the operator's identity
does), the controller manager, the scheduler and kwok (tests/e2e/cluster); installs the
chart (operator.replicas=0, as the e2e tests do) and runs the real ``gpufleet operator``
here as a process, with the chart's settings and a token of the chart's ServiceAccount.
Then:

1. creates N ModelGroups (one pod, one GPU each) and waits until every one is Ready.
   kwok marks the pods Running; the harness plays each pod server's part in the status
   protocol: it writes the pod's status Lease (owned by the pod) saying the group is
   loaded, and renews it on the pod servers' heartbeat (60 s), as admin;
2. steady state for ``--steady-s``: nothing changes but those heartbeats.

Measured: the operator's API requests per minute by verb and resource, from the API
server's audit log (its own record, by user: the honest count); reconcile time per
ModelGroup (the operator's histogram, steady window and ramp); the operator's peak RSS.
Writes ``bench/results/scale_operator.json``.

    python -m bench.scale operator [--groups 1000] [--steady-s 600] [--ready-timeout-s 1800]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.common import REPO, progress, write_result
from gpufleet.api import labels
from gpufleet.api.pod_status import DeviceStatus, PodStatus

sys.path.insert(0, str(REPO / "tests" / "e2e"))  # the e2e harness is the top-level package `cluster`
from cluster import TestCluster, procs
from cluster.binaries import ensure_binaries
from cluster.kube import Api
from operator_support import LocalComponent

NAME = "scale_operator"
RELEASE = "gfscale"
SYSTEM_NS = f"{RELEASE}-system"
MODELS_NS = "scale-models"
OPERATOR_USER = f"system:serviceaccount:{SYSTEM_NS}:{RELEASE}-gpufleet-operator"
GPUS_PER_NODE = 8
WRITE_VERBS = frozenset({"create", "update", "patch", "delete", "deletecollection"})
MG_PATH = f"/apis/{labels.API_GROUP}/{labels.API_VERSION}/namespaces/{MODELS_NS}/{labels.PLURAL}"
LEASES_PATH = f"/apis/coordination.k8s.io/v1/namespaces/{MODELS_NS}/leases"
POD_SELECTOR = f"{labels.LABEL_COMPONENT}={labels.COMPONENT_POD_SERVER}"

AUDIT_POLICY = {
    "apiVersion": "audit.k8s.io/v1",
    "kind": "Policy",
    "omitStages": ["RequestReceived"],
    "rules": [{"level": "Metadata", "users": [OPERATOR_USER]}, {"level": "None"}],
}


# ---- the API server's record -------------------------------------------------------------------------


def _ts(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def audit_requests(path: Path, since: float, until: float) -> list[dict[str, Any]]:
    """Completed requests of the operator's identity received in [since, until) (Unix time)."""
    out = []
    with path.open() as f:
        for line in f:
            try:
                ev = json.loads(line)
            except ValueError:
                continue  # a line being written
            if ev.get("stage") != "ResponseComplete" or ev.get("user", {}).get("username") != OPERATOR_USER:
                continue
            at = _ts(ev["requestReceivedTimestamp"])
            if since <= at < until:
                ref = ev.get("objectRef") or {}
                resource = ref.get("resource", "?") + (f"/{ref['subresource']}" if ref.get("subresource") else "")
                out.append({"verb": ev.get("verb"), "resource": resource, "at": at, "name": ref.get("name")})
    return out


def summarize_requests(events: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
    per_min = 60.0 / seconds if seconds > 0 else math.nan
    writes = [e for e in events if e["verb"] in WRITE_VERBS]
    by_verb = Counter(e["verb"] for e in events)
    by_write = Counter(f"{e['verb']} {e['resource']}" for e in writes)
    by_read = Counter(f"{e['verb']} {e['resource']}" for e in events if e["verb"] not in WRITE_VERBS)
    return {
        "seconds": round(seconds, 1),
        "requests": len(events),
        "writes": len(writes),
        "writes_per_min": round(len(writes) * per_min, 3),
        "reads_per_min": round((len(events) - len(writes)) * per_min, 3),
        "by_verb": dict(by_verb),
        "writes_by_resource": dict(by_write.most_common()),
        "reads_by_resource": dict(by_read.most_common()),
    }


# ---- the operator's own figures ---------------------------------------------------------------------


def scrape(url: str) -> dict[str, float]:
    """Prometheus text -> {sample with labels: value} (only what we read)."""
    with urllib.request.urlopen(url, timeout=10) as resp:
        text = resp.read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("gpufleet_operator_") and " " in line:
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def reconcile_figures(before: dict[str, float], after: dict[str, float], kind: str) -> dict[str, Any]:
    """Count, mean and bucket-bound percentiles of reconciles between two scrapes."""
    prefix = "gpufleet_operator_reconcile_seconds"
    count = after.get(f'{prefix}_count{{kind="{kind}"}}', 0) - before.get(f'{prefix}_count{{kind="{kind}"}}', 0)
    total = after.get(f'{prefix}_sum{{kind="{kind}"}}', 0) - before.get(f'{prefix}_sum{{kind="{kind}"}}', 0)
    buckets = []
    for key, value in after.items():
        if key.startswith(f"{prefix}_bucket{{") and f'kind="{kind}"' in key:
            le = key.split('le="', 1)[1].split('"', 1)[0]
            buckets.append((math.inf if le == "+Inf" else float(le), value - before.get(key, 0)))
    buckets.sort()

    def quantile(q: float) -> float | None:
        for le, n in buckets:
            if count and n >= q * count:
                return le
        return None

    return {
        "reconciles": int(count),
        "mean_ms": round(1000 * total / count, 3) if count else None,
        "p50_ms_at_most": _ms(quantile(0.5)),
        "p99_ms_at_most": _ms(quantile(0.99)),
    }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None or math.isinf(seconds) else round(seconds * 1000, 3)


@dataclass
class RssSampler:
    pid: int
    peak_bytes: int = 0
    samples: list[tuple[float, int]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def _loop(self) -> None:
        import psutil

        proc = psutil.Process(self.pid)
        while not self._stop.wait(2.0):
            try:
                rss = proc.memory_info().rss
            except psutil.Error:
                return
            self.peak_bytes = max(self.peak_bytes, rss)
            self.samples.append((time.time(), rss))

    def hwm_bytes(self) -> int | None:
        """The kernel's own peak (VmHWM): covers spikes between samples."""
        try:
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None

    @contextmanager
    def running(self) -> Iterator[RssSampler]:
        thread = threading.Thread(target=self._loop, name="rss", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            thread.join(5)


# ---- the pod servers' part: status Leases ---------------------------------------------------------


class LeasePublisher:
    """Writes each running pod-server pod's status Lease (as its pod server would) and renews
    them on the heartbeat, spread over it; as admin, so none of it counts as the operator's."""

    def __init__(self, api: Api, heartbeat_s: float) -> None:
        self.api = api
        self.heartbeat_s = heartbeat_s
        self.published: dict[str, tuple[str, dict[str, Any], float]] = {}  # pod -> (uid, pod, last write)
        self.errors: list[str] = []
        self.writes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="leases", daemon=True)
        self.scan_pods = True  # LIST pods for new ones; off in steady state (nothing new)

    def __enter__(self) -> LeasePublisher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _lease(self, pod: dict[str, Any]) -> dict[str, Any]:
        meta, spec, status = pod["metadata"], pod["spec"], pod["status"]
        group = meta["labels"][labels.LABEL_MODEL_GROUP]
        doc = PodStatus(
            pod=meta["name"], namespace=meta["namespace"], node=spec.get("nodeName"),
            url=f"http://{status['podIP']}:8000", ready=True,
            devices=[DeviceStatus(device="cuda:0", current_group=group)], groups=[group],
            models={f"{group}-m": group}, timestamp=time.time(),
        )
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        return {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {
                "name": meta["name"],
                "namespace": meta["namespace"],
                "labels": {labels.LABEL_COMPONENT: labels.COMPONENT_POD_SERVER},
                "annotations": {labels.STATUS_ANNOTATION: doc.model_dump_json()},
                "ownerReferences": [{"apiVersion": "v1", "kind": "Pod", "name": meta["name"], "uid": meta["uid"]}],
            },
            "spec": {"holderIdentity": meta["name"], "leaseDurationSeconds": int(self.heartbeat_s * 3),
                     "renewTime": now},
        }

    def _write(self, pod: dict[str, Any]) -> None:
        lease = self._lease(pod)
        name = pod["metadata"]["name"]
        query = urllib.parse.urlencode({"fieldManager": "gpufleet-pod-server", "force": "true"})
        self.api.request("PATCH", f"{LEASES_PATH}/{name}?{query}", lease, content_type="application/apply-patch+yaml")
        self.published[name] = (pod["metadata"]["uid"], pod, time.monotonic())
        self.writes += 1

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                if self.scan_pods:
                    query = urllib.parse.urlencode({"labelSelector": POD_SELECTOR})
                    pods = self.api.request("GET", f"/api/v1/namespaces/{MODELS_NS}/pods?{query}", timeout=60)["items"]
                    for pod in pods:
                        name, uid = pod["metadata"]["name"], pod["metadata"]["uid"]
                        running = pod["status"].get("phase") == "Running" and pod["status"].get("podIP")
                        if running and self.published.get(name, ("",))[0] != uid:
                            self._write(pod)
                now = time.monotonic()
                for _, (_, pod, last) in list(self.published.items()):
                    if now - last >= self.heartbeat_s:
                        self._write(pod)  # the heartbeat: same state, new timestamp
            except Exception as exc:  # report, keep going
                self.errors.append(f"{type(exc).__name__}: {exc}"[:300])
            self._stop.wait(2.0)


# ---- the run ----------------------------------------------------------------------------------------


def model_group(i: int) -> dict[str, Any]:
    name = f"mg-{i:04d}"
    return {
        "apiVersion": f"{labels.API_GROUP}/{labels.API_VERSION}",
        "kind": labels.KIND,
        "metadata": {"name": name, "namespace": MODELS_NS},
        "spec": {"models": [{"id": f"{name}-m", "source": "/opt/gpufleet/demo-models/tiny-chat"}], "replicas": 1},
    }


def ready_count(api: Api) -> tuple[int, int]:
    items = api.request("GET", MG_PATH, timeout=60)["items"]
    ready = 0
    for mg in items:
        status = mg.get("status") or {}
        conds = {c["type"]: c["status"] for c in status.get("conditions") or []}
        if conds.get("Ready") == "True" and status.get("observedGeneration") == mg["metadata"].get("generation"):
            ready += 1
    return ready, len(items)


def helm_install(cluster: TestCluster, bin_dir: Path) -> dict[str, Any]:
    import subprocess

    args = [str(bin_dir / "helm"), "--kubeconfig", cluster.kubeconfig, "install", RELEASE,
            str(REPO / "deploy" / "helm" / "gpufleet"), "-n", SYSTEM_NS, "--wait", "--timeout", "180s",
            "--set", "operator.replicas=0", "--set", "router.replicas=0"]
    result = subprocess.run(args, capture_output=True, text=True, timeout=240)
    if result.returncode != 0:
        raise RuntimeError(f"helm install failed:\n{result.stdout}\n{result.stderr}")
    deployment: dict[str, Any] = cluster.api.get(f"/apis/apps/v1/namespaces/{SYSTEM_NS}/deployments/"
                                                 f"{RELEASE}-gpufleet-operator")
    return deployment


def run(groups: int, steady_s: float, ready_timeout_s: float, resync_s: float, heartbeat_s: float,
        command: str, keep: bool = False) -> dict[str, Any]:
    t_start = time.monotonic()
    bin_dir = Path(os.environ["GPUFLEET_K8S_BIN"]) if os.environ.get("GPUFLEET_K8S_BIN") else ensure_binaries()
    workdir = Path(tempfile.mkdtemp(prefix="gpufleet-scale-operator-"))
    policy, audit_log = workdir / "audit-policy.json", workdir / "audit.log"
    policy.write_text(json.dumps(AUDIT_POLICY))
    cluster = TestCluster(workdir / "cluster", bin_dir=bin_dir, timeout=180, log=progress,
                          apiserver_args=[f"--audit-policy-file={policy}", f"--audit-log-path={audit_log}",
                                          "--audit-log-format=json", "--audit-log-maxsize=0"])
    nodes = math.ceil(groups / GPUS_PER_NODE)
    with cluster:
        api = cluster.api
        progress(f"operator bench: {nodes} kwok nodes x {GPUS_PER_NODE} GPUs for {groups} ModelGroups")
        for i in range(nodes):
            cluster.add_gpu_node(f"gpu-{i:04d}", gpus=GPUS_PER_NODE, wait=False)
        for ns in (SYSTEM_NS, MODELS_NS):
            api.create("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
        deployment = helm_install(cluster, bin_dir)
        # The CRD's storage starts after the install: until then the operator's first LIST
        # gets 429 "storage is (re)initializing" (kopf retries it, and logs it as an error).
        procs.wait_until(lambda: api.get(MG_PATH) is not None, 120, "ModelGroup storage ready")
        health, metrics_port = procs.free_port(), procs.free_port()
        metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        operator = LocalComponent(api, deployment, workdir / "operator", {
            "GPUFLEET_OPERATOR_RESYNC_SECONDS": str(resync_s),
            "GPUFLEET_OPERATOR_HEALTH_HOST": "127.0.0.1",
            "GPUFLEET_OPERATOR_HEALTH_PORT": str(health),
            "GPUFLEET_OPERATOR_METRICS_PORT": str(metrics_port),
        })
        with operator, LeasePublisher(api, heartbeat_s) as leases:
            assert operator.proc is not None
            proc = operator.proc
            procs.wait_until(lambda: scrape(metrics_url) is not None, 120, "operator /metrics", [proc])
            with RssSampler(proc.popen.pid).running() as rss:
                t_create = time.time()
                with ThreadPoolExecutor(8) as pool:
                    list(pool.map(lambda i: api.create(MG_PATH, model_group(i)), range(groups)))
                progress(f"operator bench: created {groups} ModelGroups in {time.time() - t_create:.1f}s")
                deadline = time.monotonic() + ready_timeout_s
                ready, last_report = 0, 0.0
                while True:
                    if not proc.alive():
                        raise RuntimeError(f"operator exited: {proc.log_tail()}")
                    ready, _ = ready_count(api)
                    if ready >= groups or time.monotonic() > deadline:
                        break
                    if time.monotonic() - last_report >= 10:
                        last_report = time.monotonic()
                        progress(f"operator bench: Ready {ready}/{groups} after {time.time() - t_create:.0f}s; "
                                 f"status Leases {len(leases.published)}; RSS {rss.peak_bytes / 2**20:.0f} MiB")
                    time.sleep(3.0)
                time_to_ready = time.time() - t_create
                progress(f"operator bench: Ready {ready}/{groups} in {time_to_ready:.1f}s")
                ramp_scrape = scrape(metrics_url)
                ramp_requests = summarize_requests(audit_requests(audit_log, t_create, time.time()),
                                                   time.time() - t_create)
                leases.scan_pods = False  # nothing new from here on: only the heartbeats
                # Let what the ramp set off settle (the last status writes, one resync round).
                settle = min(resync_s, 60.0)
                progress(f"operator bench: settling {settle:g}s, then {steady_s:g}s of steady state")
                time.sleep(settle)
                before, t0 = scrape(metrics_url), time.time()
                while time.time() < t0 + steady_s:
                    time.sleep(min(30.0, t0 + steady_s - time.time()))
                    seen = audit_requests(audit_log, t0, time.time())
                    writes = sum(1 for e in seen if e["verb"] in WRITE_VERBS)
                    progress(f"operator bench: steady {time.time() - t0:.0f}/{steady_s:g}s: operator writes {writes}, "
                             f"requests {len(seen)}; RSS peak {rss.peak_bytes / 2**20:.0f} MiB")
                t1 = time.time()
                after = scrape(metrics_url)
                steady = summarize_requests(audit_requests(audit_log, t0, t1), t1 - t0)
                ready_after, _ = ready_count(api)
                peak = max(rss.peak_bytes, rss.hwm_bytes() or 0)
            log_tail = operator.log().splitlines()
        errors = [line for line in log_tail if '"level": "error"' in line or "Traceback" in line]
        warnings = Counter(json.loads(line).get("message", "?") for line in log_tail
                           if line.startswith("{") and '"level": "warning"' in line)
    steady_full = reconcile_figures(before, after, "full")
    steady_status = reconcile_figures(before, after, "status")
    ramp_full = reconcile_figures({}, ramp_scrape, "full")
    writes_per_min = steady["writes_per_min"]
    # Each group is reconciled once per resync period: how many full rounds the window saw.
    window_rounds = steady["seconds"] / resync_s
    rounds = round(steady_full["reconciles"] / groups / window_rounds, 2) if window_rounds else None
    mg_writes = sum(n for k, n in steady["writes_by_resource"].items() if "kopfpeerings" not in k)
    mg_writes_per_min = round(mg_writes * 60 / steady["seconds"], 3) if steady["seconds"] else math.nan
    targets = [
        {"target": f"all {groups} ModelGroups Ready", "figure": ready, "limit": groups, "met": ready >= groups},
        {"target": "steady writes/min for ModelGroups and their children (apiserver audit log, operator's user)",
         "figure": mg_writes_per_min, "limit": 1.0, "met": mg_writes_per_min <= 1.0},
        # kopf's peering keepalive (the chart runs replicas with peering) patches one object
        # about every 40 s whatever N is: counted here, not hidden.
        {"target": "steady writes/min in all, kopf's peering keepalive included (the same at any N)",
         "figure": writes_per_min, "limit": 2.0, "met": writes_per_min <= 2.0},
        {"target": "still Ready after the steady window", "figure": ready_after, "limit": groups,
         "met": ready_after >= groups},
        {"target": "operator peak RSS within the chart's memory limit (MiB)", "figure": round(peak / 2**20, 1),
         "limit": 512, "met": peak / 2**20 <= 512},
        {"target": "steady reconcile mean (ms), reported", "figure": steady_full["mean_ms"], "limit": None,
         "met": None},
        {"target": "operator errors logged", "figure": len(errors), "limit": 0, "met": not errors},
    ]
    doc = {
        "what": "N ModelGroups (1 pod, 1 GPU each) on a real kube-apiserver with kwok GPU nodes; the real operator",
        "groups": groups,
        "nodes": nodes,
        "resync_seconds": resync_s,
        "lease_heartbeat_s": heartbeat_s,
        "steady_s_requested": steady_s,
        "time_to_ready_s": round(time_to_ready, 1),
        "ready": ready,
        "ready_after_steady": ready_after,
        "ramp": {"requests": ramp_requests, "reconcile_full": ramp_full},
        "steady": {**steady, "reconcile_full": steady_full, "reconcile_status": steady_status,
                   "resync_rounds_covered": rounds},
        "operator_peak_rss_mib": round(peak / 2**20, 1),
        "operator_rss_mib_samples": [round(r / 2**20, 1) for _, r in rss.samples[:: max(1, len(rss.samples) // 40)]],
        "harness_lease_writes": leases.writes,
        "harness_errors": leases.errors[-5:],
        "operator_warnings": dict(warnings.most_common(10)),
        "operator_errors": errors[:5],
        "wall_s": round(time.monotonic() - t_start, 1),
        "targets": targets,
    }
    write_result(NAME, doc, quick=steady_s < 600 or groups < 1000, command=command)
    for t in targets:
        progress(f"  {'MET ' if t['met'] else ('--- ' if t['met'] is None else 'MISS')} {t['target']}: "
                 f"{t['figure']} (limit {t['limit']})")
    if not keep:
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)
    else:
        progress(f"operator bench: kept {workdir}")
    return doc


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--groups", type=int, default=1000, help="ModelGroups to create (one pod, one GPU each)")
    p.add_argument("--steady-s", type=float, default=600.0, help="length of the steady-state window")
    p.add_argument("--ready-timeout-s", type=float, default=1800.0, help="give up waiting for Ready after this")
    p.add_argument("--resync-s", type=float, default=30.0, help="the operator's resync period (chart default 30)")
    p.add_argument("--heartbeat-s", type=float, default=60.0, help="status Lease heartbeat (pod server default 60)")
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs, audit log)")


def main(args: argparse.Namespace, command: str) -> int:
    doc = run(args.groups, args.steady_s, args.ready_timeout_s, args.resync_s, args.heartbeat_s, command, args.keep)
    return 0 if all(t["met"] is not False for t in doc["targets"]) else 1
