"""The upstream's signing keys (JWK Set), republished by the OAuth facade at `{issuer}/jwks` (spec §3.5).

They are found through the upstream's OIDC discovery document (`jwks_uri`, from the upstream
client's discovery cache). A credential with a `token_url` and no `issuer` has none to find, and
neither has an issuer whose discovery names no usable `jwks_uri`: both get an empty key set.
One fetch per issuer at a time, through the upstream client's `get_json`, kept for
`KEYS_TTL_SECONDS` (or the discovery TTL, if shorter); while a refetch fails, the last good set
is served.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

from broker.errors import UpstreamError, UpstreamInvalidResponse, UpstreamUnavailable
from broker.upstream.client import UpstreamClient
from broker.vault.models import CredentialSettings

__all__ = ["KEYS_TTL_SECONDS", "SigningKeys"]

KEYS_TTL_SECONDS = 300.0  # keys rotate: a new one shows here within five minutes
# Members of a private or symmetric key (RFC 7518 §6): such a key is never republished.
_PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})
EMPTY: dict[str, Any] = {"keys": []}


@dataclass(frozen=True)
class _Kept:
    document: dict[str, Any]
    fetched_at: float


class SigningKeys:
    def __init__(self, upstream: UpstreamClient, *, deadline_seconds: float) -> None:
        self.upstream = upstream
        self.ttl = min(KEYS_TTL_SECONDS, upstream.settings.discovery_ttl_seconds)
        self.deadline_seconds = deadline_seconds
        self._kept: dict[str, _Kept] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def get(self, credential: CredentialSettings) -> dict[str, Any]:
        """`{"keys": [...]}`: the upstream's public keys, or none. UpstreamError when they cannot
        be had and none were kept."""
        issuer = credential.issuer
        if issuer is None:
            return EMPTY
        kept = self._kept.get(issuer)
        if kept is not None and time.monotonic() - kept.fetched_at < self.ttl:
            return kept.document
        async with self._locks.setdefault(issuer, asyncio.Lock()):
            kept = self._kept.get(issuer)
            if kept is not None and time.monotonic() - kept.fetched_at < self.ttl:
                return kept.document
            try:
                async with asyncio.timeout(self.deadline_seconds):
                    document = await self._fetch(credential)
            except TimeoutError:
                if kept is not None:
                    return kept.document
                raise UpstreamUnavailable("The authorization server's keys could not be fetched in time.") from None
            except UpstreamError:
                if kept is not None:
                    return kept.document
                raise
            self._kept[issuer] = _Kept(document, time.monotonic())
            return document

    async def _fetch(self, credential: CredentialSettings) -> dict[str, Any]:
        deadline = time.monotonic() + self.deadline_seconds
        jwks_uri = (await self.upstream.discovery(credential, deadline)).jwks_uri
        if jwks_uri is None:
            return EMPTY
        keys = (await self.upstream.get_json(jwks_uri, deadline, "key set")).get("keys")
        if not isinstance(keys, list) or not all(isinstance(key, dict) for key in keys):
            raise UpstreamInvalidResponse("The authorization server's key set has no list of keys.")
        return {"keys": [key for key in keys if not _PRIVATE_MEMBERS & set(key)]}
