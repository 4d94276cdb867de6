"""One `gpufleet up` shared by the tests of real clients (the openai SDK, schemathesis, keep-alive).

It is small on purpose, so overload is cheap to reach: two sequences per device and one waiting
request (MAX_SEQUENCES_PER_DEVICE=2, MAX_QUEUE_PER_DEVICE=1), eight tokens unless asked for more,
and a group whose model cannot load (503 for its model, the others keep serving).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.support.processes import ServerProcess, free_port

BROKEN_MODEL = "broken-chat"


@dataclass(frozen=True)
class Fleet:
    router_url: str
    pod_url: str


@pytest.fixture(scope="session")
def fleet(demo_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("fleet")
    doc = json.loads(demo_models.read_text())
    for group in doc["groups"].values():
        for m in group["models"]:
            if (demo_models.parent / m["source"]).exists():  # relative to the demo file
                m["source"] = str(demo_models.parent / m["source"])
    (tmp / "empty").mkdir()
    doc["groups"]["broken"] = {"models": [{"id": BROKEN_MODEL, "source": str(tmp / "empty"), "task": "chat"}]}
    groups = tmp / "model_groups.json"
    groups.write_text(json.dumps(doc))
    port = free_port()
    env = {
        "DEVICES": "cpu:0",
        "MODEL_GROUPS": str(groups),
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "UP_LOG_DIR": str(tmp / "pods"),
        "TORCH_THREADS": "1",
        "STATUS_INTERVAL_S": "0.5",
        "MAX_SEQUENCES_PER_DEVICE": "2",
        "MAX_QUEUE_PER_DEVICE": "1",
        "MAX_TOKENS_DEFAULT": "8",
    }
    up = ServerProcess(["up"], env, tmp / "up.log", f"http://127.0.0.1:{port}")
    try:
        up.wait_ready(180)
        pods = httpx.get(up.url + "/api/fleet", timeout=10).json()["pods"]
        yield Fleet(up.url, next(iter(pods.values()))["url"])
    finally:
        up.stop()
