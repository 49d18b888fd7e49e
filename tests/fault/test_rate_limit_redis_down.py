"""A caller's rate limit while Redis is down (spec §6.6, README "When things fail"): each worker
enforces the caller's rate and burst on its own (the fleet fails open, up to workers times the
limit), a refusal is still 429 with Retry-After and never 503, each worker says so once in its
log, and when Redis is back the limit is shared by the fleet again.

One broker process with two workers on a redis-server of the test's own (tests/fault/
test_redis_down.py OwnRedis), connections pinned to each worker. The per-worker bounds come from
the local GCRA: burst + rate * t (+1) at most, and under continuous demand at least
burst + rate * t - 3.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.api.test_rate_limits import limited, limited_caller
from tests.conftest import READ, StartBrokers, auth
from tests.fault.conftest import TOKENS, log_events, until
from tests.fault.test_redis_down import OwnRedis, own_redis  # noqa: F401 - the fixture
from tests.integration.workers import pin_connections
from tests.support import AuthServerProcess

pytestmark = pytest.mark.slow

RATE, BURST = 5, 5
SECONDS = 3.0


async def hammer(workers: dict[int, list[httpx.AsyncClient]], seconds: float) -> dict[int, list[tuple[int, str]]]:
    """The limited caller on every pinned connection for `seconds`: {worker pid: [(status, Retry-After)]}."""
    answers: dict[int, list[tuple[int, str]]] = {pid: [] for pid in workers}
    stop = time.monotonic() + seconds

    async def one(pid: int, client: httpx.AsyncClient) -> None:
        while time.monotonic() < stop:
            response = await client.get(TOKENS, params={"scope": READ}, headers=limited())
            answers[pid].append((response.status_code, response.headers.get("retry-after", "")))

    await asyncio.gather(*(one(pid, client) for pid, clients in workers.items() for client in clients))
    return answers


async def test_with_redis_down_each_worker_enforces_the_limit_alone_and_sharing_resumes(
    own_redis: OwnRedis,  # noqa: F811 - the fixture
    write_fault_config: Callable[..., Path],
    authserver: AuthServerProcess,
    start_brokers: StartBrokers,
) -> None:
    (broker,) = start_brokers(write_fault_config(own_redis.url, limited_caller(RATE, BURST)), workers=2)
    async with contextlib.AsyncExitStack() as stack:
        workers = await pin_connections(broker, 2, stack)
        for clients in workers.values():  # every worker's L1 holds the token; the limit stays whole
            assert (await clients[0].get(TOKENS, params={"scope": READ}, headers=auth())).status_code == 200
        probes = [clients[0] for clients in workers.values()]

        async def degraded() -> bool:
            answers = await asyncio.gather(*(probe.get("/readyz") for probe in probes))
            return all(answer.json()["redis"] == "unreachable" for answer in answers)

        own_redis.stop()
        await until(degraded, 5, "/readyz degraded on both workers")
        down = await hammer(workers, SECONDS)

        own_redis.start()

        async def ready() -> bool:
            answers = await asyncio.gather(*(probe.get("/readyz") for probe in probes))
            return all(answer.json()["redis"] == "ok" for answer in answers)

        await until(ready, 5, "/readyz ok on both workers")
        await asyncio.sleep(1.2)  # each worker asks Redis again a second after it last could not
        for clients in workers.values():  # Redis came back empty: the token again, for the unlimited caller
            assert (await clients[0].get(TOKENS, params={"scope": READ}, headers=auth())).status_code == 200
        up = await hammer(workers, 1.0)

    served_down = {pid: sum(1 for status, _ in answers if status == 200) for pid, answers in down.items()}
    print(f"\nRedis down, {RATE}/s burst {BURST}, {SECONDS:g} s: served per worker {served_down}")
    for pid, answers in down.items():
        assert BURST + RATE * SECONDS - 3 <= served_down[pid] <= BURST + RATE * SECONDS + 1, (pid, served_down)
        assert {answer for answer in answers if answer[0] != 200} == {(429, "1")}  # never a 503
    # both workers served a burst of their own: more than the shared limit would allow
    assert sum(served_down.values()) > BURST + RATE * SECONDS + 1
    assert len(log_events(broker.output(), "ratelimit.local")) == 2  # once per worker, not per request
    assert len(log_events(broker.output(), "ratelimit.shared_again")) == 2

    served_up = sum(1 for answers in up.values() for status, _ in answers if status == 200)
    assert served_up <= BURST + RATE * 1.0 + 2  # shared again: one burst for the fleet
