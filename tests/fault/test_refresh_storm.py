"""Refresh-ahead must not turn into a storm when a refresh brings nothing newer (spec §4.6).

A refresh whose token cannot replace the cached one (the authorization server re-issued its own
cached token with less time left, or lowered lifetimes, or answered a token too short-lived to
cache) leaves the cached entry past its refresh point: if that counted as success, every hit
would start another upstream fetch, on every worker of every replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.conftest import StartBrokers
from tests.fault.conftest import get_token
from tests.integration.workers import pin_workers
from tests.support import AuthServerProcess, BrokerProcess

pytestmark = pytest.mark.slow

LIFETIME = 30  # effective skew min(30, 30/4) = 7.5 s: cached for 22.5 s after it was issued
# refresh-ahead due 2.25-3.375 s after the token was issued
EARLY_REFRESH = {"BROKER_CACHE_REFRESH_AT": "0.1,0.15"}
PAST_REFRESH_POINT = 3.4
HITS_FOR = 2.0
HIT_INTERVAL = 0.01  # ~100 hits a second, spread over both workers
MAX_UPSTREAM = 6  # a handful: a few refresh attempts (or backoff retries) per worker, not one per hit


async def hits_past_the_refresh_point(
    clients: list[httpx.AsyncClient], authserver: AuthServerProcess, issued: float
) -> tuple[int, int]:
    """~100 hits a second for HITS_FOR seconds once the refresh point has passed →
    (hits, upstream token requests meanwhile). Every hit gets a token."""
    await asyncio.sleep(max(0.0, issued + PAST_REFRESH_POINT - time.monotonic()))
    before = authserver.token_requests()
    hits = 0
    end = time.monotonic() + HITS_FOR
    for client in itertools.cycle(clients):
        if time.monotonic() >= end:
            break
        response = await get_token(client)
        assert response.status_code == 200, response.text
        assert response.json()["expires_in"] > 0
        hits += 1
        await asyncio.sleep(HIT_INTERVAL)
    await asyncio.sleep(0.3)  # a refresh the last hits started is counted too
    return hits, authserver.token_requests() - before


async def pinned_workers(broker: BrokerProcess, stack: contextlib.AsyncExitStack) -> dict[int, httpx.AsyncClient]:
    """pin_workers, given a moment for a worker that is still starting (it accepts nothing yet)."""
    for _ in range(10):
        with contextlib.suppress(AssertionError):
            return await pin_workers(broker, stack)
        await asyncio.sleep(0.2)
    return await pin_workers(broker, stack)


async def storm(
    write_config: Callable[..., Path],
    authserver: AuthServerProcess,
    start_brokers: StartBrokers,
    after_warm: dict[str, object] | None = None,
) -> tuple[int, int]:
    (broker,) = start_brokers(write_config(), workers=2, env=EARLY_REFRESH)
    async with contextlib.AsyncExitStack() as stack:
        clients = list((await pinned_workers(broker, stack)).values())
        warm = [await get_token(client) for client in clients]  # one fetch, then both workers hold it
        issued = time.monotonic()  # the token is at least this old from here on
        assert {response.status_code for response in warm} == {200}
        assert authserver.token_requests() == 1
        if after_warm:
            authserver.configure(**after_warm)
        return await hits_past_the_refresh_point(clients, authserver, issued)


async def test_a_reissued_token_with_less_time_left_does_not_make_every_hit_refresh(
    write_config: Callable[..., Path], authserver: AuthServerProcess, start_brokers: StartBrokers
) -> None:
    """Defect (hardening item 2): an authorization server that re-issues its own cached token
    (same access_token, `expires_in` = whole seconds left) answers a refresh with an expiry no
    later than the stored one; the expiry-ordered write refused it, `_refresh_done` counted the
    old entry as success and cleared the backoff, and every following hit fetched upstream."""
    authserver.configure(lifetime=LIFETIME, reissue=True)
    hits, upstream = await storm(write_config, authserver, start_brokers)
    assert hits >= 30, f"only {hits} hits in {HITS_FOR} s: too few to tell a storm"
    assert 1 <= upstream <= MAX_UPSTREAM, f"{upstream} upstream requests for {hits} hits past the refresh point"


async def test_lowered_lifetimes_do_not_make_every_hit_refresh(
    write_config: Callable[..., Path], authserver: AuthServerProcess, start_brokers: StartBrokers
) -> None:
    """Defect (hardening item 2): when the authorization server lowers token lifetimes, the
    refreshed token expires before the stored one; the expiry-ordered write refused it and the
    refresh counted as success, so every following hit started another upstream fetch."""
    authserver.configure(lifetime=LIFETIME)
    # refreshed tokens live 20 s: cached for 15 s, their own refresh point 1.5-2.25 s later
    hits, upstream = await storm(write_config, authserver, start_brokers, after_warm={"lifetime": 20})
    assert hits >= 30, f"only {hits} hits in {HITS_FOR} s: too few to tell a storm"
    assert 1 <= upstream <= MAX_UPSTREAM, f"{upstream} upstream requests for {hits} hits past the refresh point"


async def test_a_refresh_too_short_lived_to_cache_backs_off(
    write_config: Callable[..., Path], authserver: AuthServerProcess, start_brokers: StartBrokers
) -> None:
    """Defect (hardening item 2): a refresh answered with a token too short-lived to cache (< 2 s)
    returned that token, uncached, as success: the backoff was cleared, the cached entry stayed
    past its refresh point, and every following hit fetched again. Now it backs off (1 s, 2 s …)."""
    authserver.configure(lifetime=LIFETIME)
    hits, upstream = await storm(write_config, authserver, start_brokers, after_warm={"lifetime": 1})
    assert hits >= 30, f"only {hits} hits in {HITS_FOR} s: too few to tell a storm"
    # per worker: the first attempt at the refresh point, one retry after 1 s (the next after 2 s more)
    assert 1 <= upstream <= MAX_UPSTREAM, f"{upstream} upstream requests for {hits} hits past the refresh point"
