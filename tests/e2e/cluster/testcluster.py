"""TestCluster: a real Kubernetes control plane with kwok-simulated GPU nodes, on loopback only.

    with TestCluster(tmp_path) as c:
        c.add_gpu_node("gpu-0", gpus=8)
        subprocess.run(["kubectl", "--kubeconfig", c.kubeconfig, "get", "nodes"])

Started by hand (as controller-runtime's envtest does) rather than via kwokctl: every
flag, port and log file is ours, and nothing listens beyond 127.0.0.1.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import ipaddress
import os
import secrets
import ssl
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from . import procs
from .binaries import ensure_binaries
from .kube import Api, ApiError, api_from_kubeconfig, condition, write_kubeconfig
from .pki import make_pki

STAGES_FILE = Path(__file__).with_name("kwok-stages.yaml")
SERVICE_CIDR = "10.96.0.0/16"  # virtual ClusterIPs: allocated, never routed (no kube-proxy)
# Pods get IPs from their node's spec.podCIDR (kwok's rule). Nodes take consecutive /24s
# from this loopback block, so a test can bind a real server to a pod's IP on this host.
POD_CIDR_BLOCK = ipaddress.ip_network("127.1.0.0/16")
DEFAULT_POD_CIDR = "127.0.10.0/24"  # kwok's fallback for nodes without spec.podCIDR


def existing_kubeconfig() -> Path | None:
    """The kubeconfig of an already running cluster to use instead of starting one, if any:
    $GPUFLEET_E2E_KUBECONFIG, or $KUBECONFIG when GPUFLEET_E2E_EXISTING=1."""
    path = os.environ.get("GPUFLEET_E2E_KUBECONFIG")
    if not path and os.environ.get("GPUFLEET_E2E_EXISTING") == "1":
        path = os.environ.get("KUBECONFIG", "").split(os.pathsep)[0] or str(Path.home() / ".kube" / "config")
    return Path(path).expanduser().resolve() if path else None


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] e2e-cluster: {msg}", file=sys.stderr, flush=True)


class TestCluster:
    """Context manager owning etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kwok."""

    __test__ = False  # not a pytest test class, despite the name

    def __init__(
        self,
        workdir: str | os.PathLike[str],
        *,
        bin_dir: str | os.PathLike[str] | None = None,
        kubeconfig: str | os.PathLike[str] | None = None,
        timeout: float = 120.0,
        log: Callable[[str], None] = _log,
        apiserver_args: Sequence[str] = (),
    ):
        """workdir: scratch space (certs, etcd data, logs/<component>.log, kubeconfig).
        bin_dir: binaries; default: ensure_binaries() (builds them the first time).
        kubeconfig: use this running cluster instead of starting one; default: existing_kubeconfig().
        timeout: seconds allowed for each component to become ready.
        apiserver_args: extra kube-apiserver flags (e.g. an audit log for a benchmark)."""
        self.workdir = Path(workdir).resolve()
        self.timeout = timeout
        self.log = log
        self.apiserver_args = list(apiserver_args)
        self._bin_dir = Path(bin_dir) if bin_dir else None
        external = Path(kubeconfig).resolve() if kubeconfig else existing_kubeconfig()
        self.existing = external is not None
        self.kubeconfig: str = str(external or self.workdir / "kubeconfig")
        self.api_url: str = ""
        self.token: str | None = None
        self.ca_file: Path | None = None
        self.api: Api  # set by start(): a small REST client authenticated as the admin
        self._procs: list[procs.Process] = []
        self._nodes: list[str] = []  # added by add_gpu_node and not removed since
        self._cidrs = POD_CIDR_BLOCK.subnets(new_prefix=24)  # handed out once each, never reused

    # ---- lifecycle -------------------------------------------------------------------

    def __enter__(self) -> TestCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> TestCluster:
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.existing:
            self.log(f"using existing cluster from {self.kubeconfig}")
            self.api = api_from_kubeconfig(Path(self.kubeconfig), self.workdir / "kubeconfig-files")
            self.api_url, self.token, self.ca_file = self.api.url, self.api.token, self.api.ca_file
            procs.wait_until(self._api_ready, self.timeout, "existing API server /readyz")
            return self
        atexit.register(self.stop)  # belt and braces if the caller forgets stop()
        try:
            self._boot()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Kill every process this cluster started (newest first); remove nodes we added to an existing cluster."""
        if self.existing:
            for name in self._nodes:
                with contextlib.suppress(Exception):  # best-effort cleanup
                    self.api.delete(f"/api/v1/nodes/{name}")
            self._nodes.clear()
            return
        if self._procs:
            self.log("stopping control plane")
        for proc in reversed(self._procs):
            procs.stop(proc)
        self._procs.clear()
        atexit.unregister(self.stop)

    # ---- bootstrap -------------------------------------------------------------------

    def _boot(self) -> None:
        t0 = time.monotonic()
        bin_dir = self._bin_dir or ensure_binaries()
        logs = self.workdir / "logs"
        logs.mkdir(exist_ok=True)
        pki = make_pki(self.workdir / "pki")
        self.token = secrets.token_hex(16)
        # token,user,uid,"groups": an admin in system:masters, which RBAC always allows
        tokens = self.workdir / "tokens.csv"
        tokens.write_text(f'{self.token},admin,admin,"system:masters"\n')
        tokens.chmod(0o600)
        self.ca_file = pki.ca_crt

        def run(name: str, *args: str, env: dict[str, str] | None = None) -> procs.Process:
            proc = procs.start(name, [str(bin_dir / name), *args], logs, env)
            self._procs.append(proc)
            return proc

        etcd_port, peer_port = procs.free_port(), procs.free_port()
        self.log(f"starting etcd on 127.0.0.1:{etcd_port}")
        etcd = run(
            "etcd",
            "--name=e2e",
            f"--data-dir={self.workdir / 'etcd'}",
            f"--listen-client-urls=http://127.0.0.1:{etcd_port}",
            f"--advertise-client-urls=http://127.0.0.1:{etcd_port}",
            f"--listen-peer-urls=http://127.0.0.1:{peer_port}",
            f"--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}",
            f"--initial-cluster=e2e=http://127.0.0.1:{peer_port}",
            "--unsafe-no-fsync",  # throwaway data: skip fsync, which dominates etcd latency
            "--log-level=warn",
        )
        procs.wait_until(
            lambda: b'"health":"true"' in _http_get(f"http://127.0.0.1:{etcd_port}/health"),
            self.timeout,
            "etcd /health",
            [etcd],
        )

        api_port = procs.free_port()
        self.api_url = f"https://127.0.0.1:{api_port}"
        self.api = Api(self.api_url, self.token, pki.ca_crt)
        self.log(f"starting kube-apiserver on {self.api_url}")
        apiserver = run(
            "kube-apiserver",
            f"--etcd-servers=http://127.0.0.1:{etcd_port}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            f"--secure-port={api_port}",
            f"--tls-cert-file={pki.server_crt}",
            f"--tls-private-key-file={pki.server_key}",
            f"--client-ca-file={pki.ca_crt}",
            f"--token-auth-file={tokens}",
            "--authorization-mode=RBAC",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={pki.sa_pub}",
            f"--service-account-signing-key-file={pki.sa_key}",
            # The endpoints of the "kubernetes" Service would be 127.0.0.1, which
            # Endpoints validation rejects (loopback); nothing in-cluster needs them.
            "--endpoint-reconciler-type=none",
            "--allow-privileged=true",
            "--profiling=false",
            *self.apiserver_args,
        )
        procs.wait_until(self._api_ready, self.timeout, "kube-apiserver /readyz", [etcd, apiserver])
        write_kubeconfig(Path(self.kubeconfig), self.api_url, self.token, pki.ca_crt)

        # The rest only needs the API server: start them together, then wait for all.
        kubeconfig = f"--kubeconfig={self.kubeconfig}"
        delegated = (f"--authentication-kubeconfig={self.kubeconfig}", f"--authorization-kubeconfig={self.kubeconfig}")
        cm_port, sched_port, kwok_port = procs.free_port(), procs.free_port(), procs.free_port()
        self.log("starting kube-controller-manager, kube-scheduler, kwok")
        run(
            "kube-controller-manager",
            kubeconfig,
            *delegated,
            "--leader-elect=false",
            "--bind-address=127.0.0.1",
            f"--secure-port={cm_port}",
            f"--cert-dir={self.workdir / 'controller-manager'}",
            f"--service-account-private-key-file={pki.sa_key}",
            f"--root-ca-file={pki.ca_crt}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
        )
        run(
            "kube-scheduler",
            kubeconfig,
            *delegated,
            "--leader-elect=false",
            "--bind-address=127.0.0.1",
            f"--secure-port={sched_port}",
            f"--cert-dir={self.workdir / 'scheduler'}",
        )
        # HOME points into the workdir so kwok cannot pick up a developer's ~/.kwok/kwok.yaml.
        run(
            "kwok",
            kubeconfig,
            f"--config={STAGES_FILE}",
            "--manage-all-nodes=true",
            "--node-ip=127.0.0.1",
            f"--cidr={DEFAULT_POD_CIDR}",
            f"--server-address=127.0.0.1:{kwok_port}",
            "--node-lease-duration-seconds=40",
            env={**os.environ, "HOME": str(self.workdir)},
        )
        for what, url in (
            ("kube-controller-manager", f"https://127.0.0.1:{cm_port}/healthz"),
            ("kube-scheduler", f"https://127.0.0.1:{sched_port}/healthz"),
            ("kwok", f"http://127.0.0.1:{kwok_port}/healthz"),
        ):
            procs.wait_until(functools.partial(_healthy, url), self.timeout, f"{what} /healthz", self._procs)
        # Pod creation is refused until the controller manager has made the default ServiceAccount.
        procs.wait_until(
            lambda: self.api.get("/api/v1/namespaces/default/serviceaccounts/default"),
            self.timeout,
            "default ServiceAccount",
            self._procs,
        )
        self.log(f"control plane ready in {time.monotonic() - t0:.1f}s; kubeconfig: {self.kubeconfig}")

    def _api_ready(self) -> bool:
        return bool(self.api.request("GET", "/readyz", timeout=5) == "ok")

    # ---- helpers for tests -------------------------------------------------------------

    @property
    def env(self) -> dict[str, str]:
        """os.environ plus KUBECONFIG, for subprocesses (kubectl, helm, operators under test)."""
        return {**os.environ, "KUBECONFIG": self.kubeconfig}

    def add_gpu_node(
        self,
        name: str,
        gpus: int = 8,
        labels: dict[str, str] | None = None,
        *,
        cpu: str = "64",
        memory: str = "512Gi",
        pods: int = 110,
        pod_cidr: str | None = None,
        taints: list[dict[str, Any]] | None = None,
        wait: bool = True,
    ) -> dict[str, Any]:
        """Create a fake node with `gpus` nvidia.com/gpu in capacity and allocatable; kwok marks it
        Ready and keeps it so. Its pods get IPs from `pod_cidr` (default: the next free loopback
        /24 from 127.1.0.0/16; on an existing cluster, that cluster's kwok default).
        Returns the Node once Ready (or as created, if wait=False)."""
        if pod_cidr is None and not self.existing:
            pod_cidr = str(next(self._cidrs))
        resources = {"cpu": cpu, "memory": memory, "pods": str(pods), "nvidia.com/gpu": str(gpus),
                     "ephemeral-storage": "2Ti"}
        node: dict[str, Any] = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": name,
                "labels": {
                    "kubernetes.io/hostname": name,
                    "kubernetes.io/os": "linux",
                    "kubernetes.io/arch": "amd64",
                    "type": "kwok",
                    **(labels or {}),
                },
                # kwok's convention for fake nodes; also selects them on a cluster whose
                # kwok manages only annotated nodes.
                "annotations": {"kwok.x-k8s.io/node": "fake"},
            },
            "spec": {"taints": taints or []},
            # Node status is accepted on create (kubelets register this way).
            "status": {"capacity": resources, "allocatable": dict(resources)},
        }
        if pod_cidr:
            node["spec"]["podCIDR"] = pod_cidr
            node["spec"]["podCIDRs"] = [pod_cidr]
        created: dict[str, Any] = self.api.create("/api/v1/nodes", node)
        self._nodes.append(name)
        if not wait:
            return created
        procs.wait_until(
            lambda: condition(self.api.get(f"/api/v1/nodes/{name}"), "Ready") == "True",
            self.timeout,
            f"node {name} Ready",
            self._procs,
        )
        ready: dict[str, Any] = self.api.get(f"/api/v1/nodes/{name}")
        return ready

    def remove_node(self, name: str) -> None:
        """Delete a node added by add_gpu_node (pods bound to it are left to the caller)."""
        try:
            self.api.delete(f"/api/v1/nodes/{name}")
        except ApiError as err:
            if err.status != 404:
                raise
        if name in self._nodes:
            self._nodes.remove(name)

    def wait_for(self, check: Callable[[], bool], what: str, timeout: float | None = None) -> None:
        """Poll `check` (exceptions count as not-yet) until true; fails early if a component dies."""
        procs.wait_until(check, timeout or self.timeout, what, self._procs)

    def kube_client(self) -> Any:
        """A `kubernetes.client.ApiClient` for this cluster (needs the `kubernetes` package)."""
        from kubernetes import config

        return config.new_client_from_config(config_file=self.kubeconfig)  # type: ignore[no-untyped-call]

    def logs(self, component: str) -> str:
        """The log of one started component (e.g. "kwok", "kube-scheduler")."""
        return (self.workdir / "logs" / f"{component}.log").read_text(errors="replace")


def _http_get(url: str) -> bytes:
    # Health probes of local components that serve self-signed certs (controller manager,
    # scheduler): /healthz needs no auth, and the connection never leaves loopback.
    try:
        with urllib.request.urlopen(url, timeout=5, context=ssl._create_unverified_context()) as resp:
            body: bytes = resp.read()
            return body
    except urllib.error.HTTPError as err:
        err.close()  # not ready (e.g. 500); close it or its socket leaks
        raise


def _healthy(url: str) -> bool:
    return _http_get(url) == b"ok"


__all__ = ["ApiError", "TestCluster", "existing_kubeconfig"]
