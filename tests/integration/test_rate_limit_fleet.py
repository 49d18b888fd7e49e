"""A caller's rate limit across a fleet (spec §6.6): two broker processes of two workers each on
one Redis. A caller at 10/s with a burst of 10 hammering all four workers gets 10 requests per
second in total, whichever worker answers; the rest are 429 `rate_limited` with Retry-After;
another caller hammering alongside is never refused.

The tolerance comes from the design (broker/ratelimit.py): below 40/s a worker takes one unit of
the Redis GCRA per request and holds none, so the fleet admits exactly what the GCRA grants, at
most burst + rate * t (+1 for the GCRA's rounding) over a window of t seconds. Under continuous
demand a unit is taken within milliseconds of coming free, and one not taken accrues in the GCRA
(up to the burst) instead of being lost, so at least burst + rate * t - 3: the last units may come
free after the last request was sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.api.test_rate_limits import limited, limited_caller
from tests.conftest import READ, StartBrokers, auth
from tests.integration.workers import pin_connections
from tests.support import AuthServerProcess

pytestmark = pytest.mark.slow

RATE, BURST = 10, 10
SECONDS = 5.0
TOKENS = "/v1/tokens/payments"


async def test_a_caller_at_10_per_second_gets_10_per_second_from_the_whole_fleet(
    write_config: Callable[..., Path], authserver: AuthServerProcess, start_brokers: StartBrokers
) -> None:
    brokers = start_brokers(write_config(limited_caller(RATE, BURST)), count=2, workers=2)
    async with contextlib.AsyncExitStack() as stack:
        pinned = [await pin_connections(broker, 2, stack) for broker in brokers]
        workers = [clients for by_pid in pinned for clients in by_pid.values()]
        assert len(workers) == 4
        # every worker's L1 holds the token (asked by the unlimited caller: the limit stays whole)
        for clients in workers:
            assert (await clients[0].get(TOKENS, params={"scope": READ}, headers=auth())).status_code == 200
        assert authserver.token_requests() == 1

        limited_answers: list[tuple[float, int, str | None]] = []
        other_answers: list[int] = []
        started = time.monotonic()
        stop = started + SECONDS

        async def hammer(client: httpx.AsyncClient) -> None:
            while time.monotonic() < stop:
                response = await client.get(TOKENS, params={"scope": READ}, headers=limited())
                limited_answers.append((time.monotonic(), response.status_code, response.headers.get("retry-after")))
                if response.status_code == 429:
                    assert response.json()["error"] == "rate_limited"

        others = [
            await stack.enter_async_context(httpx.AsyncClient(base_url=broker.url, timeout=30, trust_env=False))
            for broker in brokers
        ]

        async def other(client: httpx.AsyncClient) -> None:
            while time.monotonic() < stop:
                other_answers.append((await client.get(TOKENS, params={"scope": READ}, headers=auth())).status_code)
                await asyncio.sleep(0.02)

        await asyncio.gather(
            *(hammer(client) for clients in workers for client in clients),
            *(other(client) for client in others),
        )
        window = max(at for at, _, _ in limited_answers) - started

    served = [at - started for at, status, _ in limited_answers if status == 200]
    refused = [(status, retry) for _, status, retry in limited_answers if status != 200]
    per_second = Counter(int(at) for at in served if at < SECONDS)
    steady = (len(served) - BURST) / SECONDS
    print(
        f"\nrate limit across 2 brokers x 2 workers, {RATE}/s burst {BURST}, {SECONDS:g} s:"
        f" {len(served)} of {len(limited_answers)} requests served ({steady:.2f}/s after the burst),"
        f" per second {[per_second[s] for s in range(int(SECONDS))]}; other caller {len(other_answers)} all 200"
    )
    assert BURST + RATE * SECONDS - 3 <= len(served) <= BURST + RATE * window + 1
    assert len(refused) > 10 * len(served)  # it really hammered
    assert set(refused) == {(429, "1")}  # the next unit is never more than 100 ms away
    assert other_answers
    assert set(other_answers) == {200}
    assert authserver.token_requests() == 1
