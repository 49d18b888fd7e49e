"""When a token may be handed out: its cached window, freshness, `min_ttl`, and the request's
deadline (spec §3.1, §4.2). Pure functions over cache entries and this process's clock."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from typing import TypeVar

from broker.entries import CachedToken
from broker.errors import UpstreamUnavailable

__all__ = [
    "MIN_CACHEABLE_LIFETIME",
    "MIN_TTL_SHARE",
    "RECENT_FETCH",
    "cache_window",
    "cacheable",
    "effective_skew",
    "is_fresh",
    "satisfies",
    "within",
]

T = TypeVar("T")

MIN_CACHEABLE_LIFETIME = 2.0
RECENT_FETCH = 1.0  # a token this young satisfies any min_ttl (spec §3.1)
MIN_TTL_SHARE = 0.5  # min_ttl asks for at most this share of a token's lifetime: ≤ 2 fetches per lifetime


def effective_skew(lifetime: float, skew: float) -> float:
    """min(skew, lifetime/4): short-lived tokens are still cached for 3/4 of their life."""
    return min(skew, lifetime / 4)


def cache_window(lifetime: float, skew: float) -> float:
    """How long a token may be handed out after it was issued (the Redis TTL at write time)."""
    return lifetime - effective_skew(lifetime, skew)


def is_fresh(entry: CachedToken, now: float) -> bool:
    return now < entry.fresh_until


def satisfies(entry: CachedToken, now: float, min_ttl: float) -> bool:
    """Fresh, with `min_ttl` left (at most half its lifetime's worth), or fetched a moment ago.

    The cap keeps any caller from making the broker fetch more than twice per token lifetime:
    a `min_ttl` near or beyond the lifetime would otherwise refetch every second (README).
    """
    if not is_fresh(entry, now):
        return False
    wanted = min(min_ttl, entry.lifetime * MIN_TTL_SHARE)
    return entry.expires - now >= wanted or now - entry.fetched_at < RECENT_FETCH


def cacheable(entry: CachedToken, now: float) -> bool:
    """Too short-lived tokens go to the caller that fetched them, and nobody else (spec §4.2)."""
    return entry.lifetime >= MIN_CACHEABLE_LIFETIME and entry.fresh_until > now


def _loop_time(deadline: float) -> float:
    """asyncio.timeout_at takes loop time; convert from time.monotonic()."""
    return asyncio.get_running_loop().time() + (deadline - time.monotonic())


async def within(deadline: float, awaitable: Awaitable[T]) -> T:
    try:
        async with asyncio.timeout_at(_loop_time(deadline)):
            return await awaitable
    except TimeoutError:
        raise UpstreamUnavailable("No token could be obtained within the request deadline.", retry_after=1.0) from None
