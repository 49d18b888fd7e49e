"""The token service: L1 → L2 → single-flight fetch, refresh-ahead, invalidation (spec §4, §5.4).

get ─▶ L1 (this worker, only while subscribed to events) ─▶ L2 (Redis, bounded by its PTTL)
      ─▶ LocalFlight ─▶ DistributedFlight (lock + fence, double-check) ─▶ refusal remembered?
      ─▶ the grant (client credentials, or a subject's refresh token) ─▶ L2 write (fenced) ─▶ event

One path for every token: what differs between a credential's token and a subject's (a user who
logged in, spec §5) is the key (the subject is in it) and the grant that fetches it (broker/grants.py).

One deadline per request, taken when it arrives, bounds every step; a token that is still valid
beats any error, the deadline's included. Freshness is judged on this process's monotonic clock.
"""

from __future__ import annotations

import hmac
import random
import time
from collections.abc import Callable
from typing import Literal, TypeVar

import structlog

from broker.clock import Clock, SystemClock
from broker.entries import CachedToken
from broker.errors import (
    BrokerError,
    StoreBusy,
    StoreUnavailable,
    UpstreamError,
    UpstreamInvalidResponse,
    UpstreamRejected,
    UpstreamUnavailable,
)
from broker.events import Event
from broker.freshness import cache_window, cacheable, effective_skew, is_fresh, satisfies, within
from broker.grants import AdoptStored, ClientCredentials, Grant, SubjectRefresh
from broker.l1 import L1Cache
from broker.metrics import Stats
from broker.refresh import RefreshAhead
from broker.refusals import RecentRefusals
from broker.settings import CacheSettings
from broker.singleflight import DistributedFlight, LocalFlight
from broker.store import Lock, Store, TokenKeys
from broker.upstream.client import UpstreamClient
from broker.upstream.response import FetchedToken
from broker.vault.models import CredentialSettings

__all__ = ["Invalidation", "Source", "TokenService", "cache_window", "effective_skew", "is_fresh", "satisfies"]

log = structlog.get_logger("broker.tokens")

Source = Literal["l1", "l2", "fetched", "coalesced"]
Invalidation = Literal["dropped", "not_current", "throttled"]
T = TypeVar("T")


class TokenService:
    def __init__(
        self,
        cache: CacheSettings,
        store: Store,
        upstream: UpstreamClient,
        *,
        request_deadline: float,
        clock: Clock | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.cache = cache
        self.store = store
        self.upstream = upstream
        self.request_deadline = request_deadline
        self.clock = clock or SystemClock()
        self.rng = rng or random.Random()  # noqa: S311 - jitter, not security
        self.l1 = L1Cache(cache.l1_max_entries)
        self.l1_enabled = False  # true only while this worker is subscribed to events
        self.flights: LocalFlight[tuple[CachedToken, Source]] = LocalFlight()
        self.distributed = DistributedFlight(store, cache.lock_ttl_seconds)
        self.stats = Stats()
        self.refusals = RecentRefusals(store, cache.negative_ttl_seconds, cache.l1_max_entries)
        self.client_credentials: Grant = ClientCredentials(upstream)
        self.subject_refresh: Grant = SubjectRefresh(upstream, store, self.clock)
        self._keys: dict[tuple[str, str, str, str | None], TokenKeys] = {}
        self.refresher = RefreshAhead(self.flights, self.clock, request_deadline, cache.l1_max_entries)

    def keys_for(self, credential: CredentialSettings, scope_set: str, subject: str | None = None) -> TokenKeys:
        memo = (credential.name, credential.shape, scope_set, subject)
        keys = self._keys.get(memo)
        if keys is None:
            if len(self._keys) >= self.cache.l1_max_entries:
                self._keys.clear()
            keys = self._keys[memo] = self.store.keys.for_token(credential.name, credential.shape, scope_set, subject)
        return keys

    def _grant(self, subject: str | None) -> Grant:
        return self.client_credentials if subject is None else self.subject_refresh

    def forget(self, credentials: set[str]) -> None:
        """These credentials changed (or went): drop what this worker remembers of them. Their
        tokens in Redis are unreachable anyway when the change shaped them (keys carry the shape)."""
        tags = tuple(tag for name in credentials for tag in (f":{{{name}}}:", f":{{{name}/"))
        self.l1.drop_where(lambda key: any(tag in key for tag in tags))
        self.refusals.forget(lambda key: any(tag in key for tag in tags))
        self._keys = {memo: keys for memo, keys in self._keys.items() if memo[0] not in credentials}
        self.upstream.forget(credentials)

    # -- events -------------------------------------------------------------------------------

    def on_event(self, event: Event) -> None:
        self.l1.changed(event.key, event.op, event.fingerprint)
        cached = self.l1.peek(event.key)
        # "set": another token replaced ours. "drop": the stored token was invalidated; ours is
        # dropped whatever its fingerprint says (during a key rotation, fingerprints made under
        # different keys do not match, and a drop is rare enough to refetch for).
        if cached is not None and (event.op == "drop" or cached.fingerprint != event.fingerprint):
            self.l1.drop(event.key)
        self.distributed.notify(event)

    def on_subscription(self, live: bool) -> None:
        if live:
            # Events may have been missed while unsubscribed: start L1 from nothing, and read
            # Redis again at once (it just answered) instead of waiting out its fail-fast pause.
            self.store.answered()
            self.l1.clear()
        self.l1_enabled = live

    def _l1_usable(self) -> bool:
        # Subscribed: L1 is kept current by events. Redis unreachable: availability wins, and an
        # invalidation missed meanwhile is caught by the caller's next report (spec §4.3).
        return self.l1_enabled or not self.store.reachable

    # -- the hot path ---------------------------------------------------------------------------

    def get_l1(
        self, credential: CredentialSettings, scope_set: str, min_ttl: float, subject: str | None = None
    ) -> CachedToken | None:
        """A hit from this worker's memory with no I/O at all, or None."""
        if not self._l1_usable():
            return None
        keys = self.keys_for(credential, scope_set, subject)
        entry = self.l1.get(keys.token)
        if entry is None:
            return None
        now = self.clock.monotonic()
        if not satisfies(entry, now, min_ttl):
            return None
        if now >= entry.refresh_at:
            self._refresh_ahead(credential, scope_set, keys, entry, subject)
        return entry

    async def get(
        self, credential: CredentialSettings, scope_set: str, min_ttl: float = 0.0, subject: str | None = None
    ) -> tuple[CachedToken, Source]:
        """A token with time left for (credential, scope set[, subject]), within the request deadline.

        Raises UpstreamError subclasses (or StoreBusy) when no valid token can be had.
        """
        entry = self.get_l1(credential, scope_set, min_ttl, subject)
        if entry is not None:
            return entry, "l1"
        deadline = time.monotonic() + self.request_deadline
        keys = self.keys_for(credential, scope_set, subject)
        return await self._get_slow(credential, scope_set, keys, min_ttl, deadline, subject)

    async def _get_slow(
        self,
        credential: CredentialSettings,
        scope_set: str,
        keys: TokenKeys,
        min_ttl: float,
        deadline: float,
        subject: str | None,
    ) -> tuple[CachedToken, Source]:
        key = keys.token
        # A miss joins a fetch already under way in this process before touching Redis
        # (not a background refresh: its failure must stay invisible to callers).
        joined_error: BrokerError | None = None
        if key not in self.refresher.running and self.flights.running(key):
            self.stats.waiters += 1
            try:
                joined = await within(deadline, self.flights.join(key))
            except (UpstreamError, StoreBusy) as exc:
                joined_error = exc  # a still-valid token may yet beat this error (below)
            else:
                if joined is not None and is_fresh(joined[0], self.clock.monotonic()):
                    return joined[0], "coalesced"
            finally:
                self.stats.waiters -= 1
        since = self.l1.mark()
        try:
            entry = await within(deadline, self.store.get(keys))
            if not self.l1_enabled:
                # Redis answers but the events subscription is down: copies kept from before may
                # have missed events, and must not become servable if Redis goes away next.
                self.l1.clear()
        except StoreUnavailable:
            entry = self.l1.get(key)
        except StoreBusy as exc:
            entry = self.l1.get(key) if self._l1_usable() else None
            joined_error = joined_error or exc  # no fetch without the lock: load is not an outage
        except UpstreamUnavailable as exc:  # the deadline ran out
            entry, joined_error = self.l1.get(key) if self._l1_usable() else None, exc
        now = self.clock.monotonic()
        fallback = entry if entry is not None and is_fresh(entry, now) else None
        if entry is not None and satisfies(entry, now, min_ttl):
            if self._l1_usable():
                self.l1.put(key, entry, since)
            if now >= entry.refresh_at:
                self._refresh_ahead(credential, scope_set, keys, entry, subject)
            return entry, "l2"
        if joined_error is not None:
            if fallback is not None:
                return fallback, "l2"
            raise joined_error

        def accept(candidate: CachedToken) -> bool:
            return satisfies(candidate, self.clock.monotonic(), min_ttl)

        self.stats.waiters += 1
        try:
            (entry, source), led = await within(
                deadline,
                self.flights.run(key, lambda: self._fetch(credential, scope_set, keys, accept, deadline, subject)),
            )
            if not is_fresh(entry, self.clock.monotonic()):
                raise UpstreamInvalidResponse("The token had too little life left by the time it arrived.")
        except (UpstreamError, StoreBusy):
            # A token that is still valid beats an error, even if it has less than min_ttl left.
            if fallback is not None and is_fresh(fallback, self.clock.monotonic()):
                return fallback, "l2"
            raise
        finally:
            self.stats.waiters -= 1
        return entry, (source if led else "coalesced")

    # -- fetching -----------------------------------------------------------------------------

    async def _fetch(
        self,
        credential: CredentialSettings,
        scope_set: str,
        keys: TokenKeys,
        accept: Callable[[CachedToken], bool],
        deadline: float,
        subject: str | None = None,
    ) -> tuple[CachedToken, Source]:
        since = self.l1.mark()
        grant = self._grant(subject)

        async def fetch_and_share(lock: Lock) -> CachedToken:
            try:
                entry = await self._fetch_upstream(credential, scope_set, keys, deadline, grant, lock)
            except AdoptStored:
                # Another process rotated this subject's grant first: its token is the one.
                stored = await self.store.get(keys)
                if stored is None or not is_fresh(stored, self.clock.monotonic()):
                    raise UpstreamUnavailable(
                        "This user's token is being refreshed elsewhere.", retry_after=1
                    ) from None
                return stored
            return await self._share(keys, entry)

        try:
            entry, fetched_here = await self.distributed.run(keys, accept, fetch_and_share, deadline)
        except StoreUnavailable as exc:
            if grant.fail_closed:
                # A refresh token is spent only under the fleet's lock (spec §5.4): fail closed.
                raise UpstreamUnavailable(
                    "Redis is unreachable: a user's token is refreshed only under the fleet's lock.", retry_after=1
                ) from exc
            # Redis is down: availability wins, fetch with in-process single-flight only.
            entry, fetched_here = await self._fetch_upstream(credential, scope_set, keys, deadline, grant, None), True
        if cacheable(entry, self.clock.monotonic()) and self._l1_usable():
            self.l1.put(keys.token, entry, since)
        return entry, ("fetched" if fetched_here else "l2")

    async def _fetch_upstream(
        self,
        credential: CredentialSettings,
        scope_set: str,
        keys: TokenKeys,
        deadline: float,
        grant: Grant,
        lock: Lock | None,
    ) -> CachedToken:
        """One upstream request, unless the authorization server refused this one a moment ago:
        the one place a remembered refusal answers, under the fetch lock, so that a process that
        waited for the lock sees the refusal its holder just got."""
        await self.refusals.check(keys)
        try:
            fetched = await grant.fetch(credential, scope_set, keys, deadline, lock)
        except UpstreamRejected as exc:
            await self.refusals.remember(keys, exc)
            raise
        return self._entry_from(fetched, lock.fence if lock else 0)

    async def prime(
        self, credential: CredentialSettings, scope_set: str, subject: str, fetched: FetchedToken
    ) -> CachedToken:
        """Cache a token a login just brought (spec §5.3), under the key's fetch lock (its fence)."""
        keys = self.keys_for(credential, scope_set, subject)
        lock = await self.store.acquire_lock(keys, "login", self.cache.lock_ttl_seconds)
        entry = self._entry_from(fetched, lock.fence if lock else 0)
        if lock is None:
            return entry  # someone is refreshing it right now: theirs will be the cached one
        try:
            return await self._share(keys, entry)
        finally:
            await self.store.release_lock(lock)

    def _entry_from(self, fetched: FetchedToken, fence: int) -> CachedToken:
        now, wall = self.clock.monotonic(), self.clock.now()
        issued = now - (wall - fetched.issued_at)  # when the request was sent, on our monotonic clock
        window = cache_window(fetched.lifetime, self.cache.skew_seconds)
        low, high = self.cache.refresh_at
        return CachedToken(
            access_token=fetched.access_token,
            scope=fetched.scope,
            expires_at=fetched.expires_at,
            expires=issued + fetched.lifetime,
            fresh_until=issued + window,
            refresh_at=issued + self.rng.uniform(low, high) * window,
            fetched_at=now,
            fingerprint=self.store.codec.fingerprint(fetched.access_token),
            fence=fence,
        )

    async def _share(self, keys: TokenKeys, entry: CachedToken) -> CachedToken:
        """Share the token through Redis → the token to use from now on.

        If Redis holds one written under a later lock (ours expired while we fetched and someone
        else was faster), that one wins here too. If Redis fails now, ours is still good.
        """
        if not cacheable(entry, self.clock.monotonic()):
            return entry
        try:
            if await self.store.put(keys, entry):
                return entry
            newer = await self.store.get(keys)
        except (StoreUnavailable, StoreBusy):
            return entry
        return newer if newer is not None and is_fresh(newer, self.clock.monotonic()) else entry

    # -- refresh-ahead ----------------------------------------------------------------------------

    def _refresh_ahead(
        self,
        credential: CredentialSettings,
        scope_set: str,
        keys: TokenKeys,
        current: CachedToken,
        subject: str | None = None,
    ) -> None:
        self.refresher.start(
            keys.token,
            credential.name,
            current,
            lambda accept, deadline: self._fetch(credential, scope_set, keys, accept, deadline, subject),
        )

    # -- invalidation -----------------------------------------------------------------------------

    async def invalidate(
        self, credential: CredentialSettings, scope_set: str, access_token: str, subject: str | None = None
    ) -> Invalidation:
        """Drop the cached token only if it is the one reported; then refresh it in the background."""
        keys = self.keys_for(credential, scope_set, subject)
        cached = self.l1.peek(keys.token)
        if cached is not None and hmac.compare_digest(cached.access_token, access_token):
            self.l1.drop(keys.token)
        try:
            fence = await self.store.drop_if(keys, access_token, self.cache.invalidate_min_interval_seconds)
        except (StoreUnavailable, StoreBusy):
            # The local copy is gone already; the shared one expires on its own or is replaced by
            # the next report once Redis answers. The caller's answer is the same either way.
            return "not_current"
        if fence < 0:
            return "throttled"
        if fence == 0:
            return "not_current"
        gone = CachedToken("", "", 0.0, 0.0, 0.0, 0.0, 0.0, "-", fence=fence)
        self.refresher.reset(keys.token)
        self._refresh_ahead(credential, scope_set, keys, gone, subject)
        return "dropped"
