"""A throwaway Kubernetes control plane for the e2e tests, on loopback only.

Real etcd, kube-apiserver, kube-controller-manager and kube-scheduler, plus kwok
simulating the nodes (and their GPUs) and the pods' lifecycle. Binaries come from
hack/build-test-cluster.sh. See testcluster.TestCluster.
"""

from .binaries import ensure_binaries
from .kube import Api, ApiError, condition
from .procs import StartupError
from .testcluster import TestCluster, existing_kubeconfig

__all__ = ["Api", "ApiError", "StartupError", "TestCluster", "condition", "ensure_binaries", "existing_kubeconfig"]
