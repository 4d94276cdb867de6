"""Run a test cluster by hand until Ctrl-C or SIGTERM:  python tests/e2e/cluster [WORKDIR] [--gpu-nodes N]"""

import argparse
import signal
import sys
import tempfile
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # make `cluster` importable as a package
from cluster import TestCluster

parser = argparse.ArgumentParser(prog="python tests/e2e/cluster")
parser.add_argument("workdir", nargs="?", help="scratch directory (default: a new temp dir)")
parser.add_argument("--gpu-nodes", type=int, default=1, help="fake 8-GPU nodes to add")
args = parser.parse_args()

done = threading.Event()
# Explicit handlers: a shell starts background jobs with SIGINT ignored, and SIGTERM
# would otherwise skip the clean shutdown.
for sig in (signal.SIGINT, signal.SIGTERM):
    signal.signal(sig, lambda *_: done.set())

with TestCluster(args.workdir or tempfile.mkdtemp(prefix="gpufleet-e2e-")) as c:
    for i in range(args.gpu_nodes):
        c.add_gpu_node(f"gpu-node-{i}")
    print(f"export KUBECONFIG={c.kubeconfig}\n# logs: {c.workdir / 'logs'}; Ctrl-C stops the cluster", flush=True)
    while not done.wait(1):  # a timeout keeps the main thread responsive to signals
        pass
