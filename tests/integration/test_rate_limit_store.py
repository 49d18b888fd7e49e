"""The GCRA of a caller's rate limit in Redis (broker/redis_scripts.py TAKE_RATE, Store.take_rate),
on the session's real Redis: a batch is granted in full, in part or not at all, units come back
at the rate, the key lives only while it matters, and Redis's clock is the only clock."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator

import pytest
import redis
from structlog.testing import capture_logs

from broker.entries import Codec
from broker.redis_client import connect
from broker.store import Keys, Store
from broker.vault.keyring import KeyRing


@pytest.fixture
async def store(redis_url: str) -> AsyncIterator[Store]:
    client = connect(redis_url)
    yield Store(client)
    await client.aclose()


async def test_a_fresh_caller_has_its_whole_burst_and_a_batch_is_granted_in_part(store: Store) -> None:
    assert await store.take_rate("c", 10, 5, 3) == (3, 0.0)
    granted, wait = await store.take_rate("c", 10, 5, 3)
    assert granted == 2  # what is left of the burst, not the batch asked for
    assert 0 < wait <= 0.1  # one emission interval at 10/s
    assert (await store.take_rate("c", 10, 5, 1))[0] == 0


async def test_a_batch_is_never_more_than_the_burst(store: Store) -> None:
    assert (await store.take_rate("c", 1000, 5, 100))[0] == 5


async def test_units_come_back_at_the_rate(store: Store) -> None:
    assert (await store.take_rate("c", 100, 2, 2))[0] == 2
    granted, wait = await store.take_rate("c", 100, 2, 1)
    assert granted == 0
    assert 0 < wait <= 0.01
    await asyncio.sleep(wait + 0.005)
    assert (await store.take_rate("c", 100, 2, 1))[0] == 1


async def test_a_refusal_writes_nothing_and_the_key_lives_no_longer_than_it_matters(
    store: Store, redis_url: str
) -> None:
    key = Keys().rate_limit("c")
    with redis.Redis.from_url(redis_url) as direct:
        assert (await store.take_rate("c", 2, 4, 4))[0] == 4
        stored = direct.get(key)
        pttl = direct.pttl(key)
        # TAT 2 s ahead (4 units at 2/s): kept for that long plus a second's margin
        assert 2000 < pttl <= 3000
        assert (await store.take_rate("c", 2, 4, 1))[0] == 0
        assert direct.get(key) == stored
        assert direct.pttl(key) <= pttl


async def test_a_tat_in_the_past_is_a_full_burst(store: Store, redis_url: str) -> None:
    with redis.Redis.from_url(redis_url) as direct:
        direct.set(Keys().rate_limit("c"), "1000000", px=60_000)  # 1970
    assert (await store.take_rate("c", 1, 3, 10))[0] == 3


@pytest.mark.parametrize(("per_second", "burst"), [(3, 3), (7, 7), (0.3, 2), (1 / 3, 5), (0.7, 9)])
async def test_rates_that_are_not_round_still_grant_the_whole_burst(
    store: Store, per_second: float, burst: int
) -> None:
    assert (await store.take_rate("c", per_second, burst, burst + 1))[0] == burst
    assert (await store.take_rate("c", per_second, burst, 1))[0] == 0


async def test_a_fast_rate_is_exact_at_the_magnitude_of_redis_time(store: Store) -> None:
    """An emission interval of about 1 µs added to ~1.8e15 µs since 1970 loses a quarter of it in
    a double: the script sums relative to now, so the whole burst is there."""
    assert (await store.take_rate("c", 999_999.9, 1000, 1001))[0] == 1000


async def test_the_slowest_and_the_fastest_rate(store: Store, redis_url: str) -> None:
    granted, wait = await store.take_rate("slow", 0.001, 1, 1)
    assert granted == 1
    granted, wait = await store.take_rate("slow", 0.001, 1, 1)
    assert granted == 0
    assert 999 < wait <= 1000  # the next unit in 1000 s
    with redis.Redis.from_url(redis_url) as direct:
        assert 1000_000 < direct.pttl(Keys().rate_limit("slow")) <= 1001_000
    assert (await store.take_rate("fast", 1_000_000, 1_000_000, 50_000))[0] == 50_000


async def test_a_changed_limit_applies_to_the_state_as_it_is(store: Store) -> None:
    assert (await store.take_rate("c", 1, 2, 2))[0] == 2  # the TAT is now 2 s ahead
    assert (await store.take_rate("c", 1, 2, 1))[0] == 0
    # a larger burst makes room at once; the TAT keeps what was spent
    assert (await store.take_rate("c", 1, 5, 10))[0] == 3


async def test_callers_and_deployments_have_their_own_state(redis_url: str) -> None:
    one, other = connect(redis_url), connect(redis_url)
    try:
        first, second = Store(one, prefix="tb"), Store(other, prefix="tb-staging")
        assert (await first.take_rate("c", 1, 1, 1))[0] == 1
        assert (await first.take_rate("c", 1, 1, 1))[0] == 0
        assert (await first.take_rate("d", 1, 1, 1))[0] == 1
        assert (await second.take_rate("c", 1, 1, 1))[0] == 1
    finally:
        await one.aclose()
        await other.aclose()
    # one key per caller, with a hash tag of its own (one cluster slot) that no credential can have
    assert Keys("tb").rate_limit("c") == "tb:{rl:c}:gcra"
    with redis.Redis.from_url(redis_url) as direct:
        assert sorted(direct.keys("*")) == [b"tb-staging:{rl:c}:gcra", b"tb:{rl:c}:gcra", b"tb:{rl:d}:gcra"]


async def test_concurrent_batches_never_grant_more_than_the_burst(store: Store) -> None:
    results = await asyncio.gather(*(store.take_rate("c", 0.01, 50, 3) for _ in range(40)))
    assert sum(granted for granted, _ in results) == 50


async def test_rotate_key_leaves_rate_limit_state_alone(redis_url: str) -> None:
    """`token-broker rotate-key` re-seals what is sealed; a GCRA state is a bare number, not a
    value to open (it would count as seen and log an undecryptable value)."""
    client = connect(redis_url)
    try:
        store = Store(client, codec=Codec(KeyRing.parse(os.environ["BROKER_ENCRYPTION_KEYS"])))
        await store.take_rate("c", 1, 5, 1)
        stored = await client.get(store.keys.rate_limit("c"))
        with capture_logs() as logs:
            assert await store.rewrap_all() == (0, 0)
        assert logs == []
        assert await client.get(store.keys.rate_limit("c")) == stored
    finally:
        await client.aclose()
