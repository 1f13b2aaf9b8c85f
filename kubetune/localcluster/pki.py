"""Certificates and keys for one local cluster, made with the ``openssl`` command.

The ``openssl`` binary is on every machine that can run the cluster, so shelling out avoids a
``cryptography`` dependency for what is a handful of calls at cluster start. Keys are ECDSA
P-256 (instant to generate); the service-account signing key is RSA because every JWT
consumer accepts RS256.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

# Long enough for a laptop cluster left running; the cluster is thrown away on `down`.
_VALID_DAYS = 365


@dataclass(frozen=True)
class ClusterPKI:
    """Paths of the files :func:`create_pki` writes into one directory."""

    dir: Path

    @property
    def ca_cert(self) -> Path:
        return self.dir / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.dir / "ca.key"

    @property
    def serving_cert(self) -> Path:
        return self.dir / "apiserver.crt"

    @property
    def serving_key(self) -> Path:
        return self.dir / "apiserver.key"

    @property
    def admin_cert(self) -> Path:
        return self.dir / "admin.crt"

    @property
    def admin_key(self) -> Path:
        return self.dir / "admin.key"

    @property
    def sa_key(self) -> Path:
        return self.dir / "sa.key"

    @property
    def sa_pub(self) -> Path:
        return self.dir / "sa.pub"


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def _signed_cert(pki: ClusterPKI, cert: Path, key: Path, subject: str, extensions: list[str]) -> None:
    csr = cert.with_suffix(".csr")
    ext = cert.with_suffix(".ext")
    _openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", str(key))
    _openssl("req", "-new", "-key", str(key), "-subj", subject, "-out", str(csr))
    ext.write_text("\n".join(extensions) + "\n")
    _openssl(
        "x509", "-req", "-in", str(csr), "-CA", str(pki.ca_cert), "-CAkey", str(pki.ca_key),
        "-CAcreateserial", "-days", str(_VALID_DAYS), "-sha256", "-extfile", str(ext), "-out", str(cert),
    )  # fmt: skip
    csr.unlink()
    ext.unlink()


def create_pki(directory: Path, *, server_ips: list[str], server_names: list[str]) -> ClusterPKI:
    """Write a CA, the apiserver's serving certificate, an admin client certificate
    (group ``system:masters``) and a service-account signing key pair into ``directory``.

    ``server_ips`` must include every address clients use to reach the apiserver: pods reach
    it at the bridge address, not at 127.0.0.1.
    """
    directory.mkdir(parents=True, exist_ok=True)
    pki = ClusterPKI(directory)
    _openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", str(pki.ca_key))
    _openssl(
        "req", "-x509", "-new", "-key", str(pki.ca_key), "-subj", "/CN=kubetune-local-ca",
        "-days", str(_VALID_DAYS), "-sha256", "-out", str(pki.ca_cert),
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign,digitalSignature",
    )  # fmt: skip
    sans = [f"IP:{ip}" for ip in server_ips] + [f"DNS:{name}" for name in server_names]
    _signed_cert(
        pki, pki.serving_cert, pki.serving_key, "/CN=kube-apiserver",
        ["keyUsage=critical,digitalSignature,keyEncipherment", "extendedKeyUsage=serverAuth",
         "subjectAltName=" + ",".join(sans)],
    )  # fmt: skip
    _signed_cert(
        pki, pki.admin_cert, pki.admin_key, "/O=system:masters/CN=kubetune-admin",
        ["keyUsage=critical,digitalSignature,keyEncipherment", "extendedKeyUsage=clientAuth"],
    )  # fmt: skip
    _openssl("genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", str(pki.sa_key))
    _openssl("pkey", "-in", str(pki.sa_key), "-pubout", "-out", str(pki.sa_pub))
    for key in (pki.ca_key, pki.serving_key, pki.admin_key, pki.sa_key):
        key.chmod(0o600)
    return pki
