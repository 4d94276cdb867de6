"""A thin JSON-in, JSON-out layer over the `kubernetes` package's ApiClient.

The operator works with plain dicts (what the builders return and what kopf hands to
handlers), so it talks REST with dicts rather than through the typed models.
Writes of children are server-side applies with one field manager: applying the same
manifest again changes nothing, and a forced apply takes back fields edited by hand.
"""

from __future__ import annotations

import json
import logging
import socket
import time
from typing import Any
from urllib.parse import quote

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

log = logging.getLogger(__name__)

# Where each kind the operator writes lives in the REST API: (API prefix, plural).
RESOURCES: dict[tuple[str, str], tuple[str, str]] = {
    ("v1", "ConfigMap"): ("/api/v1", "configmaps"),
    ("v1", "Service"): ("/api/v1", "services"),
    ("v1", "ServiceAccount"): ("/api/v1", "serviceaccounts"),
    ("v1", "Pod"): ("/api/v1", "pods"),
    ("rbac.authorization.k8s.io/v1", "RoleBinding"): ("/apis/rbac.authorization.k8s.io/v1", "rolebindings"),
    ("apps/v1", "StatefulSet"): ("/apis/apps/v1", "statefulsets"),
    ("coordination.k8s.io/v1", "Lease"): ("/apis/coordination.k8s.io/v1", "leases"),
    ("policy/v1", "PodDisruptionBudget"): ("/apis/policy/v1", "poddisruptionbudgets"),
    ("v1", "PersistentVolumeClaim"): ("/api/v1", "persistentvolumeclaims"),
}

APPLY = "application/apply-patch+yaml"  # a JSON body is valid YAML
MERGE = "application/merge-patch+json"


def load_api_client() -> client.ApiClient:
    """In a pod: its ServiceAccount; elsewhere: KUBECONFIG (or ~/.kube/config)."""
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.ApiClient()


def object_path(api_version: str, kind: str, namespace: str, name: str | None = None) -> str:
    prefix, plural = RESOURCES[(api_version, kind)]
    path = f"{prefix}/namespaces/{quote(namespace)}/{plural}"
    return f"{path}/{quote(name)}" if name else path


def manifest_path(manifest: dict[str, Any]) -> str:
    meta = manifest["metadata"]
    return object_path(manifest["apiVersion"], manifest["kind"], meta["namespace"], meta["name"])


class Kube:
    def __init__(self, api_client: client.ApiClient, field_manager: str, timeout_s: float = 30.0) -> None:
        self.api = api_client
        self.field_manager = field_manager
        self.timeout_s = timeout_s
        self.instance = socket.gethostname()

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        query: list[tuple[str, Any]] | None = None,
        content_type: str = "application/json",
    ) -> Any:
        headers = {"Accept": "application/json", "Content-Type": content_type}
        m, url, hdrs, data, post = self.api.param_serialize(
            method=method,
            resource_path=path,
            query_params=query or [],
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
        )
        resp = self.api.call_api(m, url, header_params=hdrs, body=data, post_params=post,
                                 _request_timeout=self.timeout_s)
        raw = resp.read()
        if not 200 <= resp.status < 300:
            raise ApiException(http_resp=resp)
        return json.loads(raw) if raw else None

    def get(self, path: str) -> dict[str, Any] | None:
        """The object, or None if it does not exist."""
        try:
            obj: dict[str, Any] = self.request("GET", path)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return obj

    def list(self, path: str, label_selector: str | None = None) -> list[dict[str, Any]]:
        query = [("labelSelector", label_selector)] if label_selector else []
        items: list[dict[str, Any]] = (self.request("GET", path, query=query) or {}).get("items") or []
        return items

    def apply(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """Server-side apply; force takes ownership back from whoever edited our fields."""
        query = [("fieldManager", self.field_manager), ("force", "true")]
        out: dict[str, Any] = self.request("PATCH", manifest_path(manifest), manifest, query, APPLY)
        return out

    def post_event(self, obj: dict[str, Any], kind: str, reason: str, message: str) -> None:
        """A core/v1 Event about `obj`, what `kubectl describe` shows."""
        meta = obj["metadata"]
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": obj.get("apiVersion"),
                "kind": obj.get("kind"),
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta.get("uid"),
            },
            "type": kind,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": self.field_manager},
            "reportingComponent": self.field_manager,
            "reportingInstance": self.instance,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        self.request("POST", f"/api/v1/namespaces/{quote(meta['namespace'])}/events", event)

    def merge_patch(self, path: str, patch: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = self.request("PATCH", path, patch, None, MERGE)
        return out
