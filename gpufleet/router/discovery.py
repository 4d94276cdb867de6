"""Where pod servers come from. Two implementations share one small interface:

- ``StaticDiscovery``: a fixed list of URLs (local runs, tests); their status documents
  are polled from ``/api/status``.
- ``KubernetesDiscovery`` (``gpufleet.router.kube_discovery``): a watch of pod-server Pods
  by label in one or more namespaces; status documents come from a Pod annotation.

``run`` keeps the ``FleetState`` up to date until cancelled.
"""

from __future__ import annotations

from typing import Protocol

from gpufleet.router.polling import every, poll_status_once
from gpufleet.router.settings import RouterSettings
from gpufleet.router.state import FleetState
from gpufleet.router.upstream import Upstream


class Discovery(Protocol):
    kind: str

    async def run(self, state: FleetState, pool: Upstream) -> None: ...


class StaticDiscovery:
    kind = "static"

    def __init__(
        self,
        urls: list[str],
        *,
        interval_s: float,
        timeout_s: float,
        headers: list[tuple[bytes, bytes]],
        idle_poll_s: float | None = None,
    ) -> None:
        self.urls = urls
        self.idle_poll_s = idle_poll_s
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.headers = headers

    def register(self, state: FleetState) -> None:
        for url in self.urls:
            state.upsert(url, url)

    async def run(self, state: FleetState, pool: Upstream) -> None:
        self.register(state)

        async def poll() -> None:
            await poll_status_once(state, pool, self.timeout_s, self.headers, idle_poll_s=self.idle_poll_s)

        await every(self.interval_s, poll, "status poll")


def pod_headers(settings: RouterSettings) -> list[tuple[bytes, bytes]]:
    """Headers on every request to a pod server: its own API key, when it has one."""
    return [(b"authorization", f"Bearer {settings.pod_api_key}".encode())] if settings.pod_api_key else []


def make_discovery(settings: RouterSettings) -> Discovery:
    if settings.discovery == "kubernetes":
        from gpufleet.router.kube_discovery import KubernetesDiscovery

        return KubernetesDiscovery(
            settings.pod_namespaces,
            settings.pod_label_selector,
            default_port=settings.pod_port,
            fallback_interval_s=settings.status_interval_s,
            idle_poll_s=settings.idle_poll_s,
            timeout_s=settings.poll_timeout_s,
            headers=pod_headers(settings),
        )
    return StaticDiscovery(
        settings.pod_urls,
        interval_s=settings.status_interval_s,
        timeout_s=settings.poll_timeout_s,
        headers=pod_headers(settings),
        idle_poll_s=settings.idle_poll_s,
    )
