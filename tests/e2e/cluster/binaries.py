"""Locate (building on first use) the control-plane binaries via hack/build-test-cluster.sh."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[3]
BUILD_SCRIPT = REPO_ROOT / "hack" / "build-test-cluster.sh"
REQUIRED = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok", "kubectl")


def ensure_binaries() -> Path:
    """Return the directory holding the binaries.

    `GPUFLEET_K8S_BIN` points at a ready directory and skips the script. Otherwise the
    script runs: a no-op when its cache is complete, a 25-35 minute build the first time.
    Its progress goes to our stderr; its last stdout line is the bin directory.
    """
    override = os.environ.get("GPUFLEET_K8S_BIN")
    if override:
        bin_dir = Path(override)
    else:
        out = subprocess.run([str(BUILD_SCRIPT)], check=True, stdout=subprocess.PIPE, text=True).stdout
        bin_dir = Path(out.strip().splitlines()[-1])
    missing = [b for b in REQUIRED if not os.access(bin_dir / b, os.X_OK)]
    if missing:
        raise FileNotFoundError(f"missing binaries in {bin_dir}: {', '.join(missing)}")
    return bin_dir
