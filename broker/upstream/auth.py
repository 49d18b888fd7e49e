"""Client authentication at the token endpoint: one small strategy per method (spec §4.6, §6.7).

`apply` is called once per request sent (every attempt, every fallback to another secret), so
what it builds is never reused: a client assertion gets a new `jti` and `iat` each time.
"""

from __future__ import annotations

import base64
import secrets
from typing import Final, Protocol
from urllib.parse import quote_plus

from joserfc import jwt

from broker.secret import Secret
from broker.vault.models import CredentialSettings

__all__ = [
    "ASSERTION_LIFETIME",
    "ASSERTION_TYPE",
    "ClientAuth",
    "ClientSecretBasic",
    "ClientSecretPost",
    "PrivateKeyJwt",
    "TlsClientAuth",
    "client_auth_for",
]

ASSERTION_TYPE: Final = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
ASSERTION_LIFETIME: Final = 60  # seconds from iat to exp (spec §6.7: at most 60)


class ClientAuth(Protocol):
    def apply(
        self,
        credential: CredentialSettings,
        secret: Secret | None,
        form: dict[str, str],
        headers: dict[str, str],
        *,
        endpoint: str,
        now: float,
    ) -> None:
        """Add what authenticates the client to a request's form and headers: with `secret` (one
        of its client_secrets; None for the keyless methods), for a request POSTed to `endpoint`
        at wall-clock time `now`."""


def _secret(credential: CredentialSettings, secret: Secret | None) -> Secret:
    if secret is None:  # settings give every credential of a secret method a secret
        raise ValueError(f"credential {credential.name} has no client secret")
    return secret


class ClientSecretBasic:
    """HTTP Basic, with id and secret form-urlencoded before base64 (RFC 6749 §2.3.1).

    httpx's own BasicAuth skips the urlencoding, which breaks ids and secrets with ':' or '%'.
    """

    def apply(
        self,
        credential: CredentialSettings,
        secret: Secret | None,
        form: dict[str, str],
        headers: dict[str, str],
        *,
        endpoint: str,
        now: float,
    ) -> None:
        pair = f"{quote_plus(credential.client_id)}:{quote_plus(_secret(credential, secret).reveal())}"
        headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode("ascii")


class ClientSecretPost:
    def apply(
        self,
        credential: CredentialSettings,
        secret: Secret | None,
        form: dict[str, str],
        headers: dict[str, str],
        *,
        endpoint: str,
        now: float,
    ) -> None:
        form["client_id"] = credential.client_id
        form["client_secret"] = _secret(credential, secret).reveal()


class PrivateKeyJwt:
    """A client assertion signed with the credential's private key (RFC 7523 §2.2, OIDC Core §9):
    `iss` = `sub` = the client id, `aud` = the endpoint the request goes to, a random `jti`, `iat`
    now and `exp` a minute later. `client_id` goes along (optional in RFC 7523, wanted by most
    servers)."""

    def apply(
        self,
        credential: CredentialSettings,
        secret: Secret | None,
        form: dict[str, str],
        headers: dict[str, str],
        *,
        endpoint: str,
        now: float,
    ) -> None:
        if credential.private_key is None:  # settings require one for this method
            raise ValueError(f"credential {credential.name} has no private_key")
        signing = credential.private_key.current()
        issued_at = int(now)
        claims = {
            "iss": credential.client_id,
            "sub": credential.client_id,
            "aud": endpoint,
            "jti": secrets.token_urlsafe(18),
            "iat": issued_at,
            "exp": issued_at + ASSERTION_LIFETIME,
        }
        header = {"alg": signing.algorithm, "typ": "JWT"}
        if signing.key_id is not None:
            header["kid"] = signing.key_id
        form["client_id"] = credential.client_id
        form["client_assertion_type"] = ASSERTION_TYPE
        form["client_assertion"] = jwt.encode(header, claims, signing.key, algorithms=[signing.algorithm])


class TlsClientAuth:
    """The client certificate is presented on the TLS connection (RFC 8705 §2.1): the upstream
    client sends the request through the credential's own HTTP client (broker/upstream/mtls.py).
    The form names the client (RFC 8705 §2.1 requires client_id)."""

    def apply(
        self,
        credential: CredentialSettings,
        secret: Secret | None,
        form: dict[str, str],
        headers: dict[str, str],
        *,
        endpoint: str,
        now: float,
    ) -> None:
        form["client_id"] = credential.client_id


_REGISTRY: dict[str, ClientAuth] = {
    "client_secret_basic": ClientSecretBasic(),
    "client_secret_post": ClientSecretPost(),
    "private_key_jwt": PrivateKeyJwt(),
    "tls_client_auth": TlsClientAuth(),
}


def client_auth_for(method: str) -> ClientAuth:
    try:
        return _REGISTRY[method]
    except KeyError:
        # Settings validation rejects unknown methods, so this is a programming error.
        raise ValueError(f"unsupported auth_method {method!r}") from None
