"""Keys and certificates for the keyless client authentication tests (spec §6.7): signing keys
for private_key_jwt, and a small PKI (trustme) for tls_client_auth: a CA for the test
authorization server's HTTPS certificate (the broker's `tls_ca_file`), a CA its client
certificates must chain to, and a CA nobody trusts."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trustme
from cryptography import x509
from joserfc.jwk import ECKey, RSAKey

__all__ = ["ClientCertFiles", "Pki", "SigningKeyPair", "TlsFiles", "ec_key", "rsa_key"]


@dataclass(frozen=True)
class TlsFiles:
    """What the test authorization server's HTTPS listener needs, and what its clients trust."""

    server_cert_file: str
    server_key_file: str
    server_ca_file: str  # the CA of server_cert_file: a broker's tls_ca_file
    client_ca_file: str  # the CA client certificates must chain to


@dataclass(frozen=True)
class ClientCertFiles:
    cert_file: str  # the certificate alone
    key_file: str  # its key alone
    combined_file: str  # key and certificate in one file (no tls_client_key needed)
    subject: str  # RFC 4514, as the authorization server registers it
    cert_pem: bytes
    key_pem: bytes


class Pki:
    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.server_ca = trustme.CA(organization_name="token-broker tests: server CA")
        self.client_ca = trustme.CA(organization_name="token-broker tests: client CA")
        self.untrusted_ca = trustme.CA(organization_name="token-broker tests: a CA nobody trusts")
        server = self.server_ca.issue_cert("127.0.0.1", "localhost")
        self.tls = TlsFiles(
            server_cert_file=self._write("server.pem", b"".join(blob.bytes() for blob in server.cert_chain_pems)),
            server_key_file=self._write("server.key", server.private_key_pem.bytes()),
            server_ca_file=self._write("server-ca.pem", self.server_ca.cert_pem.bytes()),
            client_ca_file=self._write("client-ca.pem", self.client_ca.cert_pem.bytes()),
        )

    def _write(self, name: str, data: bytes) -> str:
        path = self.root / name
        path.write_bytes(data)
        return str(path)

    def client_cert(self, name: str, *, ca: trustme.CA | None = None) -> ClientCertFiles:
        """A client certificate with common name `name` (from the client CA unless `ca`)."""
        leaf = (ca or self.client_ca).issue_cert(f"{name}.clients.test", common_name=name)
        cert_pem = b"".join(blob.bytes() for blob in leaf.cert_chain_pems)
        key_pem = leaf.private_key_pem.bytes()
        subject = x509.load_pem_x509_certificate(cert_pem).subject.rfc4514_string()
        return ClientCertFiles(
            cert_file=self._write(f"{name}.pem", cert_pem),
            key_file=self._write(f"{name}.key", key_pem),
            combined_file=self._write(f"{name}-with-key.pem", key_pem + cert_pem),
            subject=subject,
            cert_pem=cert_pem,
            key_pem=key_pem,
        )


@dataclass(frozen=True)
class SigningKeyPair:
    key: RSAKey | ECKey

    @property
    def private_pem(self) -> str:
        return self.key.as_pem(private=True).decode()

    @property
    def private_jwk(self) -> str:
        return json.dumps(self.key.as_dict(private=True))

    def public_jwk(self, **extra: Any) -> dict[str, Any]:
        return {**self.key.as_dict(private=False), **extra}

    def jwks(self, **extra: Any) -> dict[str, Any]:
        """A JWK Set with the public key, for AuthServerProcess.register_keyless(jwks=…)."""
        return {"keys": [self.public_jwk(**extra)]}


def rsa_key(bits: int = 2048) -> SigningKeyPair:
    return SigningKeyPair(RSAKey.generate_key(bits))


def ec_key(curve: str = "P-256") -> SigningKeyPair:
    return SigningKeyPair(ECKey.generate_key(curve))
