"""A credential's keyless client authentication (spec §6.7): the private key of `private_key_jwt`,
the TLS client certificate of `tls_client_auth`. Read and checked here for broker/vault/credential_fields.py
(config file and admin API alike): the files are loaded at once, so an unreadable file, a
malformed key, a key that does not fit its algorithm or a certificate whose key does not match
is one problem line at start, naming the key.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from broker.client_cert import CertificateProblem, ClientCertificate
from broker.client_key import SIGNING_ALGORITHMS, AlgorithmMismatch, ClientKey, KeyProblem
from broker.reader import Reader, to_str

__all__ = ["KEYLESS_FIELDS", "KEYLESS_METHODS", "Keyless", "read_keyless"]

KEYLESS_METHODS = ("private_key_jwt", "tls_client_auth")
_FIELDS = {
    "private_key_jwt": ("private_key", "signing_alg", "key_id"),
    "tls_client_auth": ("tls_client_cert", "tls_client_key", "tls_ca_file"),
}
KEYLESS_FIELDS = frozenset(field for fields in _FIELDS.values() for field in fields)


@dataclass(frozen=True)
class Keyless:
    private_key: ClientKey | None = None
    certificate: ClientCertificate | None = None
    usable: bool = True  # False after a problem: the credential is left out


def read_keyless(r: Reader, key: str, t: Mapping[str, Any], auth_method: str, token_url: str | None) -> Keyless:
    for method, fields in _FIELDS.items():
        for field in fields:
            if field in t and auth_method != method:
                r.problem(f"{key}.{field}", f'is only used with auth_method = "{method}"')
    if auth_method == "private_key_jwt":
        return _private_key(r, key, t)
    if auth_method == "tls_client_auth":
        if token_url is not None and not token_url.startswith("https://"):
            r.problem(
                f"{key}.token_url",
                'must be an https URL for auth_method = "tls_client_auth" (the certificate is presented on TLS)',
            )
        return _certificate(r, key, t)
    return Keyless()


def _private_key(r: Reader, key: str, t: Mapping[str, Any]) -> Keyless:
    algorithm = r.value(t, "signing_alg", f"{key}.signing_alg", to_str, None, "a string")
    if algorithm is not None and algorithm not in SIGNING_ALGORITHMS:
        r.problem(f"{key}.signing_alg", f"must be one of {', '.join(SIGNING_ALGORITHMS)}, got {algorithm!r}")
        algorithm = None
    key_id = r.value(t, "key_id", f"{key}.key_id", to_str, None, "a string")
    if key_id == "":
        r.problem(f"{key}.key_id", "must not be empty (leave it out for no kid)")
    if "private_key" not in t:
        r.problem(f"{key}.private_key", 'is required for auth_method = "private_key_jwt"')
        return Keyless(usable=False)
    secret = r.secret(t, "private_key", f"{key}.private_key")
    if secret is None:
        return Keyless(usable=False)
    try:
        private_key = ClientKey(secret, algorithm=algorithm, key_id=key_id or None)
    except AlgorithmMismatch as exc:
        r.problem(f"{key}.signing_alg", str(exc))
        return Keyless(usable=False)
    except KeyProblem as exc:
        where = f" ({secret.source})" if secret.source != "literal" else ""
        r.problem(f"{key}.private_key", f"{exc}{where}")
        return Keyless(usable=False)
    return Keyless(private_key=private_key)


def _certificate(r: Reader, key: str, t: Mapping[str, Any]) -> Keyless:
    files: dict[str, str | None] = {}
    for field in _FIELDS["tls_client_auth"]:
        path = r.value(t, field, f"{key}.{field}", to_str, None, "a file path")
        if path == "":
            r.problem(f"{key}.{field}", "must not be empty")
            path = None
        files[field] = path
    cert_file = files["tls_client_cert"]
    if cert_file is None:
        if "tls_client_cert" not in t:
            r.problem(f"{key}.tls_client_cert", 'is required for auth_method = "tls_client_auth"')
        return Keyless(usable=False)
    try:
        certificate = ClientCertificate(cert_file, files["tls_client_key"], files["tls_ca_file"])
    except CertificateProblem as exc:
        r.problem(f"{key}.{exc.field}", exc.message)
        return Keyless(usable=False)
    if certificate.not_after <= datetime.now(UTC):
        r.warnings.append(
            f"{key}.tls_client_cert: the certificate expired at {certificate.not_after.isoformat()}:"
            " the authorization server will refuse it"
        )
    return Keyless(certificate=certificate)
