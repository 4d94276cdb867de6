"""Fixtures shared by every test tier."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def demo_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """model_groups.json of the tiny demo models, built once per session (about 15 s).

    GPUFLEET_TEST_MODELS_DIR reuses a folder across sessions to skip the build."""
    from gpufleet.pod_server.demo_models import build_demo_models

    root = Path(os.environ.get("GPUFLEET_TEST_MODELS_DIR") or tmp_path_factory.mktemp("demo-models"))
    return build_demo_models(root, progress=lambda m: None)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("GPUFLEET_GPU_TESTS") == "1":
        return
    skip = pytest.mark.skip(reason="GPU tests are opt-in: set GPUFLEET_GPU_TESTS=1 on a CUDA machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """A batching engine a test left running keeps its (non-daemon) step thread alive, and the test
    process would never exit after its last test: stop any, and say so, so the leak is seen and fixed."""
    import sys

    batching = sys.modules.get("gpufleet.pod_server.engine.batching")
    if batching is None:
        return
    left = batching.stop_every_manager()
    if left:
        print(f"\n[tests] stopped {left} batching engine(s) that tests left running", file=sys.stderr)
