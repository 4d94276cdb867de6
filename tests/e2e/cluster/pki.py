"""Certificates and keys for the test control plane, made with the openssl CLI.

A CA of our own (instead of kube-apiserver's --cert-dir self-signing) lets every
client verify TLS against one file that also goes into the kubeconfig.
"""

from __future__ import annotations

import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path

# Names and IPs clients may use to reach the API server. 10.96.0.1 is the first IP of
# the service range (the in-cluster "kubernetes" Service); it never carries traffic here.
SERVER_SANS = (
    "IP:127.0.0.1,DNS:localhost,IP:10.96.0.1,DNS:kubernetes,DNS:kubernetes.default,"
    "DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
)


@dataclass(frozen=True)
class Pki:
    ca_crt: Path
    server_crt: Path
    server_key: Path
    sa_key: Path  # signs service account tokens (controller manager, API server)
    sa_pub: Path  # verifies them (API server)


def _openssl(args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *shlex.split(args)], cwd=cwd, check=True, capture_output=True)


def make_pki(directory: Path) -> Pki:
    d = directory
    d.mkdir(parents=True, exist_ok=True)
    _openssl(
        "req -x509 -newkey rsa:2048 -nodes -days 3650 -subj /CN=gpufleet-e2e-ca"
        " -addext keyUsage=critical,keyCertSign,cRLSign -keyout ca.key -out ca.crt",
        d,
    )
    _openssl("req -newkey rsa:2048 -nodes -subj /CN=kube-apiserver -keyout server.key -out server.csr", d)
    (d / "server.ext").write_text(
        # Key identifiers and usages keep strict verifiers (Python 3.13+ VERIFY_X509_STRICT) happy.
        f"subjectAltName={SERVER_SANS}\nextendedKeyUsage=serverAuth\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
        "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid,issuer\n"
    )
    _openssl(
        "x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650"
        " -extfile server.ext -out server.crt",
        d,
    )
    _openssl("genrsa -out sa.key 2048", d)
    _openssl("rsa -in sa.key -pubout -out sa.pub", d)
    return Pki(d / "ca.crt", d / "server.crt", d / "server.key", d / "sa.key", d / "sa.pub")
