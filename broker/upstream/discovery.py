"""An issuer's OIDC discovery document (OIDC Discovery §3, RFC 8414, RFC 8705 §5): where its
endpoints are, read once per issuer per `discovery_ttl_seconds` and shared by every credential
of that issuer. A credential with a `token_url` needs none."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import httpx

from broker.errors import UpstreamInvalidResponse
from broker.upstream.exchange import get_json, usable_url

__all__ = ["Discoveries", "Discovery", "read_discovery"]


@dataclass(frozen=True)
class Discovery:
    """What an issuer's discovery document says (or, for a `token_url`, the config)."""

    token_endpoint: str
    authorization_endpoint: str | None = None
    jwks_uri: str | None = None
    revocation_endpoint: str | None = None
    id_token_algorithms: tuple[str, ...] = ("RS256",)  # OIDC Discovery's default
    # RFC 8705 §5 `mtls_endpoint_aliases`: where clients that present a certificate go instead
    mtls_token_endpoint: str | None = None
    mtls_revocation_endpoint: str | None = None


@dataclass
class _Discovered:
    discovery: Discovery
    fetched_at: float


class Discoveries:
    """The discovery documents of a process: one fetch per issuer at a time, kept for `ttl`."""

    def __init__(self, http: httpx.AsyncClient, ttl: float) -> None:
        self.http = http
        self.ttl = ttl
        self._discovered: dict[str, _Discovered] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    def forget(self) -> None:
        """Credentials changed (an issuer may be new or gone): read every document anew."""
        self._discovered.clear()

    async def get(self, issuer: str, deadline: float) -> Discovery:
        cached = self._discovered.get(issuer)
        if cached and time.monotonic() - cached.fetched_at < self.ttl:
            return cached.discovery
        async with self._locks.setdefault(issuer, asyncio.Lock()):
            cached = self._discovered.get(issuer)
            if cached and time.monotonic() - cached.fetched_at < self.ttl:
                return cached.discovery
            doc = await get_json(self.http, f"{issuer}/.well-known/openid-configuration", deadline, "discovery")
            found = read_discovery(doc, issuer)
            self._discovered[issuer] = _Discovered(found, time.monotonic())
            return found


def read_discovery(doc: dict[str, Any], issuer: str) -> Discovery:
    """The endpoints of `doc`, issuer `issuer`: UpstreamInvalidResponse when it names another
    issuer or no usable token endpoint; an unusable optional endpoint is read as absent."""
    found = doc.get("issuer")
    if not isinstance(found, str) or found.rstrip("/") != issuer:
        raise UpstreamInvalidResponse("The discovery document names a different issuer.")
    endpoint = doc.get("token_endpoint")
    if not isinstance(endpoint, str) or not usable_url(endpoint):
        raise UpstreamInvalidResponse("The discovery document has no usable token_endpoint.")
    urls = {
        name: value if isinstance(value, str) and usable_url(value) else None
        for name in ("authorization_endpoint", "jwks_uri", "revocation_endpoint")
        for value in [doc.get(name)]
    }
    aliases = doc.get("mtls_endpoint_aliases")
    aliases = aliases if isinstance(aliases, dict) else {}
    mtls = {
        name: value if isinstance(value, str) and usable_url(value) else None
        for name in ("token_endpoint", "revocation_endpoint")
        for value in [aliases.get(name)]
    }
    algorithms = doc.get("id_token_signing_alg_values_supported")
    if not isinstance(algorithms, list) or not all(isinstance(a, str) for a in algorithms) or not algorithms:
        algorithms = ["RS256"]
    return Discovery(
        token_endpoint=endpoint,
        authorization_endpoint=urls["authorization_endpoint"],
        jwks_uri=urls["jwks_uri"],
        revocation_endpoint=urls["revocation_endpoint"],
        id_token_algorithms=tuple(a for a in algorithms if a != "none"),
        mtls_token_endpoint=mtls["token_endpoint"],
        mtls_revocation_endpoint=mtls["revocation_endpoint"],
    )
