"""Fixtures for the e2e tier: one real control plane (kwok nodes) per test session.

First run builds the binaries (hack/build-test-cluster.sh: 18 min here on 2 cores, budget 35;
cached afterwards). Set GPUFLEET_E2E_KUBECONFIG (or KUBECONFIG plus
GPUFLEET_E2E_EXISTING=1) to run against an already running cluster instead.
"""

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# Import the harness as the top-level package `cluster` whatever pytest's import mode is.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from cluster import TestCluster


def pytest_configure(config):
    config.addinivalue_line("markers", "e2e: needs a Kubernetes control plane (tests/e2e/cluster)")


@pytest.fixture(scope="session")
def test_cluster(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestCluster]:
    cluster = TestCluster(tmp_path_factory.mktemp("cluster"))
    # Show the build (~18-35 min the first time) and boot progress live, even without -s.
    capman = request.config.pluginmanager.getplugin("capturemanager")
    with capman.global_and_fixture_disabled() if capman else contextlib.nullcontext():
        cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()
