"""Refresh-ahead (spec §4.5): a token past its refresh point is fetched again in the background,
one flight per key, while the cached one is still served.

A refresh that fails, or brings nothing the cache can serve in the old one's place (too
short-lived to cache, or itself already past its refresh point), backs off: 1 s, doubling up to
30 s. Counting such a refresh as a success would make every following hit start another upstream
fetch (the refresh-ahead storm of the hardening issue). The bookkeeping is bounded like L1.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

import structlog

from broker.clock import Clock
from broker.entries import CachedToken
from broker.errors import BrokerError
from broker.freshness import cacheable, is_fresh
from broker.singleflight import LocalFlight

__all__ = ["RefreshAhead"]

log = structlog.get_logger("broker.tokens")

S = TypeVar("S")  # what the token service tells of where a token came from
Accept = Callable[[CachedToken], bool]

_RETRY_FIRST = 1.0
_RETRY_MAX = 30.0


class RefreshAhead(Generic[S]):
    """Background refreshes through the token service's own local flights."""

    def __init__(
        self, flights: LocalFlight[tuple[CachedToken, S]], clock: Clock, request_deadline: float, max_entries: int
    ) -> None:
        self.flights = flights
        self.clock = clock
        self.request_deadline = request_deadline
        self.max_entries = max_entries
        self.running: set[str] = set()  # keys whose running flight is a background refresh
        self._backoff: dict[str, tuple[float, float]] = {}  # key → (no refresh before, last delay)

    def start(
        self,
        key: str,
        credential_name: str,
        current: CachedToken,
        fetch: Callable[[Accept, float], Awaitable[tuple[CachedToken, S]]],
    ) -> None:
        """Refresh `current` with `fetch(accept, deadline)` unless a flight for `key` is under way
        or a failed refresh is being backed off from."""
        if self.flights.running(key):
            return
        now = time.monotonic()
        backoff = self._backoff.get(key)
        if backoff is not None and now < backoff[0]:
            return

        def accept(candidate: CachedToken) -> bool:
            # Someone else already refreshed: theirs was written under a later lock than ours.
            return candidate.fence > current.fence and is_fresh(candidate, self.clock.monotonic())

        deadline = now + self.request_deadline
        task = self.flights.start(key, lambda: fetch(accept, deadline))
        if task is not None:
            self.running.add(key)
            task.add_done_callback(lambda t: self._done(key, credential_name, t))

    def reset(self, key: str) -> None:
        """Refresh `key` at the next chance (its token was just dropped)."""
        self._backoff.pop(key, None)

    def __len__(self) -> int:
        return len(self._backoff)

    def _done(self, key: str, credential_name: str, task: asyncio.Task[tuple[CachedToken, S]]) -> None:
        self.running.discard(key)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is None:
            entry, _ = task.result()
            now = self.clock.monotonic()
            if cacheable(entry, now) and entry.refresh_at > now:
                self._backoff.pop(key, None)
                return
            # Nothing newer to serve (too short-lived to cache, or still past its refresh point):
            # not a success, or every hit would start another fetch.
            reason = "the refreshed token cannot replace the cached one"
        else:
            reason = exc.description if isinstance(exc, BrokerError) else type(exc).__name__
        previous = self._backoff.pop(key, None)
        delay = min((previous[1] if previous else _RETRY_FIRST / 2) * 2, _RETRY_MAX)
        while len(self._backoff) >= self.max_entries:
            del self._backoff[next(iter(self._backoff))]
        self._backoff[key] = (time.monotonic() + delay, delay)
        log.warning("tokens.refresh_failed", credential=credential_name, retry_in=delay, reason=reason)
