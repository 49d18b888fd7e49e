"""The id_token of a login, verified (spec §5.3, OIDC Core §3.1.3.7).

Signature against the issuer's JWKS (from discovery; cached; an unknown `kid` refetches it once,
at most every few seconds), algorithms the issuer advertises only (never `none`, never a
symmetric one: an RSA public key must never serve as an HMAC secret), `iss`, `aud`, `azp`,
`exp`, `iat`, `nonce`. Any failure is `upstream_invalid_response` with a sentence that says
which check failed; the claims come back only when every check passed.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from dataclasses import dataclass
from typing import Any

import structlog
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet

from broker.clock import Clock, SystemClock
from broker.errors import UpstreamInvalidResponse
from broker.upstream.client import UpstreamClient
from broker.vault.models import CredentialSettings

__all__ = ["IdTokenVerifier"]

log = structlog.get_logger("broker.upstream")

ASYMMETRIC = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"})
_JWKS_TTL = 600.0
_REFETCH_EVERY = 5.0  # an unknown kid refetches the key set at most this often per issuer
_LEEWAY = 60.0
_MAX_BYTES = 16384


@dataclass
class _KeySet:
    keys: KeySet
    fetched_at: float


def _invalid(why: str) -> UpstreamInvalidResponse:
    return UpstreamInvalidResponse(f"The id_token from the authorization server is not valid: {why}.")


def _header(token: str) -> dict[str, Any]:
    part = token.split(".", 1)[0]
    try:
        header = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    except (ValueError, TypeError, RecursionError):
        raise _invalid("its header cannot be read") from None
    if not isinstance(header, dict):
        raise _invalid("its header is not a JSON object")
    return header


class IdTokenVerifier:
    def __init__(self, upstream: UpstreamClient, clock: Clock | None = None) -> None:
        self.upstream = upstream
        self.clock = clock or SystemClock()
        self._sets: dict[str, _KeySet] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def verify(
        self, credential: CredentialSettings, id_token: str, *, nonce: str, deadline: float
    ) -> dict[str, Any]:
        if len(id_token) > _MAX_BYTES or id_token.count(".") != 2:
            raise _invalid("it is not a signed JWT")
        discovery = await self.upstream.discovery(credential, deadline)
        if not discovery.jwks_uri:
            raise _invalid("the issuer's discovery document names no jwks_uri")
        header = _header(id_token)
        alg = header.get("alg")
        allowed = ASYMMETRIC.intersection(discovery.id_token_algorithms)
        if not isinstance(alg, str) or alg not in allowed:
            raise _invalid(
                f"it is signed with {alg!r}, not an algorithm the issuer advertises ({', '.join(sorted(allowed))})"
            )
        kid = header.get("kid")
        keys = await self._keys(discovery.jwks_uri, deadline)
        if isinstance(kid, str) and not any(key.kid == kid for key in keys.keys):
            keys = await self._keys(discovery.jwks_uri, deadline, refetch_for=kid)
        try:
            token = jwt.decode(id_token, keys.keys, algorithms=[alg])
        except (JoseError, ValueError, TypeError) as exc:
            raise _invalid(f"its signature does not verify ({type(exc).__name__})") from exc
        return self._check_claims(credential, token.claims, nonce)

    def _check_claims(self, credential: CredentialSettings, claims: dict[str, Any], nonce: str) -> dict[str, Any]:
        now = self.clock.now()
        if claims.get("iss") != credential.issuer:
            raise _invalid("its issuer is not the credential's")
        audience = claims.get("aud")
        audiences = [audience] if isinstance(audience, str) else audience if isinstance(audience, list) else []
        if credential.client_id not in audiences:
            raise _invalid("it is not for this client (aud)")
        azp = claims.get("azp")
        if (azp is not None or len(audiences) > 1) and azp != credential.client_id:
            raise _invalid("it was issued to another party (azp)")
        exp, iat = claims.get("exp"), claims.get("iat")
        if not isinstance(exp, int | float) or isinstance(exp, bool) or exp <= now - _LEEWAY:
            raise _invalid("it has expired")
        if not isinstance(iat, int | float) or isinstance(iat, bool) or iat > now + _LEEWAY:
            raise _invalid("its issue time (iat) is missing or in the future")
        if claims.get("nonce") != nonce:
            raise _invalid("its nonce is not the login's")
        subject = claims.get("sub")
        if not isinstance(subject, str) or not subject or len(subject) > 255:
            raise _invalid("it has no usable subject (sub)")
        return claims

    async def _keys(self, jwks_uri: str, deadline: float, refetch_for: str | None = None) -> _KeySet:
        cached = self._sets.get(jwks_uri)
        fresh = cached is not None and time.monotonic() - cached.fetched_at < _JWKS_TTL
        if (
            cached is not None
            and fresh
            and (refetch_for is None or time.monotonic() - cached.fetched_at < _REFETCH_EVERY)
        ):
            return cached
        async with self._locks.setdefault(jwks_uri, asyncio.Lock()):
            again = self._sets.get(jwks_uri)
            if again is not None and again is not cached:
                return again  # fetched while we waited
            document = await self.upstream.get_json(jwks_uri, deadline, "JWKS")
            try:
                keys = KeySet.import_key_set(document)  # type: ignore[arg-type]
            except (JoseError, ValueError, TypeError, KeyError) as exc:
                raise _invalid(f"the issuer's JWKS cannot be read ({type(exc).__name__})") from exc
            found = self._sets[jwks_uri] = _KeySet(keys, time.monotonic())
            if refetch_for is not None:
                log.info("upstream.jwks_refetched", reason="unknown kid", kid=refetch_for[:64])
            return found
