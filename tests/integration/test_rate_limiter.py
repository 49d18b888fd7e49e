"""One worker's side of a caller's rate limit (broker/ratelimit.py) on a real Redis: units taken
in batches and spent without I/O, batches sized by use and lapsing unspent, one batch in flight per
caller, a refusal remembered until a unit is free, and this worker's own GCRA when Redis cannot
answer (down: StoreUnavailable; no free connection: StoreBusy), never an error of its own."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from broker.clock import FakeClock
from broker.errors import RateLimited
from broker.metrics import Stats
from broker.ratelimit import ALLOWANCE_SECONDS, LOCAL_SECONDS, RateLimiter
from broker.redis_client import connect
from broker.store import Store
from broker.vault.models import CallerSettings, RateLimit
from tests.support import free_port


class CountingStore(Store):
    """The real Store, counting the batches asked for (and their sizes)."""

    def __init__(self, redis: aioredis.Redis) -> None:
        super().__init__(redis)
        self.asked: list[int] = []

    async def take_rate(self, caller: str, per_second: float, burst: int, want: int) -> tuple[int, float]:
        self.asked.append(want)
        return await super().take_rate(caller, per_second, burst, want)


def caller(per_second: float | None, burst: int = 1, name: str = "c") -> CallerSettings:
    limit = RateLimit(per_second, burst) if per_second is not None else None
    return CallerSettings(name=name, key_sha256="0" * 64, rate_limit=limit)


@pytest.fixture
async def store(redis_url: str) -> AsyncIterator[CountingStore]:
    client = connect(redis_url)
    yield CountingStore(client)
    await client.aclose()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def limiter(store: CountingStore, clock: FakeClock) -> RateLimiter:
    return RateLimiter(store, Stats(), clock)


async def outcomes(limiter: RateLimiter, who: CallerSettings, n: int) -> list[int | None]:
    """n concurrent requests: None for admitted, else the Retry-After seconds of the 429."""

    async def one() -> int | None:
        try:
            await limiter.spend(who)
        except RateLimited as exc:
            return int(exc.headers()["Retry-After"])
        return None

    return list(await asyncio.gather(*(one() for _ in range(n))))


async def test_an_unlimited_caller_costs_nothing(limiter: RateLimiter, store: CountingStore) -> None:
    unlimited = caller(None)
    assert limiter.try_spend(unlimited)
    await limiter.spend(unlimited)
    assert store.asked == []


async def test_a_burst_of_concurrent_requests_gets_the_burst_and_429s_with_retry_after(
    limiter: RateLimiter, store: CountingStore
) -> None:
    got = await outcomes(limiter, caller(10, 10), 50)
    assert got.count(None) == 10
    assert [r for r in got if r is not None] == [1] * 40  # 100 ms to the next unit: Retry-After 1
    # below 40/s every unit is taken for the request at hand, and the refusal is remembered:
    # the 40 refused requests asked Redis once between them
    assert store.asked == [1] * 11
    assert limiter.stats.limited == {"c": 40}


async def test_retry_after_is_the_time_until_a_unit_is_free(limiter: RateLimiter) -> None:
    slow = caller(0.1, 1)  # one request per 10 s
    await limiter.spend(slow)
    with pytest.raises(RateLimited) as info:
        await limiter.spend(slow)
    assert info.value.retry_after == 10
    assert "Caller c is over its rate limit of 0.1 token requests per second (burst 1)" in info.value.description


async def test_units_are_taken_in_batches_that_grow_with_use(
    limiter: RateLimiter, store: CountingStore, clock: FakeClock
) -> None:
    busy = caller(1000, 1000)  # batches of at most 50 ms of the rate: 50
    for _ in range(200):
        await limiter.spend(busy)
    assert store.asked == [1, 2, 4, 8, 16, 32, 50, 50, 50]
    # what is in hand is spent without I/O: the fast path's way
    assert limiter.try_spend(busy)
    asked = len(store.asked)
    for _ in range(10):
        assert limiter.try_spend(busy)
    assert len(store.asked) == asked


async def test_units_not_spent_in_time_lapse_and_the_next_batch_is_what_was_used(
    limiter: RateLimiter, store: CountingStore, clock: FakeClock
) -> None:
    busy = caller(1000, 1000)
    for _ in range(1 + 2 + 4 + 8 + 16 + 32 + 1):  # the last batch (50 units): one spent
        await limiter.spend(busy)
    assert store.asked[-1] == 50
    assert limiter.try_spend(busy)  # two spent
    clock.advance(ALLOWANCE_SECONDS)
    assert not limiter.try_spend(busy)  # 48 lapsed: no worker hoards units
    await limiter.spend(busy)
    assert store.asked[-1] == 4  # twice what was spent of the last batch


async def test_a_slow_caller_takes_one_unit_per_request(limiter: RateLimiter, store: CountingStore) -> None:
    slow = caller(10, 10)
    await limiter.spend(slow)
    assert not limiter.try_spend(slow)  # nothing held: the fast path leaves it to the route
    await limiter.spend(slow)
    assert store.asked == [1, 1]


async def test_a_refusal_is_remembered_until_a_unit_is_free(
    limiter: RateLimiter, store: CountingStore, clock: FakeClock
) -> None:
    slow = caller(2, 1)
    await limiter.spend(slow)
    for _ in range(5):
        with pytest.raises(RateLimited):
            await limiter.spend(slow)
    assert store.asked == [1, 1]
    clock.advance(0.5)  # the worker asks again once Redis said a unit would be free
    await asyncio.sleep(0.5)  # ... and Redis's own clock agrees
    await limiter.spend(slow)
    assert store.asked == [1, 1, 1]


async def test_redis_down_means_this_worker_enforces_the_limit_alone(clock: FakeClock) -> None:
    client = connect(f"redis://127.0.0.1:{free_port()}/0")  # nothing listens there
    try:
        store = CountingStore(client)
        limiter = RateLimiter(store, Stats(), clock)
        limited = caller(5, 3)
        got = await outcomes(limiter, limited, 10)
        assert got.count(None) == 3  # the burst
        assert set(got) == {None, 1}  # the rest 429 with Retry-After, never an error of the store
        asked = len(store.asked)
        assert asked >= 1
        # in local mode the fast path decides without I/O, at the caller's rate
        clock.advance(0.2)  # one unit at 5/s
        assert limiter.try_spend(limited)
        assert not limiter.try_spend(limited)
        assert len(store.asked) == asked
        # while the store knows Redis is unreachable, no request waits for a connection attempt
        clock.advance(LOCAL_SECONDS)
        await limiter.spend(limited)
        assert len(store.asked) == asked
        # once the store has word of Redis (its health probe), the limiter asks Redis again
        store.answered()
        await limiter.spend(limited)  # Redis is still down after all: admitted locally again
        assert len(store.asked) == asked + 1
    finally:
        await client.aclose()


async def test_no_free_redis_connection_is_decided_locally_not_answered_503(redis_url: str, clock: FakeClock) -> None:
    client = connect(redis_url, max_connections=1)
    try:
        store = CountingStore(client)
        limiter = RateLimiter(store, Stats(), clock)
        held = await client.connection_pool.get_connection()  # the only connection, in use
        try:
            await limiter.spend(caller(5, 1))  # waits 2 s for a connection: StoreBusy → admitted here
            with pytest.raises(RateLimited):
                await limiter.spend(caller(5, 1))
        finally:
            await client.connection_pool.release(held)
        assert len(store.asked) == 1
    finally:
        await client.aclose()


async def test_a_busy_callers_next_batch_is_taken_ahead_so_no_hit_waits_for_redis(
    limiter: RateLimiter, store: CountingStore, clock: FakeClock
) -> None:
    """Defect: a busy caller's requests all fell to the route every time a batch ran out or
    lapsed (every 100 ms), and waited there together for one Redis round trip: p99 of a limited
    caller's hits 25-35 ms against 4 ms for an unlimited one (make bench, scenario limited).
    Once three quarters of a batch are spent, the next one is taken in the background."""
    busy = caller(1000, 1000)
    for _ in range(1 + 2 + 4 + 8 + 16 + 32):  # the route's way, up to a batch of 32 in hand... spent
        await limiter.spend(busy)
    await limiter.spend(busy)  # a batch of 50 in hand, one spent
    asked = len(store.asked)
    for _ in range(37):  # the fast path's way: three quarters spent
        assert limiter.try_spend(busy)
    for _ in range(100):  # the next batch arrives in the background
        if len(store.asked) > asked and limiter._budgets["c"].ahead is None:
            break
        await asyncio.sleep(0.01)
    assert store.asked[asked:] == [50]
    for _ in range(12 + 38):  # the rest of the batch in hand, then three quarters of the one taken ahead
        assert limiter.try_spend(busy)
    await asyncio.sleep(0.2)
    assert store.asked[asked:] == [50, 50]  # ... which took the one after it ahead in turn


async def test_a_batch_taken_ahead_lapses_in_its_own_time(
    limiter: RateLimiter, store: CountingStore, clock: FakeClock
) -> None:
    busy = caller(1000, 1000)
    for _ in range(1 + 2 + 4 + 8 + 16 + 32 + 1):
        await limiter.spend(busy)
    for _ in range(37):
        assert limiter.try_spend(busy)
    while limiter._budgets["c"].ahead is not None or limiter._budgets["c"].next_units == 0:
        await asyncio.sleep(0.01)
    clock.advance(ALLOWANCE_SECONDS)  # both the batch in hand and the one taken ahead lapse unspent
    assert not limiter.try_spend(busy)


async def test_a_slow_caller_takes_nothing_ahead(limiter: RateLimiter, store: CountingStore) -> None:
    """Below 40/s a batch is one unit, spent by the request that took it: the limit stays exact."""
    slow = caller(10, 10)
    for _ in range(5):
        await limiter.spend(slow)
    await asyncio.sleep(0.05)
    assert store.asked == [1] * 5
    assert limiter._budgets["c"].next_units == 0
