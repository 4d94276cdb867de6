"""Before the operator watches its kinds: wait until the API server serves them.

Installed together (a Helm install), the operator can start while the API server is still
setting up the storage of a CRD it has just accepted: listing the kind answers 404 or 429
("storage is (re)initializing") for a second or two. kopf retries that on its own, but logs
each failed attempt as an error; waiting here first keeps the log for real errors, and says
what it waits for.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

from kubernetes.client.exceptions import ApiException

from gpufleet.api import gpupool, labels
from gpufleet.operator.kube import Kube

log = logging.getLogger(__name__)
PLURALS = (labels.PLURAL, gpupool.PLURAL)
TRANSIENT = frozenset({404, 429, 503})  # not served yet / storage initialising / not ready


def kind_paths(namespaces: Sequence[str]) -> list[str]:
    """One list request per kind: in the first watched namespace, or cluster-wide."""
    base = f"/apis/{labels.API_GROUP}/{labels.API_VERSION}"
    where = f"{base}/namespaces/{namespaces[0]}" if namespaces else base
    return [f"{where}/{plural}" for plural in PLURALS]


def wait_until_served(
    kube: Kube,
    namespaces: Sequence[str],
    timeout_s: float = 60.0,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> bool:
    """True once every kind lists; False at the deadline (kopf then retries on its own). Any other
    error (403: the RBAC does not allow it) is left for kopf to report as it always has."""
    deadline = clock() + timeout_s
    for path in kind_paths(namespaces):
        while True:
            try:
                kube.request("GET", path, query=[("limit", 1)])
                break
            except ApiException as exc:
                if exc.status not in TRANSIENT:
                    return True
                if clock() >= deadline:
                    log.warning("the API server does not serve a kind yet", extra={"path": path, "status": exc.status})
                    return False
                log.info("waiting for the API server to serve", extra={"path": path, "status": exc.status})
                sleep(0.5)
    return True
