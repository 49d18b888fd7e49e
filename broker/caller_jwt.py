"""Caller JWTs (spec §6.3): workload tokens from trusted issuers, verified with joserfc.

    Bearer <JWT> ─▶ ≤ 8 KiB ─▶ verified before? (by SHA-256 of the token, until exp) ─▶ (issuer, sub)
                                 │ no
                                 ▼
      header alg asymmetric ─▶ payload iss a trusted issuer ─▶ alg in that issuer's allow-list
      ─▶ its key set (first use, stale, unknown kid: fetched, boundedly) ─▶ the key for `kid`
      ─▶ signature (joserfc) ─▶ iss, aud, exp, nbf, iat (LEEWAY_SECONDS) ─▶ remembered

`CallerJWTs.verify` is synchronous and does no I/O, so the hit fast path can run it. When only a
key set fetch can decide (first use, keys older than KEYS_TTL_SECONDS, an unknown `kid`), it
raises `KeysNeeded` instead, which answers like any refusal; the caller authentication
middleware, which may await, calls `fetch` and verifies again. Fetches are bounded per issuer
and worker: the first one, then at most one every REFETCH_INTERVAL_SECONDS, whatever tokens are
presented; a failed fetch keeps the last good keys.

Every refusal is the one `JWTRefused` (broker/errors.py: 401 `invalid_token`, one sentence);
which check failed is its `reason`, for operators: `RefusalLog` writes one line per reason per
minute with the count, so a flood of garbage cannot fill a disk.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx
import structlog
from joserfc import jws
from joserfc.errors import ClaimError, ExpiredTokenError, JoseError, MissingClaimError, SecurityWarning
from joserfc.jwk import JWKRegistry, Key
from joserfc.jws import JWSRegistry
from joserfc.jwt import JWTClaimsRegistry

from broker.clock import Clock, SystemClock
from broker.errors import JWTRefused, UpstreamError
from broker.upstream.exchange import get_json, usable_url
from broker.vault.models import CALLER_JWT_ALGORITHMS, CallerIssuerSettings

__all__ = [
    "KEYS_TTL_SECONDS",
    "LEEWAY_SECONDS",
    "MAX_TOKEN_BYTES",
    "REFETCH_INTERVAL_SECONDS",
    "CallerJWTs",
    "KeysNeeded",
    "RefusalLog",
    "Verified",
]

log = structlog.get_logger("broker.callers")

MAX_TOKEN_BYTES = 8192  # checked before anything else; Kubernetes tokens are about 1 KiB
LEEWAY_SECONDS = 30  # for exp, nbf and iat: clocks of issuer and broker disagree a little
KEYS_TTL_SECONDS = 600.0  # a key set is refetched after this; nothing verified is trusted longer
REFETCH_INTERVAL_SECONDS = 10.0  # at most one refetch per issuer and worker in this interval
FETCH_TIMEOUT_SECONDS = 3.0
MAX_VERIFIED = 10_000  # tokens remembered per worker
_ALGORITHMS = frozenset(CALLER_JWT_ALGORITHMS)
# Only for splitting a token and its sizes; each issuer's own registry allows its algorithms.
_PARSING = JWSRegistry(strict_check_header=False)


class KeysNeeded(JWTRefused):
    """Only fetching `issuer`'s key set can decide; a refusal wherever that cannot be awaited."""

    facade = JWTRefused.facade

    def __init__(self, issuer: CallerIssuerSettings, since: float) -> None:
        super().__init__("keys_needed", issuer=issuer.name)
        self.issuer = issuer
        self.since = since  # monotonic: a fetch begun after this one is as good as our own


@dataclass(frozen=True, slots=True)
class Verified:
    issuer: CallerIssuerSettings
    subject: str
    until: float  # wall clock: exp + leeway, and at most KEYS_TTL_SECONDS after verification


@dataclass
class _IssuerKeys:
    """One issuer's key set in this worker, and when it may be fetched again."""

    settings: CallerIssuerSettings
    keys: dict[str | None, Key] | None = None  # by kid
    fetched_at: float = -math.inf  # monotonic, of the last good fetch
    attempted_at: float = -math.inf
    blocked_until: float = -math.inf  # no fetch before this
    jwks_uri: str | None = None  # from discovery, when not configured
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def may_fetch(self, now: float) -> bool:
        return now >= self.blocked_until


class CallerJWTs:
    """Verified tokens and the issuers' key sets of one worker; they outlive registry snapshots."""

    def __init__(self, clock: Clock | None = None, *, max_verified: int = MAX_VERIFIED) -> None:
        self.clock = clock or SystemClock()
        self.max_verified = max_verified
        self.http: httpx.AsyncClient | None = None  # the process's one client, set by the lifespan
        self._verified: dict[bytes, Verified] = {}
        self._keys: dict[str, _IssuerKeys] = {}

    def use(self, http: httpx.AsyncClient | None) -> None:
        """Fetch key sets with `http` from now on (None: fetch nothing); key sets start anew, with
        locks for the running event loop."""
        self.http = http
        self._keys.clear()

    # -- verification (synchronous, no I/O) --------------------------------------------------------

    def verify(
        self, token: str, digest: bytes, issuers: Mapping[str, CallerIssuerSettings], *, may_fetch: bool = True
    ) -> Verified:
        """(issuer, subject) of a valid `token` (`digest`: its SHA-256), or JWTRefused.

        `issuers` are the trusted ones by `iss`. With `may_fetch`, KeysNeeded when a key set
        fetch could decide and one is allowed now."""
        now = self.clock.now()
        hit = self._verified.get(digest)
        if hit is not None and hit.until > now:
            current = issuers.get(hit.issuer.issuer)
            if current is hit.issuer or current == hit.issuer:  # the same issuer, as configured now
                return hit
        if len(token) > MAX_TOKEN_BYTES:
            raise JWTRefused("too_large")
        verified = self._verify(token, issuers, now, may_fetch)
        self._remember(digest, verified, now)
        return verified

    def _verify(self, token: str, issuers: Mapping[str, CallerIssuerSettings], now: float, may_fetch: bool) -> Verified:
        try:
            signed = jws.extract_compact(token.encode("latin-1"), registry=_PARSING)
        except (JoseError, ValueError, TypeError) as exc:
            raise JWTRefused("malformed") from exc
        header = signed.headers()
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in _ALGORITHMS:  # none, HS*: before any key is looked at
            raise JWTRefused("algorithm", alg=str(alg)[:32])
        if "b64" in header or "crit" in header:  # RFC 7797 payloads, extensions: nothing we expect
            raise JWTRefused("header")
        try:
            claims = json.loads(signed.payload)
        except (ValueError, RecursionError) as exc:
            raise JWTRefused("malformed") from exc
        if not isinstance(claims, dict):
            raise JWTRefused("malformed")
        iss = claims.get("iss")
        issuer = issuers.get(iss) if isinstance(iss, str) else None
        if issuer is None:
            raise JWTRefused("unknown_issuer", iss=str(iss)[:200])
        if alg not in issuer.algorithms:
            raise JWTRefused("algorithm", issuer=issuer.name, alg=alg)
        key = self._key(issuer, header.get("kid"), may_fetch)
        self._check_signature(signed, key, alg, issuer)
        claims_check = JWTClaimsRegistry(
            now=int(now),
            leeway=LEEWAY_SECONDS,
            iss={"essential": True, "value": issuer.issuer},
            aud={"essential": True, "value": issuer.audience},
            exp={"essential": True},
            sub={"essential": True},
        )
        try:
            claims_check.validate(claims)
        except ExpiredTokenError as exc:
            raise JWTRefused("expired", issuer=issuer.name) from exc
        except MissingClaimError as exc:
            raise JWTRefused("missing_claim", issuer=issuer.name, claim=exc.claim) from exc
        except ClaimError as exc:
            reason = {"nbf": "not_yet_valid", "iat": "issued_in_future", "aud": "audience"}.get(exc.claim, "claim")
            raise JWTRefused(reason, issuer=issuer.name, claim=exc.claim) from exc
        exp = claims["exp"]  # a finite number now, perhaps an int too large for a float
        until = now + KEYS_TTL_SECONDS if exp >= now + KEYS_TTL_SECONDS else exp + LEEWAY_SECONDS
        return Verified(issuer, claims["sub"], until)

    def _key(self, issuer: CallerIssuerSettings, kid: Any, may_fetch: bool) -> Key:
        state = self._state(issuer)
        monotonic = self.clock.monotonic()
        fetch = may_fetch and state.may_fetch(monotonic)
        if state.keys is None or (fetch and monotonic - state.fetched_at >= KEYS_TTL_SECONDS):
            if fetch:
                raise KeysNeeded(issuer, monotonic)
            if state.keys is None:
                raise JWTRefused("keys_unavailable", issuer=issuer.name)
        if kid is not None and not isinstance(kid, str):
            raise JWTRefused("header", issuer=issuer.name)
        key = state.keys.get(kid)
        if key is None and kid is None and len(state.keys) == 1:
            key = next(iter(state.keys.values()))  # a token without kid, an issuer with one key
        if key is None:
            if fetch:
                raise KeysNeeded(issuer, monotonic)
            raise JWTRefused("unknown_kid", issuer=issuer.name, kid=str(kid)[:64])
        return key

    @staticmethod
    def _check_signature(signed: jws.CompactSignature, key: Key, alg: str, issuer: CallerIssuerSettings) -> None:
        registry = JWSRegistry(algorithms=[alg], strict_check_header=False)
        try:
            with warnings.catch_warnings():
                # joserfc warns that "EdDSA" is deprecated by RFC 9864 (in favour of "Ed25519"):
                # an operator's choice made in the allow-list, not news for every request.
                warnings.simplefilter("ignore", SecurityWarning)
                valid = jws.validate_compact(signed, key, registry=registry)
        except JoseError as exc:  # the key does not fit the algorithm (type, curve, use, alg)
            raise JWTRefused("key_mismatch", issuer=issuer.name, alg=alg) from exc
        if not valid:
            raise JWTRefused("signature", issuer=issuer.name)

    def _remember(self, digest: bytes, verified: Verified, now: float) -> None:
        if len(self._verified) >= self.max_verified:
            for old in [d for d, v in self._verified.items() if v.until <= now]:
                del self._verified[old]
            while len(self._verified) >= self.max_verified:
                del self._verified[next(iter(self._verified))]  # the oldest
        self._verified[digest] = verified

    def _state(self, issuer: CallerIssuerSettings) -> _IssuerKeys:
        state = self._keys.get(issuer.name)
        if state is None or state.settings != issuer:
            state = self._keys[issuer.name] = _IssuerKeys(issuer)
        return state

    # -- fetching key sets (async) -----------------------------------------------------------------

    async def fetch(self, need: KeysNeeded) -> None:
        """Fetch the key set `need` asks for, unless one was attempted since, or fetching is not
        allowed now. Never raises: a failure is logged and the last good keys stay."""
        state = self._state(need.issuer)
        async with state.lock:
            now = self.clock.monotonic()
            if state.attempted_at >= need.since or not state.may_fetch(now):
                return
            refetch = state.keys is not None
            state.attempted_at = now
            started = time.monotonic()
            try:
                async with asyncio.timeout(FETCH_TIMEOUT_SECONDS):
                    keys = await self._download(state)
            except (_FetchFailed, TimeoutError) as exc:
                state.blocked_until = now + REFETCH_INTERVAL_SECONDS
                reason = str(exc) if isinstance(exc, _FetchFailed) else "timed out"
                log.warning("caller_jwt.keys_unavailable", issuer=state.settings.name, reason=reason)
                return
            if refetch:
                state.blocked_until = now + REFETCH_INTERVAL_SECONDS
            state.keys, state.fetched_at = keys, now
            log.info(
                "caller_jwt.keys_fetched",
                issuer=state.settings.name,
                keys=len(keys),
                duration_ms=round((time.monotonic() - started) * 1000, 1),
            )

    async def _download(self, state: _IssuerKeys) -> dict[str | None, Key]:
        issuer = state.settings
        uri = issuer.jwks_uri or state.jwks_uri
        if uri is None:
            discovery = await self._json(issuer.issuer.rstrip("/") + "/.well-known/openid-configuration", "discovery")
            if discovery.get("issuer") != issuer.issuer:
                raise _FetchFailed("the discovery document names a different issuer")
            found = discovery.get("jwks_uri")
            if not isinstance(found, str) or not usable_url(found):
                raise _FetchFailed("the discovery document has no usable jwks_uri")
            uri = state.jwks_uri = found
        document = await self._json(uri, "key set")
        members = document.get("keys")
        if not isinstance(members, list):
            raise _FetchFailed("the key set has no list of keys")
        keys: dict[str | None, Key] = {}
        for member in members:
            key = _public_signing_key(member)
            if key is not None:
                keys.setdefault(member.get("kid"), key)
        if not keys:
            raise _FetchFailed("the key set has no usable public signing key")
        return keys

    async def _json(self, url: str, what: str) -> dict[str, Any]:
        if self.http is None:
            raise _FetchFailed("no HTTP client (the broker is not serving)")
        try:
            return await get_json(self.http, url, time.monotonic() + FETCH_TIMEOUT_SECONDS, what, "the caller issuer")
        except UpstreamError as exc:
            raise _FetchFailed(f"{url}: {exc.description}") from exc


class _FetchFailed(Exception):
    pass


def _public_signing_key(member: Any) -> Key | None:
    """The JWK `member` as a public key for signatures, or None: a symmetric (`oct`) key, a key for
    encryption, or one joserfc cannot read is left out, never an error for the whole set."""
    if not isinstance(member, dict) or member.get("kty") not in ("RSA", "EC", "OKP"):
        return None
    if member.get("use", "sig") != "sig" or not isinstance(member.get("kid", ""), str):
        return None
    public = {k: v for k, v in member.items() if k not in ("d", "p", "q", "dp", "dq", "qi", "oth")}
    try:
        return JWKRegistry.import_key(public)
    except (JoseError, ValueError, TypeError):
        return None


class RefusalLog:
    """`caller_jwt.refused`, at most one line per reason per `interval`, with how many were
    refused for it since the last line: enough for an operator, bounded under a flood."""

    def __init__(self, clock: Clock | None = None, *, interval: float = 60.0) -> None:
        self.clock = clock or SystemClock()
        self.interval = interval
        self._counts: dict[str, tuple[float, int]] = {}  # reason → (last line at, refused since)

    def record(self, refusal: JWTRefused) -> None:
        now = self.clock.monotonic()
        last, count = self._counts.get(refusal.reason, (-math.inf, 0))
        if now - last < self.interval:
            self._counts[refusal.reason] = (last, count + 1)
            return
        self._counts[refusal.reason] = (now, 0)
        log.info("caller_jwt.refused", reason=refusal.reason, suppressed_since_last=count, **refusal.detail)
