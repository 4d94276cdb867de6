"""A minimal stdlib Kubernetes REST client and kubeconfig reader/writer.

The harness talks to the API server with urllib so that it works before (and
without) the `kubernetes` package; tests are free to use that package on top.
"""

from __future__ import annotations

import base64
import json
import ssl
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class ApiError(RuntimeError):
    def __init__(self, status: int, method: str, path: str, body: str):
        super().__init__(f"{method} {path} -> HTTP {status}: {body[:500]}")
        self.status = status
        self.body = body


@dataclass
class Api:
    url: str
    token: str | None = None
    ca_file: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None
    insecure: bool = False

    def _context(self) -> ssl.SSLContext:
        if self.insecure:
            ctx = ssl._create_unverified_context()  # the kubeconfig asked for it
        else:
            ctx = ssl.create_default_context(cafile=str(self.ca_file) if self.ca_file else None)
        if self.client_cert:
            ctx.load_cert_chain(str(self.client_cert), str(self.client_key) if self.client_key else None)
        return ctx

    def request(
        self, method: str, path: str, body: Any = None, *, timeout: float = 10.0, content_type: str = "application/json"
    ) -> Any:
        """Send one request; returns the decoded JSON (or text) body, raises ApiError on HTTP errors."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url.rstrip("/") + path, data=data, method=method)
        req.add_header("Accept", "application/json")
        if data is not None:
            req.add_header("Content-Type", content_type)
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(req, timeout=timeout, context=self._context()) as resp:
                raw = resp.read().decode()
        except urllib.error.HTTPError as err:
            with err:  # an unclosed HTTPError leaks its socket (ResourceWarning)
                raise ApiError(err.code, method, path, err.read().decode(errors="replace")) from None
        try:
            return json.loads(raw)
        except ValueError:
            return raw

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def create(self, path: str, obj: dict[str, Any]) -> Any:
        return self.request("POST", path, obj)

    def delete(self, path: str) -> Any:
        return self.request("DELETE", path)


def write_kubeconfig(path: Path, server: str, token: str, ca_file: Path, name: str = "gpufleet-e2e") -> None:
    """Write a self-contained kubeconfig (CA embedded). JSON is valid YAML, so no yaml lib needed."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": name,
                "cluster": {
                    "server": server,
                    "certificate-authority-data": base64.b64encode(ca_file.read_bytes()).decode(),
                },
            }
        ],
        "users": [{"name": f"{name}-admin", "user": {"token": token}}],
        "contexts": [{"name": name, "context": {"cluster": name, "user": f"{name}-admin", "namespace": "default"}}],
        "current-context": name,
    }
    path.write_text(json.dumps(config, indent=2) + "\n")
    path.chmod(0o600)


def api_from_kubeconfig(kubeconfig: Path, scratch: Path) -> Api:
    """Build an Api for the current context of an existing kubeconfig.

    Supports token, client-certificate and CA settings (inline *-data is written to
    `scratch`). Exec/auth-provider plugins are not supported: use a token kubeconfig.
    """
    import yaml  # PyYAML comes with the `kubernetes` package; only needed for foreign kubeconfigs

    cfg = yaml.safe_load(kubeconfig.read_text())
    ctx_name = cfg.get("current-context")
    ctx = _named(cfg.get("contexts"), ctx_name, "context")
    cluster = _named(cfg.get("clusters"), ctx["cluster"], "cluster")
    user = _named(cfg.get("users"), ctx.get("user"), "user") if ctx.get("user") else {}
    scratch.mkdir(parents=True, exist_ok=True)
    base = kubeconfig.parent

    def file_of(section: dict[str, Any], key: str) -> Path | None:
        if section.get(f"{key}-data"):
            out = scratch / f"{key}.pem"
            out.write_bytes(base64.b64decode(section[f"{key}-data"]))
            return out
        return (base / section[key]) if section.get(key) else None

    token = user.get("token")
    if not token and user.get("tokenFile"):
        token = (base / user["tokenFile"]).read_text().strip()
    return Api(
        url=cluster["server"],
        token=token,
        ca_file=file_of(cluster, "certificate-authority"),
        client_cert=file_of(user, "client-certificate"),
        client_key=file_of(user, "client-key"),
        insecure=bool(cluster.get("insecure-skip-tls-verify")),
    )


def _named(items: list[dict[str, Any]] | None, name: str | None, kind: str) -> dict[str, Any]:
    for item in items or []:
        if item.get("name") == name:
            found: dict[str, Any] = item[kind]
            return found
    raise ValueError(f"kubeconfig has no {kind} named {name!r}")


def condition(obj: dict[str, Any], cond_type: str) -> str | None:
    """Status ("True"/"False"/"Unknown") of a status condition, or None if absent."""
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if cond.get("type") == cond_type:
            status: str | None = cond.get("status")
            return status
    return None
