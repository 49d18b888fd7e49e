"""The upstream's signing keys (JWK Set), republished by the OAuth facade at `{issuer}/jwks` (spec §3.5).

They are found through the upstream's OIDC discovery document (`jwks_uri`). A credential with a
`token_url` and no `issuer` has none to find, and neither has an issuer whose discovery names no
`jwks_uri`: both get an empty key set. One fetch per credential at a time, through the process's
one HTTP client, kept for `KEYS_TTL_SECONDS` (or the discovery TTL, if shorter); while a refetch
fails, the last good set is served.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any

import httpx

from broker.errors import UpstreamError, UpstreamInvalidResponse, UpstreamUnavailable
from broker.settings import UpstreamSettings
from broker.vault.models import CredentialSettings

__all__ = ["KEYS_TTL_SECONDS", "SigningKeys"]

KEYS_TTL_SECONDS = 300.0  # keys rotate: a new one shows here within five minutes
MAX_BODY_BYTES = 64 * 1024
# Members of a private or symmetric key (RFC 7518 §6): such a key is never republished.
_PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})
EMPTY: dict[str, Any] = {"keys": []}


@dataclass(frozen=True)
class _Kept:
    document: dict[str, Any]
    fetched_at: float


class SigningKeys:
    def __init__(self, http: httpx.AsyncClient, settings: UpstreamSettings, *, deadline_seconds: float) -> None:
        self.http = http
        self.ttl = min(KEYS_TTL_SECONDS, settings.discovery_ttl_seconds)
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
                    document = await self._fetch(issuer)
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

    async def _fetch(self, issuer: str) -> dict[str, Any]:
        discovery = await self._json(f"{issuer}/.well-known/openid-configuration", "discovery document")
        jwks_uri = discovery.get("jwks_uri")
        if jwks_uri is None:
            return EMPTY
        if not isinstance(jwks_uri, str) or not jwks_uri.startswith(("https://", "http://")):
            raise UpstreamInvalidResponse("The authorization server's discovery document has an unusable jwks_uri.")
        keys = (await self._json(jwks_uri, "key set")).get("keys")
        if not isinstance(keys, list) or not all(isinstance(key, dict) for key in keys):
            raise UpstreamInvalidResponse("The authorization server's key set has no list of keys.")
        return {"keys": [key for key in keys if not _PRIVATE_MEMBERS & set(key)]}

    async def _json(self, url: str, what: str) -> dict[str, Any]:
        try:
            async with self.http.stream("GET", url) as response:
                status = response.status_code
                chunks: list[bytes] = []
                size = 0
                async for chunk in response.aiter_bytes():
                    size += len(chunk)
                    if size > MAX_BODY_BYTES:
                        raise UpstreamInvalidResponse(f"The authorization server's {what} is larger than 64 KiB.")
                    chunks.append(chunk)
        except UpstreamError:
            raise
        except httpx.TransportError as exc:
            raise UpstreamUnavailable(f"The authorization server's {what} could not be fetched.") from exc
        except httpx.HTTPError as exc:
            raise UpstreamInvalidResponse(f"The authorization server's {what} could not be read.") from exc
        if status == 429 or status >= 500:
            raise UpstreamUnavailable(f"The authorization server's {what} answered HTTP {status}.")
        if status != 200:
            raise UpstreamInvalidResponse(f"The authorization server's {what} answered HTTP {status}.")
        try:
            document = json.loads(b"".join(chunks))
        except (ValueError, RecursionError) as exc:
            raise UpstreamInvalidResponse(f"The authorization server's {what} is not JSON.") from exc
        if not isinstance(document, dict):
            raise UpstreamInvalidResponse(f"The authorization server's {what} is not a JSON object.")
        return document
