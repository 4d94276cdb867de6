"""Several operator replicas, one acting: kopf peering, plus the parts kopf leaves to us.

kopf pauses its handlers in every replica but the one of highest priority seen alive in
the peering object (KopfPeering per watched namespace, or one ClusterKopfPeering). Two
things it does not do, done here: create the peering object (kopf only waits for it), and
tell our own resync task whether this replica is the acting one (``is_active``, pure, over
the peering object's status as kopf writes it: ``{identity: {priority, lifetime, lastseen}}``).
"""

from __future__ import annotations

import datetime
import logging
from typing import Any

from kubernetes.client.exceptions import ApiException

from gpufleet.operator.kube import Kube

log = logging.getLogger(__name__)

GROUP_VERSION = "kopf.dev/v1"


def peering_paths(name: str, namespaces: list[str]) -> list[str]:
    if not namespaces:
        return [f"/apis/{GROUP_VERSION}/clusterkopfpeerings/{name}"]
    return [f"/apis/{GROUP_VERSION}/namespaces/{ns}/kopfpeerings/{name}" for ns in namespaces]


def ensure_peering_objects(kube: Kube, name: str, namespaces: list[str]) -> None:
    """Create the peering object(s) if missing (idempotent; another replica may race us)."""
    for path in peering_paths(name, namespaces):
        if kube.get(path) is not None:
            continue
        kind = "ClusterKopfPeering" if not namespaces else "KopfPeering"
        collection, _, _ = path.rpartition("/")
        body = {"apiVersion": GROUP_VERSION, "kind": kind, "metadata": {"name": name}}
        try:
            kube.request("POST", collection, body)
            log.info("created peering object", extra={"path": path})
        except ApiException as exc:
            if exc.status != 409:
                raise


def _alive(peer: dict[str, Any], now: datetime.datetime) -> bool:
    try:
        seen = datetime.datetime.fromisoformat(str(peer["lastseen"]).replace("Z", "+00:00"))
        if seen.tzinfo is None:
            seen = seen.replace(tzinfo=datetime.UTC)
        return seen + datetime.timedelta(seconds=int(peer.get("lifetime", 60))) > now
    except (KeyError, ValueError, TypeError):
        return False


def is_active(status: dict[str, Any] | None, identity: str, priority: int, now: datetime.datetime) -> bool:
    """Whether this replica acts: no other live peer has a higher priority (kopf's rule)."""
    for peer_id, peer in (status or {}).items():
        if peer_id == identity or not isinstance(peer, dict) or not _alive(peer, now):
            continue
        if int(peer.get("priority", 0)) > priority:
            return False
    return True
