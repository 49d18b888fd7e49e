"""Hardening items 10, 11, 12, 13 and 15, through real broker processes (spec §4.4, §4.3, §3.2).

Brokers run as `token-broker serve` processes; where Redis has to misbehave for one of them, that
broker reaches Redis through a TcpProxy (tests/proxy.py) while the other talks to it directly.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import redis

from tests.conftest import READ, WRITE, StartBrokers, auth
from tests.fault.conftest import TOKENS, get_token, keys, until
from tests.proxy import TcpProxy
from tests.support import AuthServerProcess, kill_tree, stored_token, token_keys

pytestmark = pytest.mark.slow

LOCKS = "tb:{payments}:lock:*"


@pytest.fixture
def proxy(redis_url: str) -> Iterator[TcpProxy]:
    with TcpProxy(redis_url) as running:
        yield running


def client_of(url: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=url, timeout=30, trust_env=False)


async def test_an_acquire_whose_reply_was_lost_does_not_wait_out_its_own_lock(
    proxy: TcpProxy,
    write_fault_config: Callable[..., Path],
    redis_url: str,
    authserver: AuthServerProcess,
    start_brokers: StartBrokers,
) -> None:
    """Defect (hardening item 10): the fetch lock was a plain SET NX, and the Store retries a
    command once on a fresh connection after a connection error. When the first SET's reply was
    lost (the lock was taken, the broker did not hear it), the retry found the lock held, by
    itself, reported "lost", and the caller waited on its own lock until it expired (lock_ttl).
    The acquire now recognises its own owner and gets its fence back."""
    lock_ttl = 6.0
    config = write_fault_config(proxy.url)
    (broker,) = start_brokers(config, workers=1, env={"BROKER_CACHE_LOCK_TTL_SECONDS": str(lock_ttl)})
    async with client_of(broker.url) as client:
        # Another scope set first: every script the fetch path runs is loaded in Redis, so the
        # acquire below runs there the first time it is sent.
        assert (await get_token(client, WRITE)).status_code == 200
        fetched = authserver.token_requests()
        proxy.cut_after(b":lock:")
        started = time.monotonic()
        response = await get_token(client, READ)
        waited = time.monotonic() - started
    assert proxy.fired["cut"] == 1  # the acquire ran in Redis; its reply never reached the broker
    assert response.status_code == 200, response.text
    assert waited < lock_ttl, f"the caller waited {waited:.1f} s: it waited out its own lock ({lock_ttl:g} s)"
    assert authserver.token_requests() == fetched + 1
    stored = stored_token(redis_url, token_keys(config, "payments", READ))
    assert stored is not None
    assert stored.access_token == response.json()["access_token"]
    assert keys(redis_url, LOCKS) == []  # and it released the lock it got back


async def test_a_lock_holder_keeps_its_lock_through_a_redis_blip(
    proxy: TcpProxy,
    write_fault_config: Callable[..., Path],
    redis_url: str,
    authserver: AuthServerProcess,
    start_brokers: StartBrokers,
) -> None:
    """Defect (hardening item 11): one StoreUnavailable stopped the holder's lock renewal for good
    (and inside the 1 s fail-fast window after a failed call every renewal is one). A holder whose
    Redis connections failed briefly lost its lock while its fetch was still running, and another
    broker asking meanwhile fetched a second token instead of waiting for the holder's. The
    renewal now keeps trying until the lock is found taken over.

    Lock TTL 6 s, renewed every 2 s. A's first renewal never reaches Redis: it starts a 1.5 s
    outage of A's connections (cut, new ones refused). Without a further renewal A's lock
    expires 4 s later; B asks 5 s later, while A's upstream answer is still 2 s away."""
    env = {
        "BROKER_CACHE_LOCK_TTL_SECONDS": "6",
        "BROKER_UPSTREAM_TIMEOUT_SECONDS": "20",  # A's upstream answer takes 9 s
        "BROKER_SERVER_REQUEST_DEADLINE_SECONDS": "20",
    }
    a = start_brokers(write_fault_config(proxy.url, name="a.toml"), workers=1, env=env)[0]
    b = start_brokers(write_fault_config(redis_url, name="b.toml"), workers=1, env=env)[0]
    async with client_of(a.url) as to_a, client_of(b.url) as to_b:
        authserver.configure(delay=9)
        holder = asyncio.create_task(get_token(to_a))
        await until(lambda: authserver.token_requests() == 1, 10, "A's upstream request")
        authserver.configure(delay=0)  # read per request: the one in flight keeps its delay
        proxy.outage_on(b":lock:", 1.5)  # A's next lock command is its first renewal
        await until(lambda: proxy.fired["outage"] == 1, 10, "A's first renewal")
        await asyncio.sleep(max(0.0, proxy.fired_at["outage"] + 5 - time.monotonic()))
        assert not holder.done()
        assert len(keys(redis_url, LOCKS)) == 1, "A's lock expired while A was still fetching"
        waiter = await get_token(to_b)  # waits for A's fetch instead of fetching again
        held = await holder
    assert held.status_code == 200, held.text
    assert waiter.status_code == 200, waiter.text
    assert waiter.json()["access_token"] == held.json()["access_token"]
    assert authserver.token_requests() == 1


async def stop_holder_past_its_lock(
    to_a: httpx.AsyncClient, to_b: httpx.AsyncClient, a_proc: object, authserver: AuthServerProcess, redis_url: str
) -> tuple[asyncio.Task[httpx.Response], httpx.Response]:
    """A takes the lock (its upstream answer takes 2 s) and is stopped (SIGSTOP); its lock expires
    (TTL 2 s) and B fetches a token under the next lock. → (A's request, B's answer). A stays
    stopped: the caller continues it."""
    authserver.configure(delay=2)
    holder = asyncio.create_task(get_token(to_a))
    await until(lambda: authserver.token_requests() == 1, 10, "A's upstream request")
    authserver.configure(delay=0)
    assert len(keys(redis_url, LOCKS)) == 1
    kill_tree(a_proc, signal.SIGSTOP)  # type: ignore[arg-type]
    newer = await get_token(to_b)
    assert newer.status_code == 200, newer.text
    assert authserver.token_requests() == 2
    return holder, newer


LOCK_TTL_2 = {"BROKER_CACHE_LOCK_TTL_SECONDS": "2"}


async def test_a_stalled_holder_cannot_replace_a_later_locks_token_that_expires_sooner(
    write_config: Callable[..., Path], redis_url: str, authserver: AuthServerProcess, start_brokers: StartBrokers
) -> None:
    """Defect (hardening item 11, fencing): losing the lock did not fence the holder's write; only
    "the later expiry wins" ordered writes. A holder stalled past its lock that comes back with a
    token expiring later than the one fetched meanwhile (the server's lifetime changed, or clocks
    differ) replaced it. Writes now carry the lock's fence and a later fence wins."""
    config = write_config()
    read_keys = token_keys(config, "payments", READ)
    a, b = start_brokers(config, count=2, workers=1, env=LOCK_TTL_2)
    async with client_of(a.url) as to_a, client_of(b.url) as to_b:
        # A's request arrives with lifetime 3600; the one B makes once A stalls gets 1800.
        authserver.configure(lifetime=3600, delay=2)
        holder = asyncio.create_task(get_token(to_a))
        await until(lambda: authserver.token_requests() == 1, 10, "A's upstream request")
        authserver.configure(delay=0, lifetime=1800)
        kill_tree(a, signal.SIGSTOP)
        try:
            newer = await get_token(to_b)
        finally:
            kill_tree(a, signal.SIGCONT)
        late = await holder
    assert newer.status_code == 200, newer.text
    assert late.status_code == 200, late.text
    assert authserver.token_requests() == 2
    # A's write was refused (B's lock came later): A's caller gets the token Redis holds
    assert late.json()["access_token"] == newer.json()["access_token"]
    stored = stored_token(redis_url, read_keys)
    assert stored is not None
    assert stored.access_token == newer.json()["access_token"], "the stalled holder's token replaced it"


async def test_a_stalled_holder_cannot_write_its_token_back_after_an_invalidation(
    write_config: Callable[..., Path], redis_url: str, authserver: AuthServerProcess, start_brokers: StartBrokers
) -> None:
    """Defect (hardening item 12): an invalidation deleted the key, and with it what ordered
    writes (the expiry high-water mark), so a holder stalled past its lock could write its older
    token right after the invalidation, and it was handed out as the replacement. The drop now
    leaves a tombstone with the dropped token's fence, and the stalled holder's write is refused.

    A takes the lock and stalls (SIGSTOP); B fetches under the next lock; the caller reports B's
    token to B, whose refresh is still at the authorization server when A comes back and tries
    to write its token. Everyone asking B from then on gets a token fetched after the report."""
    config = write_config()
    read_keys = token_keys(config, "payments", READ)
    a, b = start_brokers(config, count=2, workers=1, env=LOCK_TTL_2)
    async with client_of(a.url) as to_a, client_of(b.url) as to_b:
        holder, reported = await stop_holder_past_its_lock(to_a, to_b, a, authserver, redis_url)
        authserver.configure(delay=4)  # B's refresh after the report: in flight while A writes
        body = {"access_token": reported.json()["access_token"], "scope": READ}
        assert (await to_b.post(f"{TOKENS}/invalidate", json=body, headers=auth())).status_code == 204
        await until(lambda: authserver.token_requests() == 3, 10, "B's refresh at the upstream")
        authserver.configure(delay=0)
        kill_tree(a, signal.SIGCONT)
        late = await holder  # A's answer arrived long ago; it writes (or tries to), then answers
        assert late.status_code == 200, late.text
        stale = late.json()["access_token"]
        assert stale != reported.json()["access_token"]
        stored = stored_token(redis_url, read_keys)
        assert stored is None or stored.access_token != stale, "the stalled holder's write went through"
        after = await get_token(to_b)
    assert after.status_code == 200, after.text
    assert after.json()["access_token"] not in {stale, reported.json()["access_token"]}
    assert authserver.token_requests() == 3  # A's, B's, B's refresh (which the next request joined)


async def test_a_get_then_report_loop_costs_one_fetch_per_interval(
    write_config: Callable[..., Path], authserver: AuthServerProcess, start_brokers: StartBrokers
) -> None:
    """Defect (hardening item 13): an invalidation had no minimum token age, so a caller looping
    "get, report it" dropped and refetched the token as fast as it could ask: one upstream request
    per report, forever. A token younger than `invalidate_min_interval_seconds` is not dropped
    again within that interval of the previous drop; an older one is dropped at once. The route
    answers 204 either way."""
    interval = 2.0
    env = {"BROKER_CACHE_INVALIDATE_MIN_INTERVAL_SECONDS": str(interval)}
    (broker,) = start_brokers(write_config(), workers=2, env=env)
    statuses: set[int] = set()
    reports = 0
    async with client_of(broker.url) as client:
        started = time.monotonic()
        while time.monotonic() - started < 3.0:
            token = (await get_token(client)).json()["access_token"]
            report = await client.post(
                f"{TOKENS}/invalidate", json={"access_token": token, "scope": READ}, headers=auth()
            )
            statuses.add(report.status_code)
            reports += 1
        elapsed = time.monotonic() - started
        fetched = authserver.token_requests()

        # A token older than the interval is dropped when reported, recent drop or not.
        await asyncio.sleep(interval + 0.5)
        old = (await get_token(client)).json()["access_token"]
        report = await client.post(f"{TOKENS}/invalidate", json={"access_token": old, "scope": READ}, headers=auth())
        assert report.status_code == 204, report.text
        replaced = (await get_token(client)).json()["access_token"]
    assert statuses == {204}
    assert reports > 10
    # the first fetch, then one per drop: at most one drop per interval
    assert fetched <= 2 + elapsed / interval, f"{fetched} upstream requests for {reports} reports in {elapsed:.1f} s"
    assert replaced != old


async def test_a_slow_l2_reply_does_not_hand_out_a_token_past_its_window(
    proxy: TcpProxy,
    write_fault_config: Callable[..., Path],
    redis_url: str,
    authserver: AuthServerProcess,
    start_brokers: StartBrokers,
) -> None:
    """Defect (hardening item 15): `now` was taken before the L2 read, so a token whose cached
    window ended while the read's reply was on its way was still judged fresh and handed out with
    less life left than the skew promises (here about 1 s of an 8 s token whose skew is 2 s). A
    copy read from Redis is now bounded by the key's PTTL, counted from when the read was sent.

    A (direct) fetches the token; B reads it through a proxy that holds the reply back 0.7 s
    (under the 1 s socket timeout, past which a read counts as Redis being down), sent when
    the token's window (6 s of its 8 s) has less than 0.35 s to go."""
    config = write_fault_config(redis_url, name="a.toml")
    a = start_brokers(config, workers=1)[0]
    b = start_brokers(write_fault_config(proxy.url, name="b.toml"), workers=1)[0]
    authserver.configure(lifetime=8)
    skew = 8 / 4  # min(skew_seconds, lifetime / 4)
    key = token_keys(config, "payments", READ).token
    async with client_of(a.url) as to_a, client_of(b.url) as to_b:
        first = await get_token(to_a)
        assert first.status_code == 200, first.text
        with redis.Redis.from_url(redis_url) as direct:
            while direct.pttl(key) > 350:
                await asyncio.sleep(0.01)
        proxy.delay_reply(b":tok:", 0.7)
        response = await get_token(to_b)
    assert proxy.fired["delay"] == 1
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["access_token"] != first.json()["access_token"], f"handed out with {body['expires_in']} s left"
    assert body["expires_in"] >= skew
