"""The negative cache: an authorization server's refusal, remembered briefly (spec §4.7).

A misconfigured credential must not be hammered: a refusal (`upstream_rejected`) is kept per
(credential, scope set) for `[cache] negative_ttl_seconds`, in this worker and in Redis so every
worker and replica answers from it. It is consulted in one place only, right before an upstream
request (under the fetch lock, so a process that waited for the lock sees the refusal its holder
just got), inside the fetch, so it is an upstream error like any other: a still-valid cached token
beats it.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

from broker.entries import Rejection
from broker.errors import StoreBusy, StoreUnavailable, UpstreamRejected
from broker.store import Store, TokenKeys

__all__ = ["RecentRefusals"]


def _error(rejection: Rejection) -> UpstreamRejected:
    return UpstreamRejected(
        rejection.description, upstream_error=rejection.upstream_error, upstream_status=rejection.upstream_status
    )


class RecentRefusals:
    def __init__(self, store: Store, ttl: float, max_entries: int) -> None:
        self.store = store
        self.ttl = ttl
        self.max_entries = max_entries
        self._local: dict[str, tuple[Rejection, float]] = {}  # Redis key → (refusal, monotonic expiry)

    async def check(self, keys: TokenKeys) -> None:
        """Raise the refusal this worker or any other remembers: this worker's first, no I/O."""
        remembered = self._local.get(keys.refusal)
        if remembered is not None:
            rejection, until = remembered
            if time.monotonic() < until:
                raise _error(rejection)
            del self._local[keys.refusal]
        try:
            shared = await self.store.get_rejection(keys)
        except (StoreUnavailable, StoreBusy):
            return
        if shared is not None:
            raise _error(shared)

    def forget(self, predicate: Callable[[str], bool]) -> None:
        """Drop this worker's copies of the refusals whose key `predicate` picks (a changed credential)."""
        for key in [key for key in self._local if predicate(key)]:
            del self._local[key]

    async def remember(self, keys: TokenKeys, exc: UpstreamRejected) -> None:
        if self.ttl <= 0:
            return
        rejection = Rejection(exc.description, exc.upstream_error, exc.upstream_status)
        if len(self._local) >= self.max_entries:
            self._local.clear()
        self._local[keys.refusal] = (rejection, time.monotonic() + self.ttl)
        with contextlib.suppress(StoreUnavailable, StoreBusy):
            await self.store.put_rejection(keys, rejection, self.ttl)
