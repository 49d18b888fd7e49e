"""The token lifecycle against real processes (spec §3.1, §3.2, §4).

Every test here runs `python -m broker serve` with several uvicorn workers on the session's real
Redis, in front of the real test authorization server, and talks to it over HTTP. Where a test
must reach a particular worker it uses a keep-alive connection pinned to that worker (see
tests/integration/workers.py).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import math
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from tests.conftest import READ, WRITE, StartBrokers, auth
from tests.integration.workers import client_port, pin_connections, pin_workers, workers_of
from tests.support import AuthServerProcess, BrokerProcess

pytestmark = pytest.mark.slow

TOKENS = "/v1/tokens/payments"
INVALIDATE = "/v1/tokens/payments/invalidate"


def jwt_claims(token: str) -> dict[str, Any]:
    """The payload of a JWT, unverified: the test only reads `exp`."""
    payload = token.split(".")[1]
    claims: dict[str, Any] = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    return claims


async def token_of(client: httpx.AsyncClient, scope: str = READ) -> str:
    response = await client.get(TOKENS, params={"scope": scope}, headers=auth())
    assert response.status_code == 200, response.text
    token: str = response.json()["access_token"]
    return token


def served_by(
    brokers: list[BrokerProcess], results: list[tuple[BrokerProcess, int | None, httpx.Response]]
) -> Counter[int]:
    """How many of the responses each worker (pid) served, for connections still open in the pool."""
    counts: Counter[int] = Counter()
    for broker in brokers:
        counts.update(workers_of(broker, [port for b, port, _ in results if b is broker]).values())
    return counts


async def stampede(brokers: list[BrokerProcess], authserver: AuthServerProcess, redis_url: str, n: int = 500) -> None:
    """Spec §4.4: N concurrent cold requests across any number of workers and replicas → one fetch;
    §1: the scope set is canonical, so orderings share one entry and another set is its own."""
    authserver.configure(delay=0.5)  # the first fetch is in flight while everyone else piles up
    async with contextlib.AsyncExitStack() as stack:
        # n open connections, the same number on every worker, taken in turn across brokers and workers.
        per_worker = n // sum(broker.workers for broker in brokers)
        pinned = [await pin_connections(broker, per_worker, stack) for broker in brokers]
        connections = [
            (broker, clients[i])
            for i in range(per_worker)
            for broker, workers in zip(brokers, pinned, strict=True)
            for clients in workers.values()
        ]
        assert len(connections) == n

        async def burst(
            count: int, scope: Callable[[int], str]
        ) -> list[tuple[BrokerProcess, int | None, httpx.Response]]:
            async def one(i: int) -> tuple[BrokerProcess, int | None, httpx.Response]:
                broker, client = connections[i]
                response = await client.get(TOKENS, params={"scope": scope(i)}, headers=auth())
                return broker, client_port(response), response

            return await asyncio.gather(*(one(i) for i in range(count)))

        # Redis answers nothing for 0.5 s while the burst arrives (CLIENT PAUSE), as in any latency blip:
        # every request's L2 read is then in flight at once, so the outcome does not hinge on how fast
        # Redis happens to answer (without the pause the default-pool failure shows in ~4 runs of 5).
        control = redis.Redis.from_url(redis_url)
        try:
            control.client_pause(500, all=True)
        finally:
            control.close()
        started = time.perf_counter()
        results = await burst(n, lambda i: READ)
        wall = time.perf_counter() - started
        upstream = authserver.token_requests()
        workers = served_by(brokers, results)
        statuses = Counter(response.status_code for _, _, response in results)
        tokens = {response.json()["access_token"] for _, _, response in results if response.status_code == 200}
        print(
            f"\nstampede: {n} concurrent cold requests over {len(brokers)} brokers x {brokers[0].workers} workers"
            f" -> {upstream} upstream token request(s), {len(tokens)} distinct token(s),"
            f" statuses {dict(statuses)}, wall {wall:.2f} s (upstream delay 0.5 s),"
            f" requests per worker {sorted(workers.values())}"
        )
        assert statuses == {200: n}
        assert len(workers) == sum(broker.workers for broker in brokers), f"not every worker took part: {workers}"
        assert upstream == 1
        assert len(tokens) == 1
        (read_token,) = tokens
        assert authserver.stats()["requests"][0]["scope"] == READ

        # `b a` and `a b` are one scope set: one entry, one more upstream request, not two.
        started = time.perf_counter()
        results = await burst(100, lambda i: f"{WRITE} {READ}" if i % 4 < 2 else f"{READ} {WRITE}")
        wall = time.perf_counter() - started
        assert {response.status_code for _, _, response in results} == {200}
        bodies = [response.json() for _, _, response in results]
        requests = authserver.stats()["requests"]
        print(f"scope orderings: 100 requests ('b a' / 'a b') -> {len(requests) - 1} more upstream, {wall:.2f} s")
        assert len({body["access_token"] for body in bodies}) == 1
        assert {body["scope"] for body in bodies} == {f"{READ} {WRITE}"}
        both_token = bodies[0]["access_token"]
        assert both_token != read_token
        assert len(requests) == 2
        assert requests[1]["scope"] == f"{READ} {WRITE}"  # the canonical form went upstream

        # A different scope set is a separate entry: one more.
        results = await burst(50, lambda i: WRITE)
        assert {response.status_code for _, _, response in results} == {200}
        write_tokens = {response.json()["access_token"] for _, _, response in results}
        print(f"different scope set: 50 requests -> {authserver.token_requests() - 2} more upstream")
        assert len(write_tokens) == 1
        assert write_tokens.isdisjoint({read_token, both_token})
        assert authserver.token_requests() == 3

        # And the first entry is still served from cache.
        results = await burst(20, lambda i: READ)
        assert {response.json()["access_token"] for _, _, response in results} == {read_token}
        assert authserver.token_requests() == 3


async def test_stampede_across_replicas_and_workers_costs_one_upstream_request(
    write_config: Callable[..., Path], authserver: AuthServerProcess, start_brokers: StartBrokers, redis_url: str
) -> None:
    await stampede(start_brokers(write_config(), count=2, workers=2), authserver, redis_url)


async def test_refresh_ahead_serves_a_steady_stream_without_misses(
    write_config: Callable[..., Path], authserver: AuthServerProcess, start_brokers: StartBrokers
) -> None:
    """Spec §4.2 and §4.5: a key in steady use is refreshed in the background, never missed."""
    lifetime, skew, low, high = 4, 30, 0.6, 0.8
    effective_skew = min(skew, lifetime / 4)  # 1 s
    window = lifetime - effective_skew  # the cached window: 3 s
    delay = 0.3  # a caller that waited for an upstream fetch would take at least this long
    rate, duration = 20, 8.5  # ~2 lifetimes of requests
    (broker,) = start_brokers(
        write_config(),
        workers=2,
        env={"BROKER_CACHE_REFRESH_AT": f"{low},{high}", "BROKER_CACHE_SKEW_SECONDS": str(skew)},
    )
    authserver.configure(lifetime=lifetime, delay=delay)

    samples: list[tuple[float, float, httpx.Response]] = []
    async with contextlib.AsyncExitStack() as stack:
        clients = list((await pin_workers(broker, stack)).values())
        await token_of(clients[0])  # the one cold fetch

        async def one(i: int) -> None:
            sent = time.time()
            response = await clients[i % len(clients)].get(TOKENS, params={"scope": READ}, headers=auth())
            samples.append((sent, time.time(), response))

        tasks = []
        start = time.monotonic()
        for i in range(int(rate * duration)):
            await asyncio.sleep(max(0.0, start + i / rate - time.monotonic()))
            tasks.append(asyncio.create_task(one(i)))
        await asyncio.gather(*tasks)
        last_sent = max(sent for sent, _, _ in samples)
        await asyncio.sleep(delay + 0.2)  # let a refresh started by the last requests land

    errors = [(response.status_code, response.text) for _, _, response in samples if response.status_code != 200]
    assert not errors, errors[:5]
    latencies = sorted(received - sent for sent, received, _ in samples)
    bodies = [(received, response.json()) for _, received, response in samples]
    short = [body["expires_in"] for _, body in bodies if body["expires_in"] < effective_skew]
    # JWT exp is whole seconds (floored by the server), hence the 1 s allowance.
    left = min(jwt_claims(body["access_token"])["exp"] - received for received, body in bodies)
    seen = {body["access_token"] for _, body in bodies}
    arrivals = [request["t"] for request in authserver.stats()["requests"]]
    gaps = [later - earlier for earlier, later in itertools.pairwise(arrivals)]
    span = last_sent - arrivals[0]
    print(
        f"\nrefresh-ahead: {len(samples)} requests over {duration} s, lifetime {lifetime} s, window {window:g} s"
        f" -> {len(arrivals)} upstream requests, gaps {[round(g, 2) for g in gaps]} s,"
        f" {len(seen)} distinct tokens, latency p50 {latencies[len(latencies) // 2] * 1000:.1f} ms"
        f" max {latencies[-1] * 1000:.1f} ms, least JWT life left {left:.2f} s"
    )
    assert not short, f"tokens handed out with less than the effective skew left: expires_in {short}"
    assert left >= effective_skew - 1.0
    assert latencies[-1] < delay, "a caller waited for an upstream fetch: refresh-ahead did not run ahead"
    # Refresh-ahead renews at issue time + U(low, high) x window = 1.8-2.4 s after the previous fetch
    # (plus at most one request interval until a request notices): that is once per refresh period,
    # not once per request and not once per 4 s lifetime. Over the stream's span (~8.5 s after the
    # cold fetch) that is 1 + span/2.4 .. 1 + span/1.8 requests, i.e. 4-5. The margins allow 0.1 s
    # early and, late, two request intervals plus 0.3 s of scheduling noise: still under the 3 s
    # window, so every refresh lands before the entry expires. Without refresh-ahead it would be 3
    # (one per cached window) with callers stalling at each expiry; without single-flight, one per
    # worker per refresh.
    assert all(low * window - 0.1 <= gap <= high * window + 2 / rate + 0.3 for gap in gaps), gaps
    lower = 1 + math.floor(span / (high * window + 2 / rate + 0.3))
    upper = 1 + math.ceil(span / (low * window - 0.1))
    assert lower <= len(arrivals) <= upper, (lower, len(arrivals), upper)
    # Each fetched token was handed out, except possibly one whose refresh landed after the stream.
    assert len(arrivals) - 1 <= len(seen) <= len(arrivals)


async def test_invalidate_drops_once_refreshes_once_and_ignores_stale_reports(
    write_config: Callable[..., Path], authserver: AuthServerProcess, start_brokers: StartBrokers
) -> None:
    """Spec §3.2: a hundred callers reporting the same token → one drop, one refresh."""
    (broker,) = start_brokers(write_config(), workers=2)
    async with contextlib.AsyncExitStack() as stack:
        # 25 connections on each worker: the 50 reports below arrive at both workers at once.
        connections = [client for clients in (await pin_connections(broker, 25, stack)).values() for client in clients]
        pinned = [connections[0], connections[-1]]  # one on each worker
        old = await token_of(pinned[0])
        for client in pinned:  # both workers now hold it
            assert {await token_of(client) for _ in range(3)} == {old}
        assert authserver.token_requests() == 1

        async def report(client: httpx.AsyncClient) -> tuple[int, int | None]:
            response = await client.post(INVALIDATE, json={"access_token": old, "scope": READ}, headers=auth())
            return response.status_code, client_port(response)

        reports = await asyncio.gather(*(report(client) for client in connections))
        assert [status for status, _ in reports] == [204] * 50
        reporters = Counter(workers_of(broker, [port for _, port in reports]).values())
        await asyncio.sleep(1.0)
        print(
            f"\ninvalidate: 50 reports (per worker {sorted(reporters.values())})"
            f" -> {authserver.token_requests() - 1} upstream request(s) after 1 s"
        )
        assert sorted(reporters.values()) == [25, 25]
        assert authserver.token_requests() == 2  # one refresh, whoever started it

        tokens = [await token_of(pinned[i % 2]) for i in range(20)]
        (new,) = set(tokens)
        assert new != old
        assert authserver.token_requests() == 2

        # A report about the replaced token is a no-op: 204, nothing dropped, nothing fetched.
        stale = await pinned[1].post(INVALIDATE, json={"access_token": old, "scope": READ}, headers=auth())
        assert stale.status_code == 204
        await asyncio.sleep(0.5)
        assert {await token_of(client) for client in pinned} == {new}
        assert authserver.token_requests() == 2


async def test_invalidation_reaches_the_l1_of_every_worker(
    write_config: Callable[..., Path],
    authserver: AuthServerProcess,
    start_brokers: StartBrokers,
    redis_url: str,
) -> None:
    """Spec §4.3: invalidation is published so that every worker drops its L1 copy."""
    (broker,) = start_brokers(write_config(), workers=2)
    store = redis.Redis.from_url(redis_url)
    try:
        async with contextlib.AsyncExitStack() as stack:
            pinned = list((await pin_workers(broker, stack)).values())
            old = await token_of(pinned[0])
            for client in pinned:
                assert {await token_of(client) for _ in range(5)} == {old}
            # Both L1s are warm: further hits on either worker do not read Redis at all.
            store.config_resetstat()
            for client in pinned:
                assert {await token_of(client) for _ in range(5)} == {old}
            assert "cmdstat_get" not in store.info("commandstats"), "a hit read Redis: L1 was not used"

            reported = await pinned[0].post(INVALIDATE, json={"access_token": old, "scope": READ}, headers=auth())
            assert reported.status_code == 204
            invalidated = time.monotonic()
            converged: dict[int, float] = {}
            served_old: list[tuple[int, float]] = []
            while len(converged) < len(pinned) and time.monotonic() - invalidated < 1.0:
                for index, client in enumerate(pinned):
                    token = await token_of(client)
                    if token == old:
                        served_old.append((index, time.monotonic() - invalidated))
                    else:
                        converged.setdefault(index, time.monotonic() - invalidated)
            print(f"\nL1 invalidation: workers serving the new token after {converged} s; old token {served_old}")
            assert len(converged) == len(pinned), f"a worker kept serving the old token: {served_old}"
            flipped_back = [(index, t) for index, t in served_old if t > converged[index]]
            assert not flipped_back, f"a worker went back to the old token: {flipped_back}"
            tokens = {await token_of(pinned[i % 2]) for i in range(20)}
            assert len(tokens) == 1
            assert old not in tokens
            assert authserver.token_requests() == 2
    finally:
        store.close()
