"""Hardening items 9, 12, 13 and 16 at the Store / TokenService level, on the session's real Redis
and the real test authorization server (spec §4.3, §4.4).

A TokenService here is assembled as the app's lifespan assembles it (broker/api/app.py): Store,
UpstreamClient over a real HTTP client, the real EventSubscriber on the events channel.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis

from broker.entries import CachedToken, fingerprint
from broker.errors import StoreBusy
from broker.events import EventSubscriber
from broker.redis_client import connect
from broker.settings import Settings
from broker.store import Store, TokenKeys
from broker.tokens import TokenService
from broker.upstream.client import UpstreamClient
from broker.upstream.exchange import new_http_client
from tests.conftest import READ
from tests.support import AuthServerProcess

SHAPE = "shape"


def entry(name: str, fence: int, lifetime: float = 3600, age: float = 0.0) -> CachedToken:
    """A token fetched `age` seconds ago, written under `fence`."""
    fetched = time.monotonic() - age
    return CachedToken(
        access_token=name,
        scope=READ,
        expires_at=time.time() - age + lifetime,
        expires=fetched + lifetime,
        fresh_until=fetched + lifetime - 30,
        refresh_at=fetched + lifetime / 2,
        fetched_at=fetched,
        fingerprint=fingerprint(name),
        fence=fence,
    )


@pytest.fixture
async def store(redis_url: str) -> AsyncIterator[Store]:
    client = connect(redis_url)
    yield Store(client)
    await client.aclose()


@contextlib.asynccontextmanager
async def service(
    settings: Settings,
    redis_url: str,
    store_type: Callable[[aioredis.Redis], Store] = Store,
    *,
    max_connections: int = 256,
    subscribe: bool = True,
) -> AsyncIterator[TokenService]:
    """A TokenService as one broker worker has it; its events subscription on a client of its own
    (so a small command pool is only the commands')."""
    commands = connect(redis_url, max_connections=max_connections)
    events = connect(redis_url)
    http = new_http_client(settings.upstream)
    store = store_type(commands)
    upstream = UpstreamClient(http, settings.upstream, default_expires_in=settings.cache.default_expires_in)
    tokens = TokenService(settings.cache, store, upstream, request_deadline=settings.server.request_deadline_seconds)
    subscriber = EventSubscriber(events, store.keys.events, tokens.on_event, tokens.on_subscription)
    if subscribe:
        subscriber.start()
        assert await subscriber.wait_live(5)
    try:
        yield tokens
    finally:
        await subscriber.stop()
        await tokens.flights.cancel_all()
        await http.aclose()
        await commands.aclose()
        await events.aclose()


# -- item 9: a read that raced a drop is not put into L1 ------------------------------------------


class HeldRead(Store):
    """A Store whose next token read, once it has its answer from Redis, waits for `gate`."""

    def __init__(self, redis: aioredis.Redis) -> None:
        super().__init__(redis)
        self.read_done = asyncio.Event()  # (not `answered`: a Store method)
        self.gate: asyncio.Event | None = None

    async def get(self, keys: TokenKeys) -> CachedToken | None:
        found = await super().get(keys)
        gate, self.gate = self.gate, None
        if gate is not None:
            self.read_done.set()
            await gate.wait()
        return found


async def test_a_read_that_raced_an_invalidation_is_not_served_again_from_l1(
    settings: Settings, redis_url: str, authserver: AuthServerProcess
) -> None:
    """Defect (hardening item 9): a value read from Redis was put into L1 after a "drop" event
    for that key had arrived meanwhile, so the token just reported as rejected was served again
    from L1 until it expired. The L1 put is now checked against the events since the read began.

    Worker S reads the token from Redis; before its answer is used, worker B drops the token
    (a caller reported it) and writes the replacement, and S receives both events. Then S's read
    completes: its caller may get the token it read, but S's next request must not."""
    credential = settings.credentials["payments"]
    async with (
        service(settings, redis_url, HeldRead) as s,
        service(settings, redis_url) as b,
    ):
        held = s.store
        assert isinstance(held, HeldRead)
        reported, _ = await b.get(credential, READ)
        held.gate = release = asyncio.Event()
        reading = asyncio.create_task(s.get(credential, READ))
        await asyncio.wait_for(held.read_done.wait(), 10)  # S has the token from Redis, not yet in L1
        events_seen = s.l1.mark()
        assert await b.invalidate(credential, READ, reported.access_token) == "dropped"
        while b.flights.running(b.keys_for(credential, READ).token):  # B's refresh writes the replacement
            await asyncio.sleep(0.01)
        while s.l1.mark() < events_seen + 2:  # S has seen the drop and the write
            await asyncio.sleep(0.01)
        release.set()
        first, _ = await asyncio.wait_for(reading, 10)
        assert first.fingerprint == reported.fingerprint  # read before the report: fine to hand out once
        after, source = await s.get(credential, READ)
        replacement, _ = await b.get(credential, READ)
    assert after.fingerprint != reported.fingerprint, f"the reported token came back from {source}"
    assert after.fingerprint == replacement.fingerprint
    assert authserver.token_requests() == 2


# -- item 15: a slow read does not stretch a copy's window ---------------------------------------


class SlowRead(Store):
    """A Store whose token reads come back `delay` seconds after Redis answered them (a reply
    that waited for a free connection or crossed a slow network: up to POOL_TIMEOUT + twice the
    socket timeouts without counting as an outage)."""

    delay = 0.0

    async def get(self, keys: TokenKeys) -> CachedToken | None:
        found = await super().get(keys)
        await asyncio.sleep(self.delay)
        return found


async def test_a_read_that_took_seconds_does_not_hand_out_a_token_past_its_window(
    settings: Settings, redis_url: str, authserver: AuthServerProcess
) -> None:
    """Defect (hardening item 15): `now` was taken before an L2 read that can take seconds, and
    the copy judged by it: a token whose cached window ended while the read was on its way was
    handed out with less life left than the skew promises. A copy read from Redis is now bounded
    by the key's PTTL counted from when the read was sent, and judged when it is back."""
    credential = settings.credentials["payments"]
    authserver.configure(lifetime=8)  # cached window 6 s: skew min(30, 8/4) = 2 s
    async with service(settings, redis_url, SlowRead) as s, service(settings, redis_url) as b:
        first, _ = await b.get(credential, READ)
        keys = b.keys_for(credential, READ)
        while await b.store.redis.pttl(keys.token) > 1500:
            await asyncio.sleep(0.02)
        slow = s.store
        assert isinstance(slow, SlowRead)
        slow.delay = 2.0
        got, source = await s.get(credential, READ)
        left = got.expires - time.monotonic()
    assert got.fingerprint != first.fingerprint, f"handed out from {source} with {left:.1f} s left"
    assert left >= 2
    assert authserver.token_requests() == 2


# -- item 12: a drop leaves a tombstone ----------------------------------------------------------


async def test_a_stale_holders_write_after_a_drop_is_refused(store: Store) -> None:
    """Defect (hardening item 12): a drop deleted the key, and with it what ordered writes, so a
    holder that had stalled past its lock could write its older token right after an
    invalidation, and the invalidation's refresh adopted it. The drop now leaves a tombstone that
    keeps the dropped token's fence (for as long as that token would have been cached)."""
    keys = store.keys.for_token("payments", SHAPE, READ)
    stalled = await store.acquire_lock(keys, "a" * 32, 5)
    assert stalled is not None
    await store.redis.delete(keys.lock)  # A stalls past its lock's TTL
    later = await store.acquire_lock(keys, "b" * 32, 5)
    assert later is not None
    assert later.fence > stalled.fence
    b_token = entry("b-token", later.fence, lifetime=1800)
    assert await store.put(keys, b_token)
    await store.release_lock(later)

    assert await store.drop_if(keys, b_token.access_token, 0) == later.fence  # a caller reported it
    assert await store.get(keys) is None  # the tombstone reads as a miss
    tombstone_ttl = await store.redis.pttl(keys.token)
    assert 0 < tombstone_ttl <= (1800 - 30) * 1000  # no longer than B's token would have been cached

    # A comes back with its token (one that even expires later than B's): refused
    assert await store.put(keys, entry("a-token", stalled.fence)) is False
    assert await store.get(keys) is None

    # the invalidation's refresh: the next lock's fence is above the tombstone's, its write lands
    refresh = await store.acquire_lock(keys, "c" * 32, 5)
    assert refresh is not None
    assert refresh.fence > later.fence
    assert await store.put(keys, entry("c-token", refresh.fence))
    current = await store.get(keys)
    assert current is not None
    assert current.access_token == "c-token"


# -- item 13: a report loop cannot drive fetches -------------------------------------------------


async def test_a_young_token_is_not_dropped_twice_within_the_interval(store: Store) -> None:
    """Defect (hardening item 13): an invalidation had no minimum token age, so a get-then-report
    loop dropped (and refetched) the token as fast as it could ask. Within
    `invalidate_min_interval_seconds` of a drop, a token younger than that interval is not dropped
    (-1: throttled); a token older than it is dropped whatever the last drop was."""
    keys = store.keys.for_token("payments", SHAPE, READ)
    first = entry("first", 1)
    assert await store.put(keys, first)
    assert await store.drop_if(keys, first.access_token, 2.0) == 1

    young = entry("young", 2)  # the refresh's token, a moment after the drop
    assert await store.put(keys, young)
    assert await store.drop_if(keys, young.access_token, 2.0) == -1
    current = await store.get(keys)
    assert current is not None
    assert current.fingerprint == young.fingerprint  # still served

    old = entry("old", 3, age=5.0)  # fetched 5 s ago (a slow answer), written just now
    assert await store.put(keys, old)
    assert await store.drop_if(keys, old.access_token, 2.0) == 3
    assert await store.get(keys) is None

    # without an interval nothing is throttled
    again = entry("again", 4)
    assert await store.put(keys, again)
    assert await store.drop_if(keys, again.access_token, 0) == 4


# -- item 16: a full pool is load, not an outage -------------------------------------------------


async def test_a_full_pool_raises_store_busy_and_redis_stays_reachable(redis_url: str) -> None:
    """Defect (hardening item 16): a full connection pool raised what an outage raises: the Store
    marked Redis unreachable and failed every call fast for a second (no I/O at all), though
    Redis was answering. It raises StoreBusy now and changes nothing else."""
    client = connect(redis_url, max_connections=1)
    store = Store(client)
    keys = store.keys.for_token("payments", SHAPE, READ)
    held = await client.connection_pool.get_connection()
    try:
        with pytest.raises(StoreBusy):
            await store.get(keys)
        assert store.reachable
        with pytest.raises(StoreBusy):
            await store.acquire_lock(keys, "a" * 32, 5)
        assert store.reachable
    finally:
        await client.connection_pool.release(held)
    try:
        assert await store.get(keys) is None  # at once: no fail-fast window was opened
        assert await store.acquire_lock(keys, "a" * 32, 5) is not None
    finally:
        await client.aclose()


@contextlib.asynccontextmanager
async def held_pool(tokens: TokenService) -> AsyncIterator[None]:
    pool: Any = tokens.store.redis.connection_pool
    connection = await pool.get_connection()
    try:
        yield
    finally:
        await pool.release(connection)


async def test_a_full_pool_never_fetches_without_the_lock(
    settings: Settings, redis_url: str, authserver: AuthServerProcess
) -> None:
    """Defect (hardening item 16): with the pool full, the Store said "Redis is down" and the token
    service fetched without the lock (one upstream request per worker and request burst). Now a
    miss raises StoreBusy and nothing is fetched; once a connection is free, one fetch serves all."""
    credential = settings.credentials["payments"]
    async with service(settings, redis_url, max_connections=1) as tokens:
        async with held_pool(tokens):
            results = await asyncio.gather(*(tokens.get(credential, READ) for _ in range(5)), return_exceptions=True)
            assert tokens.store.reachable
        assert all(isinstance(result, StoreBusy) for result in results), results
        assert authserver.token_requests() == 0
        got = await asyncio.gather(*(tokens.get(credential, READ) for _ in range(5)))
    assert len({token.fingerprint for token, _ in got}) == 1
    assert authserver.token_requests() == 1


async def test_a_full_pool_does_not_serve_l1_without_the_subscription(
    settings: Settings, redis_url: str, authserver: AuthServerProcess
) -> None:
    """Defect (hardening item 16): a full pool counted as an outage, and during an outage L1 is
    served without the events subscription (availability first). Redis answering but busy is
    not an outage: a copy that no subscription keeps current is not served."""
    credential = settings.credentials["payments"]
    async with service(settings, redis_url, max_connections=1, subscribe=False) as tokens:
        keys = tokens.keys_for(credential, READ)
        tokens.l1.put(keys.token, entry("kept-by-nobody", 1))  # a copy from before the subscription went
        async with held_pool(tokens):
            with pytest.raises(StoreBusy):
                await tokens.get(credential, READ)
            assert tokens.store.reachable
    assert authserver.token_requests() == 0


# -- a user's grant record edited in Redis ---------------------------------------------------------


@pytest.mark.parametrize(
    "edited",
    [b"garbage", b"g1|x|body", b"g1|7", b"g1|7|not-json", b"g1|7|p|[1, 2]", b"g2|7|p|{}", b"\xff\xfe|1|x"],
)
async def test_a_grant_record_edited_in_redis_reads_as_none_and_the_next_login_replaces_it(
    store: Store, redis_url: str, edited: bytes
) -> None:
    """Defect: a grant record that was not `g1|<digits>|<sealed JSON object>` raised from
    get_grant (ValueError from the split, int() or json.loads), a 500 on the user's token request
    and on their next login, which could then never replace it. Now it reads as no grant (the
    user must log in again) and the login's write succeeds."""
    keys = store.keys.for_token("users", SHAPE, "openid", subject="alice")
    raw = connect(redis_url)
    try:
        await raw.set(keys.grant, edited, px=60_000)
        version, record = await store.get_grant(keys)
        assert record is None
        assert await store.put_grant(keys, version, {"sub": "alice", "status": "active"}, 60) == 1
        assert (await store.get_grant(keys))[1] == {"sub": "alice", "status": "active"}
    finally:
        await raw.delete(keys.grant)
        await raw.aclose()
