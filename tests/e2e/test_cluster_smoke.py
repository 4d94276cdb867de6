"""Smoke test of the e2e control plane: the real scheduler places a GPU pod on a kwok node."""

import ipaddress
import uuid

import pytest

pytestmark = pytest.mark.e2e


def test_gpu_pod_is_scheduled_and_running(test_cluster):
    c = test_cluster
    node = f"gpu-smoke-{uuid.uuid4().hex[:6]}"
    created = c.add_gpu_node(node, gpus=8, labels={"gpufleet.io/gpu-product": "H100"})
    assert created["status"]["allocatable"]["nvidia.com/gpu"] == "8"

    name = f"smoke-{uuid.uuid4().hex[:6]}"
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "nodeSelector": {"kubernetes.io/hostname": node},  # pin it, in case other tests add nodes
            "containers": [{"name": "main", "image": "busybox", "resources": {"limits": {"nvidia.com/gpu": "1"}}}],
        },
    }
    path = f"/api/v1/namespaces/default/pods/{name}"
    c.api.create("/api/v1/namespaces/default/pods", pod)
    try:

        def running() -> bool:
            status = c.api.get(path).get("status", {})
            return status.get("phase") == "Running" and bool(status.get("podIP"))

        c.wait_for(running, f"pod {name} Running with an IP", timeout=60)
        got = c.api.get(path)
        assert got["spec"]["nodeName"] == node  # bound by kube-scheduler, not by us
        ip = ipaddress.ip_address(got["status"]["podIP"])
        if not c.existing:  # our harness gives each node a loopback pod CIDR
            assert ip in ipaddress.ip_network(created["spec"]["podCIDR"])
            assert ip.is_loopback, ip
    finally:
        # The cluster is shared by the session: leave no GPU node behind to attract other tests' pods.
        c.api.delete(path)
        c.remove_node(node)
