"""What the operator e2e tests add to the cluster harness (tests/e2e/cluster).

kwok runs no containers: it marks pods Running with an IP from a loopback range. So:
- PodServerFarm starts a real ``gpufleet serve`` process for each pod-server pod that kwok
  runs, as its container would run: the container's args, its env resolved like the
  kubelet does (downward API fields, $(VAR) references), its ConfigMap volumes projected
  into folders as the kubelet projects them (a ``..data`` symlink swapped atomically, and
  rewritten when the ConfigMap changes, which a GpuPool's pods rely on), bound to the pod's
  own (loopback) IP, and talking to the API server with a token of the pod's
  ServiceAccount (bound to the pod). Paths inside the "image" map to folders here (the
  demo models). Each pod's "GPUs" become CPU devices (cpu:0..N-1).
- LocalComponent runs the operator or the router the same way, from the env of the chart's
  Deployment (installed with replicas 0), with a token of the chart's ServiceAccount: what
  they can do in the test is exactly what the chart grants them.
On a cluster whose pods get non-loopback IPs (a kind cluster, a real one), a kubelet runs
the containers, and the farm leaves those pods alone.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cluster import procs
from cluster.kube import Api, ApiError

from gpufleet.api import labels

POD_SERVER_SELECTOR = f"{labels.LABEL_COMPONENT}={labels.COMPONENT_POD_SERVER}"


def write_kubeconfig(path: Path, api: Api, token: str) -> Path:
    """A kubeconfig for the same API server with another identity (a ServiceAccount token)."""
    import base64

    cluster: dict[str, Any] = {"server": api.url}
    if api.insecure:
        cluster["insecure-skip-tls-verify"] = True
    elif api.ca_file:
        cluster["certificate-authority-data"] = base64.b64encode(Path(api.ca_file).read_bytes()).decode()
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "e2e", "cluster": cluster}],
        "users": [{"name": "sa", "user": {"token": token}}],
        "contexts": [{"name": "e2e", "context": {"cluster": "e2e", "user": "sa"}}],
        "current-context": "e2e",
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config, indent=2))
    path.chmod(0o600)
    return path


def service_account_token(api: Api, namespace: str, name: str, pod: dict[str, Any] | None = None,
                          seconds: int = 3600) -> str:
    """TokenRequest, as the kubelet does for a pod's projected token (bound to the pod if given)."""
    spec: dict[str, Any] = {"expirationSeconds": seconds}
    if pod is not None:
        spec["boundObjectRef"] = {"kind": "Pod", "apiVersion": "v1", "name": pod["metadata"]["name"],
                                  "uid": pod["metadata"]["uid"]}
    body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec}
    out = api.create(f"/api/v1/namespaces/{namespace}/serviceaccounts/{name}/token", body)
    return str(out["status"]["token"])


_VAR = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def resolve_env(pod: dict[str, Any], container: dict[str, Any]) -> dict[str, str]:
    """The container's environment as the kubelet builds it (the parts our pods use)."""
    fields = {
        "metadata.name": pod["metadata"]["name"],
        "metadata.namespace": pod["metadata"]["namespace"],
        "metadata.uid": pod["metadata"]["uid"],
        "spec.nodeName": pod["spec"].get("nodeName", ""),
        "spec.serviceAccountName": pod["spec"].get("serviceAccountName", ""),
        "status.podIP": pod["status"].get("podIP", ""),
    }
    env: dict[str, str] = {}
    for entry in container.get("env") or []:
        if "value" in entry:
            env[entry["name"]] = _VAR.sub(lambda m: env.get(m.group(1), m.group(0)), entry["value"])
        elif "fieldRef" in (entry.get("valueFrom") or {}):
            env[entry["name"]] = fields[entry["valueFrom"]["fieldRef"]["fieldPath"]]
        # secretKeyRef/configMapKeyRef: not used by our pods
    return env


@dataclass
class _Projection:
    """A ConfigMap volume of a running pod, as the kubelet keeps it: ``key -> ..data/key``, with
    ``..data`` a symlink to a timestamped folder that is swapped in one rename."""

    configmap: str
    folder: Path
    resource_version: str | None = None

    def write(self, data: dict[str, str]) -> None:
        stamp = f"..{time.time_ns()}"
        (self.folder / stamp).mkdir(parents=True)
        for key, text in data.items():
            (self.folder / stamp / key).write_text(text)
        tmp = self.folder / "..data_tmp"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(stamp)
        old = (self.folder / "..data").resolve() if (self.folder / "..data").is_symlink() else None
        tmp.rename(self.folder / "..data")  # atomic: a reader sees the old files or the new ones
        for key in data:
            link = self.folder / key
            if not link.is_symlink():
                link.symlink_to(Path("..data") / key)
        if old is not None and old.name != stamp:
            shutil.rmtree(old, ignore_errors=True)


@dataclass
class _Running:
    uid: str
    ip: str
    proc: procs.Process
    projections: list[_Projection]


class PodServerFarm:
    """Starts and stops pod-server processes following the pods kwok runs; see the module doc."""

    def __init__(self, api: Api, namespace: str, workdir: Path, path_map: dict[str, Path],
                 extra_env: dict[str, str] | None = None, interval: float = 0.5) -> None:
        self.api = api
        self.namespace = namespace
        self.workdir = workdir
        self.path_map = dict(sorted(path_map.items(), key=lambda kv: -len(kv[0])))  # longest prefix first
        self.extra_env = extra_env or {}
        self.interval = interval
        self.running: dict[str, _Running] = {}  # pod name -> process
        self.started: list[str] = []  # "name/uid" of every process started, in order
        self._seen: set[str] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.errors: list[str] = []

    # ---- lifecycle ----------------------------------------------------------------------

    def __enter__(self) -> PodServerFarm:
        self._thread = threading.Thread(target=self._loop, name="pod-server-farm", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=10)
        for name in list(self.running):
            self._kill(name)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.sync()
            except Exception as exc:  # report, keep following the cluster
                self.errors.append(f"{type(exc).__name__}: {exc}")
            self._stop.wait(self.interval)

    # ---- following the pods ----------------------------------------------------------------

    def sync(self) -> None:
        query = urllib.parse.urlencode({"labelSelector": POD_SERVER_SELECTOR})
        pods = self.api.get(f"/api/v1/namespaces/{self.namespace}/pods?{query}")["items"]
        wanted: dict[str, dict[str, Any]] = {}
        for pod in pods:
            ip = pod.get("status", {}).get("podIP")
            if pod["metadata"].get("deletionTimestamp") or pod["status"].get("phase") != "Running" or not ip:
                continue
            if not ipaddress.ip_address(ip).is_loopback:
                continue  # a kubelet runs this one
            wanted[pod["metadata"]["name"]] = pod
        for name, run in list(self.running.items()):
            pod = wanted.get(name)
            if pod is None or pod["metadata"]["uid"] != run.uid or pod["status"]["podIP"] != run.ip:
                self._kill(name)
            elif not run.proc.alive():
                self.errors.append(f"pod server {name} exited: {run.proc.log_tail(15)}")
                del self.running[name]  # started again below, like a container restart
            else:
                self._refresh(pod, run)
        seen, self._seen = self._seen, {p["metadata"]["uid"] for p in wanted.values()}
        for name, pod in wanted.items():
            # Start once a pod has been running for two rounds: pods that a test creates and
            # the operator removes at once (a hand-edited replica count) get no process.
            if name not in self.running and pod["metadata"]["uid"] in seen:
                try:
                    self._start(pod)
                except ApiError as exc:
                    if exc.status != 404:  # 404: the pod went away meanwhile
                        raise

    def _kill(self, name: str) -> None:
        run = self.running.pop(name, None)
        if run is not None:
            procs.stop(run.proc, grace=5)

    def _project(self, namespace: str, projection: _Projection) -> bool:
        """Write the ConfigMap's current data into the folder when it changed (the kubelet's
        sync); False while the ConfigMap does not exist."""
        cm = try_get(self.api, f"/api/v1/namespaces/{namespace}/configmaps/{projection.configmap}")
        if cm is None:
            return False
        if cm["metadata"].get("resourceVersion") != projection.resource_version:
            projection.write({key: self._map_text(text) for key, text in (cm.get("data") or {}).items()})
            projection.resource_version = cm["metadata"].get("resourceVersion")
        return True

    def _refresh(self, pod: dict[str, Any], run: _Running) -> None:
        for projection in run.projections:
            self._project(pod["metadata"]["namespace"], projection)

    def host_path(self, path: str, mounts: dict[str, Path]) -> str:
        for prefix, host in [*sorted(mounts.items(), key=lambda kv: -len(kv[0])), *self.path_map.items()]:
            if path == prefix or path.startswith(prefix.rstrip("/") + "/"):
                return str(host) + path[len(prefix.rstrip("/")):]
        return path

    def _start(self, pod: dict[str, Any]) -> None:
        meta, spec = pod["metadata"], pod["spec"]
        name, ip = meta["name"], pod["status"]["podIP"]
        container = spec["containers"][0]
        root = self.workdir / f"{name}-{meta['uid'][:8]}"
        volumes = {v["name"]: v for v in spec.get("volumes") or []}
        mounts: dict[str, Path] = {}
        projections: list[_Projection] = []
        for mount in container.get("volumeMounts") or []:
            host = root / "mounts" / mount["name"]
            host.mkdir(parents=True, exist_ok=True)
            mounts[mount["mountPath"]] = host
            cm_ref = volumes.get(mount["name"], {}).get("configMap")
            if cm_ref:
                projection = _Projection(cm_ref["name"], host)
                if not self._project(meta["namespace"], projection):
                    return  # the kubelet, too, starts the container once its ConfigMap exists
                projections.append(projection)
        env = {k: self.host_path(v, mounts) for k, v in resolve_env(pod, container).items()}
        gpus = int((container.get("resources") or {}).get("limits", {}).get(labels.GPU_RESOURCE, "1"))
        token = service_account_token(self.api, meta["namespace"], spec["serviceAccountName"], pod)
        env.update({
            "HOST": ip,  # the container would bind 0.0.0.0 in its own network namespace
            "DEVICES": ",".join(f"cpu:{i}" for i in range(gpus)),  # each "GPU" simulated by a CPU device
            "TORCH_THREADS": "1",
            "KUBECONFIG": str(write_kubeconfig(root / "kubeconfig", self.api, token)),
            **self.extra_env,
        })
        base = {k: v for k, v in os.environ.items() if k in ("PATH", "LANG", "LC_ALL", "PYTHONPATH", "VIRTUAL_ENV")}
        command = [*(container.get("command") or [])[1:], *(container.get("args") or [])]  # after "gpufleet"
        argv = [sys.executable, "-m", "gpufleet.cli", *command]
        log_dir = self.workdir / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        proc = procs.start(f"pod-{name}", argv, log_dir, {**base, **env})
        self.running[name] = _Running(meta["uid"], ip, proc, projections)
        self.started.append(f"{name}/{meta['uid']}")

    def _map_text(self, text: str) -> str:
        for prefix, host in self.path_map.items():
            text = text.replace(prefix.rstrip("/") + "/", str(host).rstrip("/") + "/")
        return text


class LocalComponent:
    """Runs `gpufleet <args>` here with the env of a chart Deployment's container and the
    identity of its ServiceAccount."""

    def __init__(self, api: Api, deployment: dict[str, Any], workdir: Path, overrides: dict[str, str]) -> None:
        self.api = api
        self.deployment = deployment
        self.workdir = workdir
        self.overrides = overrides
        self.proc: procs.Process | None = None

    @property
    def name(self) -> str:
        return str(self.deployment["metadata"]["name"])

    def __enter__(self) -> LocalComponent:
        template = self.deployment["spec"]["template"]
        container = template["spec"]["containers"][0]
        namespace = self.deployment["metadata"]["namespace"]
        sa = template["spec"]["serviceAccountName"]
        token = service_account_token(self.api, namespace, sa)
        fake_pod = {"metadata": {"name": self.name, "namespace": namespace, "uid": ""}, "spec": template["spec"],
                    "status": {"podIP": "127.0.0.1"}}
        env = resolve_env(fake_pod, container)
        env["KUBECONFIG"] = str(write_kubeconfig(self.workdir / f"{self.name}.kubeconfig", self.api, token))
        env.update(self.overrides)
        base = {k: v for k, v in os.environ.items() if k in ("PATH", "LANG", "LC_ALL", "PYTHONPATH", "VIRTUAL_ENV")}
        self.workdir.mkdir(parents=True, exist_ok=True)
        argv = [sys.executable, "-m", "gpufleet.cli", *container.get("args", [])]
        self.proc = procs.start(self.name, argv, self.workdir, {**base, **env})
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            procs.stop(self.proc, grace=10)

    def log(self) -> str:
        return self.proc.log_path.read_text(errors="replace") if self.proc else ""


def wait_until(check: Any, timeout: float, what: str, watch: list[procs.Process] | None = None,
               interval: float = 0.5) -> None:
    procs.wait_until(check, timeout, what, watch or [], interval)


def try_get(api: Api, path: str) -> dict[str, Any] | None:
    try:
        obj: dict[str, Any] = api.get(path)
    except ApiError as exc:
        if exc.status == 404:
            return None
        raise
    return obj


def which(binary: str, bin_dir: Path | None) -> str:
    if bin_dir and (bin_dir / binary).exists():
        return str(bin_dir / binary)
    found = shutil.which(binary)
    if not found:
        raise FileNotFoundError(f"{binary} not found (GPUFLEET_K8S_BIN or PATH)")
    return found


def elapsed(t0: float) -> str:
    return f"{time.monotonic() - t0:.1f}s"


@dataclass
class LocalControl:
    """The chart installed as users install it (operator and router replicas 0: kwok runs no
    containers), with ``gpufleet operator`` and ``gpufleet router`` running here as processes
    with the env and ServiceAccount tokens of the chart's Deployments."""

    operator: LocalComponent
    router: LocalComponent
    operator_deployment: dict[str, Any]
    router_url: str
    health_url: str
    metrics_url: str


def install_chart(kubectl: str, helm: str, kubeconfig: str, api: Api, release: str, system_ns: str,
                  namespaces: list[str], *, existing: bool = False, extra_sets: list[str] | None = None) -> None:
    """helm install the chart (release in ``system_ns``, routing ``namespaces``); CRDs kept from
    an earlier release are brought up to date first (the chart keeps them on uninstall)."""
    chart = Path(__file__).resolve().parents[2] / "deploy" / "helm" / "gpufleet"
    listed = ",".join(namespaces)
    sets = ["operator.replicas=0", "router.replicas=0", f"router.namespaces={{{listed}}}", *(extra_sets or [])]
    if existing:  # never manage other people's ModelGroups
        sets.append(f"operator.watchNamespaces={{{listed}}}")
    if try_get(api, "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/modelgroups.gpufleet.io"):
        sets.append("crds.install=false")
        for crd in sorted((chart.parents[2] / "crds").glob("*.yaml")):
            _tool(kubectl, kubeconfig, "apply", "--server-side", "--force-conflicts", "-f", str(crd))
    if try_get(api, "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/kopfpeerings.kopf.dev"):
        sets.append("operator.peering.installCRDs=false")  # kept from an earlier release
    args = ["install", release, str(chart), "-n", system_ns, "--wait", "--timeout", "120s"]
    for s in sets:
        args += ["--set", s]
    _tool(helm, kubeconfig, *args, timeout=180)


def _tool(binary: str, kubeconfig: str, *args: str, timeout: float = 120) -> None:
    import subprocess

    result = subprocess.run([binary, "--kubeconfig", kubeconfig, *args], capture_output=True, text=True,
                            timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"{binary} {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")


def local_control(api: Api, release: str, system_ns: str, workdir: Path,
                  operator_env: dict[str, str] | None = None, router_env: dict[str, str] | None = None) -> LocalControl:
    """The operator and the router of an installed release, ready to start (``with``)."""
    deployment = f"/apis/apps/v1/namespaces/{system_ns}/deployments/{release}-gpufleet"
    operator_deployment, router_deployment = api.get(f"{deployment}-operator"), api.get(f"{deployment}-router")
    health_port, router_port, metrics_port = procs.free_port(), procs.free_port(), procs.free_port()
    operator = LocalComponent(api, operator_deployment, workdir / "operator", {
        "GPUFLEET_OPERATOR_RESYNC_SECONDS": "3",
        "GPUFLEET_OPERATOR_HEALTH_HOST": "127.0.0.1",
        "GPUFLEET_OPERATOR_HEALTH_PORT": str(health_port),
        "GPUFLEET_OPERATOR_METRICS_PORT": str(metrics_port),
        # The chart points the operator at the routers' headless Service; here the router is local.
        "GPUFLEET_OPERATOR_DEMAND_URLS": f"http://127.0.0.1:{router_port}",
        "GPUFLEET_OPERATOR_AUTOSCALE_SECONDS": "1",
        **(operator_env or {}),
    })
    router = LocalComponent(api, router_deployment, workdir / "router", {
        "HOST": "127.0.0.1", "PORT": str(router_port),
        # Pod servers here start, stop and come back within seconds, and the router ejects those that
        # fail its polls while starting: poll idle pods every second (the default is 90 s) so the
        # waits measure routing, not the idle-poll period.
        "IDLE_POLL_S": "1",
        **(router_env or {}),
    })
    return LocalControl(operator, router, operator_deployment, f"http://127.0.0.1:{router_port}",
                        f"http://127.0.0.1:{health_port}/healthz", f"http://127.0.0.1:{metrics_port}/metrics")
