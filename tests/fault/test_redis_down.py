"""Issue 4, point 4: Redis goes away under load and comes back (spec §3.4, §4.3, §4.4).

One broker process with two workers on a redis-server of the test's own, stopped and restarted
on the same port while callers keep asking. While it is down: L1 hits are still served, a miss
is fetched with in-process single-flight only (one upstream request per worker at most),
/readyz says degraded, and each worker warns once. When it is back: /readyz is ok again within
seconds, and shared caching and the distributed single-flight work again without a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from broker.embedded_redis import EmbeddedRedis
from tests.conftest import READ, WRITE, StartBrokers, auth
from tests.fault.conftest import BOTH, TOKENS, get_token, keys, log_events, until
from tests.integration.workers import pin_connections
from tests.support import AuthServerProcess, free_port, token_keys

pytestmark = pytest.mark.slow


class OwnRedis:
    """A redis-server on a fixed port that the test stops and starts again (empty, as after a crash)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.server: EmbeddedRedis | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.server = EmbeddedRedis(port=self.port).start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None


@pytest.fixture
def own_redis() -> Iterator[OwnRedis]:
    redis = OwnRedis()
    redis.start()
    yield redis  # requested before `start_brokers`, so stopped after the brokers
    redis.stop()


def upstream_requests(authserver: AuthServerProcess, scope: str, auth: str = "basic") -> int:
    """Token requests the authorization server saw for a scope set; `ledger` is the credential
    that authenticates with client_secret_post, `payments` with client_secret_basic."""
    return sum(1 for r in authserver.stats()["requests"] if r["scope"] == scope and r["auth"] == auth)


class Fleet:
    """Single-connection clients pinned to the workers of one broker (tests/integration/workers.py)."""

    def __init__(self, pinned: dict[int, list[httpx.AsyncClient]]) -> None:
        self.worker_of = {client: pid for pid, clients in pinned.items() for client in clients}
        self.clients = list(self.worker_of)
        self.probes = [clients[0] for clients in pinned.values()]

    async def readiness(self) -> set[str]:
        answers = await asyncio.gather(*(client.get("/readyz") for client in self.probes))
        return {f"{answer.status_code} {answer.json()['status']} {answer.json()['redis']}" for answer in answers}

    async def degraded(self) -> bool:
        return await self.readiness() == {"200 degraded unreachable"}

    async def ready(self) -> bool:
        return await self.readiness() == {"200 ok ok"}

    async def report(self, scope: str) -> list[int]:
        """Every pinned connection reports a token the broker never handed out (a no-op, 204),
        all at once: each report is a Redis call of its own, so the pools grow to ~25 connections."""
        body = {"access_token": "not-a-token-we-handed-out", "scope": scope}
        responses = await asyncio.gather(
            *(client.post(f"{TOKENS}/invalidate", json=body, headers=auth()) for client in self.clients)
        )
        return [response.status_code for response in responses]

    async def burst(self, scope: str, path: str = TOKENS) -> dict[int, set[str]]:
        """One request per pinned connection, all at once: {worker pid: tokens it answered}."""
        responses = await asyncio.gather(
            *(client.get(path, params={"scope": scope}, headers=auth()) for client in self.clients)
        )
        tokens: dict[int, set[str]] = {}
        for client, response in zip(self.clients, responses, strict=True):
            assert response.status_code == 200, response.text
            tokens.setdefault(self.worker_of[client], set()).add(response.json()["access_token"])
        return tokens


async def test_the_broker_serves_through_a_redis_outage_and_resumes_sharing_when_it_is_back(
    own_redis: OwnRedis,
    write_fault_config: Callable[..., Path],
    authserver: AuthServerProcess,
    start_brokers: StartBrokers,
) -> None:
    config = write_fault_config(own_redis.url)
    (broker,) = start_brokers(config, workers=2)
    async with contextlib.AsyncExitStack() as stack:
        fleet = Fleet(await pin_connections(broker, 25, stack))

        # a token for READ in both workers' L1 (one fetch, the second worker reads it from Redis)
        warm = await fleet.burst(READ)
        (token,) = set.union(*warm.values())
        assert upstream_requests(authserver, READ) == 1

        # steady load on READ the whole time, touching every pinned connection about twice a
        # second (uvicorn drops keep-alive connections idle for 5 s)
        steady: list[tuple[float, int, str | None]] = []
        stop_load = asyncio.Event()

        async def load() -> None:
            for group in itertools.cycle(range(5)):
                if stop_load.is_set():
                    return
                clients = fleet.clients[group::5]
                for response in await asyncio.gather(*(get_token(client, READ) for client in clients)):
                    steady.append((time.monotonic(), response.status_code, response.json().get("access_token")))
                await asyncio.sleep(0.05)

        loader = asyncio.create_task(load())
        try:
            await asyncio.sleep(0.5)
            down_at = time.monotonic()
            own_redis.stop()
            assert await until(fleet.degraded, 5, "/readyz degraded on both workers") < 3

            # a miss while Redis is down: fetched from upstream with in-process single-flight only
            authserver.configure(delay=0.3)  # the first fetch is in flight while the rest pile up
            tokens = await fleet.burst(WRITE)
            assert upstream_requests(authserver, WRITE) == len(tokens) == 2  # one per worker
            assert all(len(per_worker) == 1 for per_worker in tokens.values())
            authserver.configure(delay=0)
            assert await fleet.burst(WRITE) == tokens  # kept in each worker's L1
            assert upstream_requests(authserver, WRITE) == 2

            await asyncio.sleep(1.0)  # more steady load while down
            warnings = log_events(broker.output(), "redis.unreachable")
            assert len(warnings) == 2, "one warning per worker, not per request"
            up_at = time.monotonic()
            own_redis.start()
            assert await until(fleet.ready, 5, "/readyz ok on both workers") < 4
        finally:
            stop_load.set()
            await loader

        during = [(status, served) for t, status, served in steady if down_at <= t < up_at]
        assert len(during) > 50
        assert all(status == 200 and served == token for status, served in during), "L1 hits failed"
        assert all(status == 200 for _, status, _ in steady)

        # back: callers are served right away, though a burst may still be fetched once per
        # worker while the pools' pre-outage connections fail one last time (the next test)
        authserver.configure(delay=0.3)
        tokens = await fleet.burst(BOTH)
        assert upstream_requests(authserver, BOTH) == len(set.union(*tokens.values())) <= 2

        # once every pinned connection's Redis call has gone through (so the top of each LIFO
        # pool is fresh connections), a cold key across both workers is fetched exactly once
        # for the fleet and shared through Redis: no restart needed
        async def settled() -> bool:
            return set(await fleet.report(READ)) == {204} and await fleet.ready()

        await until(settled, 10, "invalidation reports answered 204 on both workers")
        tokens = await fleet.burst(READ, "/v1/tokens/ledger")
        assert upstream_requests(authserver, READ, auth="post") == 1
        assert len(set.union(*tokens.values())) == 1
        assert token_keys(config, "ledger", READ).token in keys(own_redis.url, "tb:*:tok:*")


STALE_CONNECTIONS = (
    "broker/store.py Store._call with the pool of broker/redis_client.py connect(): after Redis "
    "restarts, every connection the pool opened before the outage fails once with 'Connection "
    "closed by server' on its next use (no retry on a fresh connection); _call treats that as Redis "
    "being down (reachable=False, fail fast for 1 s, a new redis.unreachable warning), so "
    "the first requests after recovery are served as if Redis were down: invalidation reports "
    "answer 503 temporarily_unavailable and a cold burst is fetched once per worker, not once "
    "for the fleet."
)


async def test_right_after_redis_is_back_a_cold_burst_is_fetched_once_and_nothing_more_is_logged(
    own_redis: OwnRedis,
    write_fault_config: Callable[..., Path],
    authserver: AuthServerProcess,
    start_brokers: StartBrokers,
) -> None:
    (broker,) = start_brokers(write_fault_config(own_redis.url), workers=2)
    async with contextlib.AsyncExitStack() as stack:
        fleet = Fleet(await pin_connections(broker, 25, stack))
        await fleet.burst(READ)
        assert set(await fleet.report(READ)) == {204}  # connections in each worker's Redis pool
        own_redis.stop()
        await until(fleet.degraded, 5, "/readyz degraded on both workers")
        own_redis.start()
        await until(fleet.ready, 5, "/readyz ok on both workers")

        # Redis is back and answers: reports are no-ops again, a cold key is fetched once
        reports = Counter(await fleet.report(READ))
        authserver.configure(delay=0.3)
        await fleet.burst(WRITE)
        fetched = upstream_requests(authserver, WRITE)
    broker.stop()
    warnings = len(log_events(broker.output(), "redis.unreachable"))
    outcome = {"reports": dict(reports), "upstream": fetched, "warnings": warnings}
    assert outcome == {"reports": {204: 50}, "upstream": 1, "warnings": 2}


INVALIDATE_WHILE_DOWN = (
    "broker/tokens.py TokenService.invalidate: `await self.store.drop_if(...)` lets StoreUnavailable "
    "escape while Redis is down, so the report is answered 503 temporarily_unavailable (an error code "
    "neither openapi.yaml nor spec §3.3 has, and without Retry-After), although the L1 copy was "
    "dropped and the next request gets a new token; spec §3.2 answers 204 either way."
)


async def test_an_invalidation_report_while_redis_is_down_is_answered_204(
    own_redis: OwnRedis,
    write_fault_config: Callable[..., Path],
    authserver: AuthServerProcess,
    start_brokers: StartBrokers,
) -> None:
    (broker,) = start_brokers(write_fault_config(own_redis.url), workers=1)
    async with httpx.AsyncClient(base_url=broker.url, timeout=15, trust_env=False) as client:
        token = (await get_token(client)).json()["access_token"]
        own_redis.stop()

        async def degraded() -> bool:
            return (await client.get("/readyz")).json()["status"] == "degraded"

        await until(degraded, 5, "/readyz degraded")
        report = await client.post(f"{TOKENS}/invalidate", json={"access_token": token, "scope": READ}, headers=auth())
        replaced = await get_token(client)
    assert replaced.status_code == 200
    assert replaced.json()["access_token"] != token  # the report did take effect
    assert report.status_code == 204, report.text
