"""Certificates for test control planes (lb/testing/apiserver.py, lb/testing/node.py), made with the openssl
command line: a CA, certificates it signs (server, client or both, with subject alternative names), and the
service-account key pair. Short-lived (2 days): throwaway clusters only.

    ca = CA.create(d, "bpflb-test-ca")
    crt, key = ca.issue(d, "apiserver", "kube-apiserver", ips=["127.0.0.1"], dns=["localhost"])
    crt, key = ca.issue(d, "kubelet-client", "system:node:n1", org="system:nodes", usage="clientAuth")
"""
from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

DAYS = "2"


def openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


@dataclass(frozen=True)
class CA:
    crt: Path
    key: Path

    @classmethod
    def create(cls, d: Path, cn: str, name: str = "ca") -> "CA":
        crt, key = d / f"{name}.crt", d / f"{name}.key"
        openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", DAYS, "-subj", f"/CN={cn}",
                "-keyout", str(key), "-out", str(crt))
        return cls(crt, key)

    def issue(self, d: Path, name: str, cn: str, *, org: str | None = None, ips: Iterable[str] = (),
              dns: Iterable[str] = (), usage: str = "serverAuth") -> tuple[Path, Path]:
        """<name>.crt and <name>.key in d, signed by this CA. usage: serverAuth, clientAuth or both
        ("serverAuth,clientAuth"); org becomes the subject's O (Kubernetes reads it as the user's group)."""
        crt, key, csr, ext = (d / f"{name}.{x}" for x in ("crt", "key", "csr", "ext"))
        subj = (f"/O={org}" if org else "") + f"/CN={cn}"
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", subj, "-keyout", str(key), "-out", str(csr))
        lines = ["basicConstraints=CA:FALSE", "keyUsage=critical,digitalSignature,keyEncipherment",
                 f"extendedKeyUsage={usage}"]
        sans = [f"IP:{ip}" for ip in ips] + [f"DNS:{n}" for n in dns]
        if sans:
            lines.append("subjectAltName=" + ",".join(sans))
        ext.write_text("\n".join(lines) + "\n")
        openssl("x509", "-req", "-in", str(csr), "-CA", str(self.crt), "-CAkey", str(self.key), "-CAcreateserial",
                "-days", DAYS, "-extfile", str(ext), "-out", str(crt))
        csr.unlink()
        ext.unlink()
        return crt, key


def service_account_keys(d: Path) -> tuple[Path, Path]:
    """sa.key (signs service-account tokens) and sa.pub (verifies them)."""
    key, pub = d / "sa.key", d / "sa.pub"
    openssl("genrsa", "-out", str(key), "2048")
    openssl("rsa", "-in", str(key), "-pubout", "-out", str(pub))
    return key, pub
