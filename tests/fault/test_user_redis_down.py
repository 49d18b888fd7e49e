"""Issue 14: Redis goes away while a user's token is cached (spec §5.4, §4.3).

A refresh token is spent only under the fleet's lock, which lives in Redis: without Redis a
subject's refresh fails closed (503 `upstream_unavailable`, nothing sent upstream), while the
still-valid subject token each worker holds in L1 is served as before. Client-credentials
tokens, for contrast, are fetched in-process (availability wins there).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import READ, StartBrokers, auth
from tests.fault.test_redis_down import OwnRedis
from tests.integration.workers import pin_workers
from tests.support import AuthServerProcess
from tests.users import log_in, subject_path, write_portal_config

pytestmark = pytest.mark.slow

LIFETIME = 6  # cached for 4.5 s; min_ttl asks for at most 3 s


@pytest.fixture
def own_redis() -> Iterator[OwnRedis]:
    server = OwnRedis()
    server.start()
    yield server  # requested before `start_brokers`, so stopped after the brokers
    server.stop()


async def test_without_redis_a_subject_refresh_fails_closed_while_cached_subject_tokens_are_served(
    own_redis: OwnRedis, tmp_path: Path, authserver: AuthServerProcess, start_brokers: StartBrokers
) -> None:
    authserver.configure(lifetime=LIFETIME)
    config = write_portal_config(tmp_path / "users.toml", own_redis.url, authserver)
    (broker,) = start_brokers(config, workers=2)
    async with contextlib.AsyncExitStack() as stack:
        workers = list((await pin_workers(broker, stack)).values())
        subject = log_in(broker.url, authserver)
        logged_in = time.monotonic()  # the token was issued before this
        path = subject_path(subject)

        async def everywhere(**params: str) -> list[httpx.Response]:
            return list(await asyncio.gather(*(w.get(path, params=params, headers=auth()) for w in workers)))

        cached = await everywhere()  # read from Redis into each worker's L1
        assert [r.status_code for r in cached] == [200, 200], [r.text for r in cached]
        (token,) = {r.json()["access_token"] for r in cached}

        own_redis.stop()
        served = await everywhere()
        assert [r.status_code for r in served] == [200, 200], [r.text for r in served]
        assert {r.json()["access_token"] for r in served} == {token}

        # past half its lifetime: min_ttl wants a refresh, which cannot be had without the lock;
        # the still-valid token beats the error
        await asyncio.sleep(max(0.0, logged_in + LIFETIME / 2 + 0.3 - time.monotonic()))
        wanting = await everywhere(min_ttl="60")
        assert [r.status_code for r in wanting] == [200, 200], [r.text for r in wanting]
        assert {r.json()["access_token"] for r in wanting} == {token}

        # client credentials meanwhile: fetched in-process, Redis or not
        other = await workers[0].get("/v1/tokens/payments", params={"scope": READ}, headers=auth())
        assert other.status_code == 200, other.text

        # once the cached token is no longer valid: 503, fail closed, never an unlocked refresh
        await asyncio.sleep(max(0.0, logged_in + LIFETIME * 0.75 + 0.3 - time.monotonic()))
        closed = await everywhere()
        assert [r.status_code for r in closed] == [503, 503], [r.text for r in closed]
        for answer in closed:
            body = answer.json()
            assert body["error"] == "upstream_unavailable", body
            assert "Redis" in body["error_description"]
            assert answer.headers["retry-after"] == "1"
    stats = authserver.stats()
    assert stats["refresh_requests"] == 0
    assert not next(iter(stats["grants"].values()))["revoked"]
