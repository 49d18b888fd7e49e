"""The negative cache: an authorization server's refusal, remembered briefly (spec §4.7).

A misconfigured credential must not be hammered: a refusal (`upstream_rejected`) is kept per
(credential, scope set) for `[cache] negative_ttl_seconds`, in this worker and in Redis so every
worker and replica answers from it.
"""

from __future__ import annotations

import contextlib
import time

from broker.errors import StoreUnavailable, UpstreamRejected
from broker.store import Rejection, Store, rejection_key

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

    def raise_if_known_here(self, credential: str, scope_set: str) -> None:
        """Raise the refusal this worker remembers, without any I/O."""
        key = rejection_key(credential, scope_set)
        remembered = self._local.get(key)
        if remembered is not None:
            rejection, until = remembered
            if time.monotonic() < until:
                raise _error(rejection)
            del self._local[key]

    async def raise_if_known(self, credential: str, scope_set: str) -> None:
        """Raise the refusal this worker or any other remembers."""
        self.raise_if_known_here(credential, scope_set)
        try:
            rejection = await self.store.get_rejection(rejection_key(credential, scope_set))
        except StoreUnavailable:
            return
        if rejection is not None:
            raise _error(rejection)

    async def remember(self, credential: str, scope_set: str, exc: UpstreamRejected) -> None:
        if self.ttl <= 0:
            return
        key = rejection_key(credential, scope_set)
        rejection = Rejection(exc.description, exc.upstream_error, exc.upstream_status)
        if len(self._local) >= self.max_entries:
            self._local.clear()
        self._local[key] = (rejection, time.monotonic() + self.ttl)
        with contextlib.suppress(StoreUnavailable):
            await self.store.put_rejection(key, rejection, self.ttl)
