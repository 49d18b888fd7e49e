"""Issue 4, point 5: the process holding the distributed fetch lock dies or stalls (spec §4.4).

Two broker processes (one worker each) on one Redis, lock TTL 2 s. A holder killed with SIGKILL
stops renewing its lock: the other process takes over once it expires, its callers get their
token within the deadline, and nothing stays locked. A holder that stalls past its lock's expiry
and then finishes must not overwrite the newer token fetched meanwhile.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import redis

from broker.entries import CachedToken, fingerprint
from broker.redis_client import connect
from broker.store import Store, TokenKeys
from tests.conftest import READ, StartBrokers
from tests.fault.conftest import get_token, keys, until
from tests.support import AuthServerProcess, BrokerProcess, kill_tree, stored_token, token_keys

pytestmark = pytest.mark.slow

LOCK_TTL = 2.0
ENV = {"BROKER_CACHE_LOCK_TTL_SECONDS": str(LOCK_TTL)}
LOCKS = "tb:{payments}:lock:*"


async def hold_the_lock(
    client: httpx.AsyncClient, authserver: AuthServerProcess, redis_url: str, delay: float, keys_of: TokenKeys
) -> asyncio.Task[httpx.Response]:
    """A request whose fetch holds the lock while the authorization server takes `delay` seconds
    to answer it; everything asked after it is answered at once."""
    authserver.configure(delay=delay)
    holder = asyncio.create_task(get_token(client))
    await until(lambda: authserver.token_requests() == 1, 5, "the holder's upstream request")
    authserver.configure(delay=0)  # read per request: the one in flight keeps its delay
    assert keys(redis_url, LOCKS) == [keys_of.lock]
    return holder


async def test_a_killed_lock_holder_holds_others_up_only_until_its_lock_expires(
    write_config: Callable[..., Path], redis_url: str, authserver: AuthServerProcess, start_brokers: StartBrokers
) -> None:
    config = write_config()
    read_keys = token_keys(config, "payments", READ)
    a, b = start_brokers(config, count=2, workers=1, env=ENV)
    async with (
        httpx.AsyncClient(base_url=a.url, timeout=15, trust_env=False) as to_a,
        httpx.AsyncClient(base_url=b.url, timeout=15, trust_env=False) as to_b,
    ):
        holder = await hold_the_lock(to_a, authserver, redis_url, delay=4, keys_of=read_keys)
        kill_tree(a, signal.SIGKILL)
        killed = time.monotonic()
        with pytest.raises(httpx.TransportError):
            await holder

        async def timed() -> tuple[float, httpx.Response]:
            response = await get_token(to_b)
            return time.monotonic() - killed, response

        results = await asyncio.gather(*(timed() for _ in range(10)))
    tokens = set()
    for waited, response in results:
        assert response.status_code == 200, response.text
        tokens.add(response.json()["access_token"])
        # the lock was renewed at most LOCK_TTL/3 before the kill; then a poll interval and a fetch
        assert waited < LOCK_TTL + 1.5, f"waited {waited:.2f} s for a dead holder's lock"
    assert len(tokens) == 1
    assert authserver.token_requests() == 2  # the dead holder's, then one for all of B's callers
    assert keys(redis_url, LOCKS) == []  # nothing locked forever
    with redis.Redis.from_url(redis_url) as client:
        assert 0 < client.pttl(read_keys.token) <= 3600 * 1000


async def stall_holder_past_its_lock(
    to_a: httpx.AsyncClient,
    to_b: httpx.AsyncClient,
    a: BrokerProcess,
    authserver: AuthServerProcess,
    redis_url: str,
    keys_of: TokenKeys,
) -> tuple[str, str]:
    """A takes the lock and is stopped (SIGSTOP) while its upstream request is out; its lock
    expires, B fetches a token, then A continues and finishes its fetch. → (token A's caller got,
    B's token)."""
    holder = await hold_the_lock(to_a, authserver, redis_url, delay=2, keys_of=keys_of)
    kill_tree(a, signal.SIGSTOP)  # A stops renewing its lock; its upstream answer will wait
    try:
        newer = await get_token(to_b)  # B takes over once A's lock has expired
        assert newer.status_code == 200, newer.text
    finally:
        kill_tree(a, signal.SIGCONT)
    late = await holder
    assert late.status_code == 200, late.text
    # A fetched a second token, but its write was refused (B's lock came later): A's caller gets
    # the token Redis holds, the same one everybody else gets.
    assert authserver.token_requests() == 2
    assert late.json()["access_token"] == newer.json()["access_token"]
    return late.json()["access_token"], newer.json()["access_token"]


async def test_a_stalled_holder_finishing_late_does_not_replace_the_newer_token(
    write_config: Callable[..., Path], redis_url: str, authserver: AuthServerProcess, start_brokers: StartBrokers
) -> None:
    config = write_config()
    read_keys = token_keys(config, "payments", READ)
    a, b = start_brokers(config, count=2, workers=1, env=ENV)
    async with (
        httpx.AsyncClient(base_url=a.url, timeout=15, trust_env=False) as to_a,
        httpx.AsyncClient(base_url=b.url, timeout=15, trust_env=False) as to_b,
    ):
        _, newer = await stall_holder_past_its_lock(to_a, to_b, a, authserver, redis_url, read_keys)
        stored = stored_token(redis_url, read_keys)
        assert stored is not None
        assert stored.access_token == newer, "the late, older token replaced the newer one"
        assert keys(redis_url, LOCKS) == []
        assert (await get_token(to_b)).json()["access_token"] == newer


async def test_after_a_refused_late_write_the_stalled_holder_serves_the_newer_token(
    write_config: Callable[..., Path], redis_url: str, authserver: AuthServerProcess, start_brokers: StartBrokers
) -> None:
    config = write_config()
    read_keys = token_keys(config, "payments", READ)
    a, b = start_brokers(config, count=2, workers=1, env=ENV)
    async with (
        httpx.AsyncClient(base_url=a.url, timeout=15, trust_env=False) as to_a,
        httpx.AsyncClient(base_url=b.url, timeout=15, trust_env=False) as to_b,
    ):
        _, newer = await stall_holder_past_its_lock(to_a, to_b, a, authserver, redis_url, read_keys)
        assert (await get_token(to_a)).json()["access_token"] == newer


async def test_store_put_refuses_a_token_written_under_an_earlier_lock(redis_url: str) -> None:
    """Writes are ordered by the fence of the lock they were fetched under, not by any host's
    clock: a late writer holding an older lock cannot replace the token of a later one."""
    client = connect(redis_url)
    store = Store(client)
    keys_of = store.keys.for_token("payments", "shape", READ)
    now = time.monotonic()

    def entry(name: str, lifetime: float, fence: int) -> CachedToken:
        return CachedToken(
            access_token=name,
            scope=READ,
            expires_at=time.time() + lifetime,
            expires=now + lifetime,
            fresh_until=now + lifetime - 30,
            refresh_at=now + lifetime / 2,
            fetched_at=now,
            fingerprint=fingerprint(name),
            fence=fence,
        )

    try:
        first = await store.acquire_lock(keys_of, "a" * 32, 5)
        second = await store.acquire_lock(keys_of, "b" * 32, 5)
        assert first is not None
        assert second is None  # held
        await store.release_lock(first)
        second = await store.acquire_lock(keys_of, "b" * 32, 5)
        assert second is not None
        assert second.fence > first.fence
        newer = entry("newer-token", 3000, second.fence)
        assert await store.put(keys_of, newer) is True
        # the earlier holder finishes late, with a token that even expires later: refused
        assert await store.put(keys_of, entry("older-lock-token", 3600, first.fence)) is False
        current = await store.get(keys_of)
        assert current is not None
        assert current.fingerprint == newer.fingerprint
        ttl = await client.pttl(keys_of.token)
        assert 2900_000 < ttl <= 2970_000  # the refused write did not touch the TTL either
        await store.release_lock(second)
        third = await store.acquire_lock(keys_of, "c" * 32, 5)
        assert third is not None
        assert third.fence > second.fence
        assert await store.put(keys_of, entry("newest-token", 1000, third.fence)) is True
        current = await store.get(keys_of)
        assert current is not None
        assert current.access_token == "newest-token"
    finally:
        await client.aclose()
