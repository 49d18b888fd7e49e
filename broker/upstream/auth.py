"""Client authentication at the token endpoint: one small strategy per method (spec §4.6)."""

from __future__ import annotations

import base64
from typing import Protocol
from urllib.parse import quote_plus

from broker.secret import Secret
from broker.vault.models import CredentialSettings

__all__ = ["ClientAuth", "ClientSecretBasic", "ClientSecretPost", "client_auth_for"]


class ClientAuth(Protocol):
    def apply(
        self, credential: CredentialSettings, secret: Secret, form: dict[str, str], headers: dict[str, str]
    ) -> None:
        """Add what authenticates the client (with `secret`, one of its client_secrets) to the
        token request's form and headers."""


class ClientSecretBasic:
    """HTTP Basic, with id and secret form-urlencoded before base64 (RFC 6749 §2.3.1).

    httpx's own BasicAuth skips the urlencoding, which breaks ids and secrets with ':' or '%'.
    """

    def apply(
        self, credential: CredentialSettings, secret: Secret, form: dict[str, str], headers: dict[str, str]
    ) -> None:
        pair = f"{quote_plus(credential.client_id)}:{quote_plus(secret.reveal())}"
        headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode("ascii")


class ClientSecretPost:
    def apply(
        self, credential: CredentialSettings, secret: Secret, form: dict[str, str], headers: dict[str, str]
    ) -> None:
        form["client_id"] = credential.client_id
        form["client_secret"] = secret.reveal()


_REGISTRY: dict[str, ClientAuth] = {
    "client_secret_basic": ClientSecretBasic(),
    "client_secret_post": ClientSecretPost(),
}


def client_auth_for(method: str) -> ClientAuth:
    try:
        return _REGISTRY[method]
    except KeyError:
        # Settings validation rejects unknown methods, so this is a programming error.
        raise ValueError(f"unsupported auth_method {method!r}") from None
