"""The router as a real process whose ModelGroups come from a file instead of a Kubernetes watch.

Static discovery (``POD_URLS``, polled), its pods taken to live in one namespace as Kubernetes
discovery would qualify them, and the ModelGroups of ``SEEDED_MODEL_GROUPS`` (a JSON file:
``{"namespace": ..., "items": [ModelGroup objects]}``) reported as the resource watch would: a fleet
at zero that tests can scale up by starting a pod server at one of the URLs.

    SEEDED_MODEL_GROUPS=groups.json POD_URLS=http://127.0.0.1:9001 PORT=9000 python -m tests.support.seeded_router
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from gpufleet.router.discovery import pod_headers
from gpufleet.router.polling import every, poll_status_once
from gpufleet.router.settings import RouterSettings
from gpufleet.router.state import FleetState
from gpufleet.router.upstream import Upstream


class SeededDiscovery:
    kind = "static+modelgroups"

    def __init__(self, settings: RouterSettings, namespace: str, model_groups: list[dict[str, Any]]) -> None:
        self.settings = settings
        self.namespace = namespace
        self.model_groups = model_groups

    async def run(self, state: FleetState, pool: Upstream) -> None:
        state.observe_model_groups("RESET", self.namespace, self.model_groups)
        for url in self.settings.pod_urls:
            state.upsert(url, url, tenant=self.namespace)
        s = self.settings

        async def poll() -> None:
            await poll_status_once(state, pool, s.poll_timeout_s, pod_headers(s), idle_poll_s=s.idle_poll_s)

        await every(s.status_interval_s, poll, "status poll")


def main() -> None:
    import uvicorn

    from gpufleet.logs import setup_logging
    from gpufleet.router.app import server_config
    from gpufleet.router.settings import load_router_settings

    settings = load_router_settings()
    setup_logging("router", settings.log_level)
    doc = json.loads(Path(os.environ["SEEDED_MODEL_GROUPS"]).read_text())
    uvicorn.Server(server_config(settings, SeededDiscovery(settings, doc["namespace"], doc["items"]))).run()


if __name__ == "__main__":
    main()
