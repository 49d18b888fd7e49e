"""The token service: L1 → L2 → single-flight fetch, refresh-ahead, invalidation (spec §4).

get ─▶ L1 (this worker, only while subscribed to events) ─▶ L2 (Redis) ─▶ LocalFlight
      ─▶ DistributedFlight (lock, double-check) ─▶ upstream ─▶ L2 write (newer wins) ─▶ event
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Literal

import structlog

from broker.clock import Clock, SystemClock
from broker.errors import StoreUnavailable, UpstreamError, UpstreamRejected, UpstreamUnavailable
from broker.events import Event
from broker.metrics import Stats
from broker.refusals import RecentRefusals
from broker.settings import CacheSettings, CredentialSettings
from broker.singleflight import DistributedFlight, LocalFlight
from broker.store import CachedToken, Store, fingerprint, lock_key, token_key
from broker.upstream import FetchedToken, UpstreamClient

__all__ = ["Source", "TokenService", "cache_window", "effective_skew", "is_fresh"]

log = structlog.get_logger("broker.tokens")

Source = Literal["l1", "l2", "fetched", "coalesced"]

MIN_CACHEABLE_LIFETIME = 2.0
RECENT_FETCH = 1.0  # a token this young satisfies any min_ttl (spec §3.1)
_REFRESH_RETRY_FIRST = 1.0
_REFRESH_RETRY_MAX = 30.0


def effective_skew(lifetime: float, skew: float) -> float:
    """min(skew, lifetime/4): short-lived tokens are still cached for 3/4 of their life."""
    return min(skew, lifetime / 4)


def cache_window(lifetime: float, skew: float) -> float:
    """How long a token may be handed out after it was issued (the Redis TTL at write time)."""
    return lifetime - effective_skew(lifetime, skew)


def is_fresh(entry: CachedToken, now: float) -> bool:
    return now < entry.fresh_until


def _cacheable(entry: CachedToken, now: float) -> bool:
    """Too short-lived tokens go to the caller that fetched them, and nobody else (spec §4.2)."""
    return entry.expires_at - entry.fetched_at >= MIN_CACHEABLE_LIFETIME and entry.fresh_until > now


class L1Cache:
    """A bounded LRU dict of this worker's copies of L2 entries."""

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[str, CachedToken] = OrderedDict()

    def get(self, key: str) -> CachedToken | None:
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
        return entry

    def put(self, key: str, entry: CachedToken) -> None:
        self._entries[key] = entry
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def drop(self, key: str) -> None:
        self._entries.pop(key, None)

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


class TokenService:
    def __init__(
        self,
        credentials: Mapping[str, CredentialSettings],
        cache: CacheSettings,
        store: Store,
        upstream: UpstreamClient,
        *,
        request_deadline: float,
        clock: Clock | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.credentials = credentials
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
        self._refresh_not_before: dict[str, float] = {}
        self._refreshing: set[str] = set()  # keys whose running flight is a background refresh
        self._refresh_delay: dict[str, float] = {}
        self.refusals = RecentRefusals(store, cache.negative_ttl_seconds, cache.l1_max_entries)

    # -- events -------------------------------------------------------------------------------

    def on_event(self, event: Event) -> None:
        cached = self.l1.get(event.key)
        # "set": another token replaced ours; "drop": ours was invalidated
        if cached is not None and (cached.fingerprint == event.fingerprint) == (event.op == "drop"):
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

    def get_l1(self, credential: str, scope_set: str, min_ttl: float) -> CachedToken | None:
        """A hit from this worker's memory with no I/O at all, or None."""
        if not self._l1_usable():
            return None
        key = token_key(credential, scope_set)
        entry = self.l1.get(key)
        if entry is None:
            return None
        now = self.clock.now()
        if not self._satisfies(entry, now, min_ttl):
            return None
        if now >= entry.refresh_at:
            self._refresh_ahead(credential, scope_set, key, entry)
        return entry

    async def get(
        self, credential: CredentialSettings, scope_set: str, min_ttl: float = 0.0
    ) -> tuple[CachedToken, Source]:
        """A token with time left for (credential, scope set), within the request deadline.

        Raises UpstreamError subclasses when no valid token can be had.
        """
        entry = self.get_l1(credential.name, scope_set, min_ttl)
        if entry is not None:
            return entry, "l1"
        try:
            async with asyncio.timeout(self.request_deadline):
                return await self._get_slow(credential, scope_set, min_ttl)
        except TimeoutError:
            raise UpstreamUnavailable(
                "No token could be obtained within the request deadline.", retry_after=1.0
            ) from None

    async def _get_slow(
        self, credential: CredentialSettings, scope_set: str, min_ttl: float
    ) -> tuple[CachedToken, Source]:
        key = token_key(credential.name, scope_set)
        # A miss joins a fetch already under way in this process before touching Redis
        # (not a background refresh: its failure must stay invisible to callers).
        joined_error: UpstreamError | None = None
        if key not in self._refreshing and self.flights.running(key):
            self.stats.waiters += 1
            try:
                joined = await self.flights.join(key)
            except UpstreamError as exc:
                joined_error = exc  # a still-valid token may yet beat this error (below)
            else:
                if joined is not None:
                    return joined[0], "coalesced"
            finally:
                self.stats.waiters -= 1
        now = self.clock.now()
        try:
            entry = await self.store.get(key)
        except StoreUnavailable:
            entry = self.l1.get(key)
        fallback = entry if entry is not None and is_fresh(entry, now) else None
        if entry is not None and self._satisfies(entry, now, min_ttl):
            if self._l1_usable():
                self.l1.put(key, entry)
            if now >= entry.refresh_at:
                self._refresh_ahead(credential.name, scope_set, key, entry, credential)
            return entry, "l2"
        if joined_error is not None:
            if fallback is not None:
                return fallback, "l2"
            raise joined_error
        self.refusals.raise_if_known_here(credential.name, scope_set)

        def accept(candidate: CachedToken) -> bool:
            return self._satisfies(candidate, self.clock.now(), min_ttl)

        deadline = time.monotonic() + self.request_deadline
        self.stats.waiters += 1
        try:
            (entry, source), led = await self.flights.run(
                key, lambda: self._fetch(credential, scope_set, key, accept, deadline)
            )
        except UpstreamError:
            # A token that is still valid beats an error, even if it has less than min_ttl left.
            if fallback is not None and is_fresh(fallback, self.clock.now()):
                return fallback, "l2"
            raise
        finally:
            self.stats.waiters -= 1
        return entry, (source if led else "coalesced")

    def _satisfies(self, entry: CachedToken, now: float, min_ttl: float) -> bool:
        if not is_fresh(entry, now):
            return False
        return entry.expires_at - now >= min_ttl or now - entry.fetched_at < RECENT_FETCH

    # -- fetching -----------------------------------------------------------------------------

    async def _fetch(
        self,
        credential: CredentialSettings,
        scope_set: str,
        key: str,
        accept: Callable[[CachedToken], bool],
        deadline: float,
    ) -> tuple[CachedToken, Source]:
        async def fetch_and_store() -> CachedToken:
            entry = await self._fetch_upstream(credential, scope_set, deadline)
            return await self._store(key, entry)

        try:
            entry, fetched_here = await self.distributed.run(
                key, lock_key(credential.name, scope_set), accept, fetch_and_store, deadline
            )
        except StoreUnavailable:
            # Redis is down: availability wins, fetch with in-process single-flight only.
            entry, fetched_here = await self._fetch_upstream(credential, scope_set, deadline), True
        if _cacheable(entry, self.clock.now()) and self._l1_usable():
            self.l1.put(key, entry)
        self._refresh_delay.pop(key, None)
        return entry, ("fetched" if fetched_here else "l2")

    async def _fetch_upstream(self, credential: CredentialSettings, scope_set: str, deadline: float) -> CachedToken:
        """One upstream request, unless the authorization server refused this one a moment ago."""
        await self.refusals.raise_if_known(credential.name, scope_set)
        try:
            fetched = await self.upstream.fetch(credential, scope_set, deadline)
        except UpstreamRejected as exc:
            await self.refusals.remember(credential.name, scope_set, exc)
            raise
        return self._entry_from(fetched)

    def _entry_from(self, fetched: FetchedToken) -> CachedToken:
        window = cache_window(fetched.lifetime, self.cache.skew_seconds)
        low, high = self.cache.refresh_at
        return CachedToken(
            access_token=fetched.access_token,
            scope=fetched.scope,
            expires_at=fetched.expires_at,
            fresh_until=fetched.issued_at + window,
            refresh_at=fetched.issued_at + self.rng.uniform(low, high) * window,
            fetched_at=self.clock.now(),
            fingerprint=fingerprint(fetched.access_token),
        )

    async def _store(self, key: str, entry: CachedToken) -> CachedToken:
        """Share the token through Redis → the token to use from now on.

        If Redis already holds a token that expires later (our lock expired while we fetched and
        someone else was faster), that one wins here too. If Redis fails now, ours is still good.
        """
        now = self.clock.now()
        if not _cacheable(entry, now):
            return entry
        try:
            if await self.store.put(key, entry, entry.fresh_until - now):
                return entry
            newer = await self.store.get(key)
        except StoreUnavailable:
            return entry
        return newer if newer is not None and is_fresh(newer, self.clock.now()) else entry

    # -- refresh-ahead ----------------------------------------------------------------------------

    def _refresh_ahead(
        self,
        credential_name: str,
        scope_set: str,
        key: str,
        current: CachedToken,
        credential: CredentialSettings | None = None,
    ) -> None:
        if self.flights.running(key):
            return
        now = time.monotonic()
        if now < self._refresh_not_before.get(key, 0.0):
            return
        credential = credential or self.credentials.get(credential_name)
        if credential is None:
            return

        def accept(candidate: CachedToken) -> bool:
            # Someone else already refreshed: their token is newer than the one we saw.
            return candidate.fingerprint != current.fingerprint and is_fresh(candidate, self.clock.now())

        deadline = now + self.request_deadline
        task = self.flights.start(key, lambda: self._fetch(credential, scope_set, key, accept, deadline))
        if task is not None:
            self._refreshing.add(key)
            task.add_done_callback(lambda t: self._refresh_done(key, credential_name, t))

    def _refresh_done(self, key: str, credential_name: str, task: asyncio.Task[tuple[CachedToken, Source]]) -> None:
        self._refreshing.discard(key)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is None:
            self._refresh_not_before.pop(key, None)
            return
        delay = min(self._refresh_delay.get(key, _REFRESH_RETRY_FIRST / 2) * 2, _REFRESH_RETRY_MAX)
        self._refresh_delay[key] = delay
        self._refresh_not_before[key] = time.monotonic() + delay
        reason = exc.description if isinstance(exc, UpstreamError) else type(exc).__name__
        log.warning("tokens.refresh_failed", credential=credential_name, retry_in=delay, reason=reason)

    # -- invalidation -----------------------------------------------------------------------------

    async def invalidate(self, credential: CredentialSettings, scope_set: str, access_token: str) -> bool:
        """Drop the cached token only if it is the one reported; then refresh it in the background."""
        key = token_key(credential.name, scope_set)
        fp = fingerprint(access_token)
        cached = self.l1.get(key)
        if cached is not None and cached.fingerprint == fp:
            self.l1.drop(key)
        try:
            dropped = await self.store.drop_if(key, fp)
        except StoreUnavailable:
            # The local copy is gone already; the shared one expires on its own or is replaced by
            # the next report once Redis answers. The caller's answer is the same either way.
            return False
        if dropped:
            dropped_entry = CachedToken(
                access_token="",
                scope="",
                expires_at=0.0,
                fresh_until=0.0,
                refresh_at=0.0,
                fetched_at=0.0,
                fingerprint=fp,
            )
            self._refresh_not_before.pop(key, None)
            self._refresh_ahead(credential.name, scope_set, key, dropped_entry, credential)
        return dropped
