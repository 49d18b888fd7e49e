"""Three broker replicas on one (standalone) Redis, no load balancer: the test spreads the requests
(issue 5 point 6, spec §4.3-§4.5).

Token lifetime 6 s, skew 0.5 s → cached window W = 5.5 s; refresh-ahead at a uniform fraction in
[0.85, 0.95] of W, i.e. 4.7-5.2 s after each fetch. Under steady traffic to all replicas for
T ≈ 12 s (two lifetimes) the fleet makes one upstream request per refresh interval, as one process
would, never one per replica:

    upstream requests <= 1 + floor(T / (0.85 * W))   (= 3 for T = 12 s; three uncoordinated
    replicas would make at least 3 at the start alone), and consecutive ones >= 0.85 * W apart.

Then an invalidation reported to one replica (another key, long-lived tokens): every worker of
every replica serves the new token within a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.conftest import READ, WRITE, StartBrokers, auth
from tests.support import AuthServerProcess
from tests.topology.servers import pin_every_worker

pytestmark = pytest.mark.slow

TOKENS = "/v1/tokens/payments"
INVALIDATE = "/v1/tokens/payments/invalidate"
LIFETIME, SKEW, REFRESH_LOW, REFRESH_HIGH = 6, 0.5, 0.85, 0.95
WINDOW = LIFETIME - min(SKEW, LIFETIME / 4)
RUN_SECONDS = 2 * LIFETIME
REPLICAS, WORKERS = 3, 2


async def test_three_replicas_one_upstream_request_per_lifetime_and_shared_invalidation(
    write_config: Callable[..., Path], authserver: AuthServerProcess, start_brokers: StartBrokers
) -> None:
    env = {"BROKER_CACHE_SKEW_SECONDS": str(SKEW), "BROKER_CACHE_REFRESH_AT": f"{REFRESH_LOW},{REFRESH_HIGH}"}
    brokers = start_brokers(write_config(), count=REPLICAS, workers=WORKERS, env=env)
    authserver.configure(lifetime=LIFETIME)

    # 1. Steady traffic spread over the replicas (two loops per replica, a request every 50 ms each).
    served: list[tuple[int, str]] = []
    async with contextlib.AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(httpx.AsyncClient(base_url=b.url, timeout=10, trust_env=False))
            for b in brokers
        ]
        stop = time.monotonic() + RUN_SECONDS

        async def loop(index: int) -> None:
            while time.monotonic() < stop:
                response = await clients[index].get(TOKENS, params={"scope": READ}, headers=auth())
                assert response.status_code == 200, response.text
                served.append((index, response.json()["access_token"]))
                await asyncio.sleep(0.05)

        await asyncio.gather(*(loop(i % REPLICAS) for i in range(2 * REPLICAS)))

    fetches = [r["t"] for r in authserver.stats()["requests"]]
    gaps = [later - earlier for earlier, later in itertools.pairwise(fetches)]
    bound = 1 + math.floor(RUN_SECONDS / (REFRESH_LOW * WINDOW))
    per_replica = Counter(index for index, _ in served)
    tokens = {token for _, token in served}
    print(
        f"\n{REPLICAS} replicas x {WORKERS} workers, {len(served)} requests over {RUN_SECONDS} s"
        f" (per replica {sorted(per_replica.values())}), token lifetime {LIFETIME} s:"
        f" {len(fetches)} upstream requests (bound {bound}), gaps {[round(g, 2) for g in gaps]} s,"
        f" {len(tokens)} distinct tokens served"
    )
    assert set(per_replica) == set(range(REPLICAS))
    assert 2 <= len(fetches) <= bound  # at least one refresh-ahead happened; never one per replica
    assert all(gap >= REFRESH_LOW * WINDOW - 0.1 for gap in gaps), gaps
    assert len(tokens) in (len(fetches), len(fetches) - 1)  # the newest may not have been served yet

    # 2. Invalidation reported to one replica: every worker of every replica drops its L1 copy.
    # Another scope set (its own key) with long-lived tokens: no refresh-ahead interferes.
    authserver.configure(lifetime=3600)
    async with contextlib.AsyncExitStack() as stack:
        pinned = [await pin_every_worker(b, per_worker=1, stack=stack) for b in brokers]
        workers = [clients[0] for per_broker in pinned for clients in per_broker.values()]
        assert len(workers) == REPLICAS * WORKERS

        async def tokens_now() -> list[str]:
            responses = await asyncio.gather(*(w.get(TOKENS, params={"scope": WRITE}, headers=auth()) for w in workers))
            return [r.json()["access_token"] for r in responses]

        await tokens_now()
        current = await tokens_now()  # the second round comes from every worker's L1
        assert len(set(current)) == 1, current
        (old,) = set(current)
        before = authserver.token_requests()

        started = time.monotonic()
        report = await workers[WORKERS].post(INVALIDATE, json={"access_token": old, "scope": WRITE}, headers=auth())
        assert report.status_code == 204
        while True:
            now_serving = await tokens_now()
            elapsed = time.monotonic() - started
            if old not in now_serving or elapsed > 1.0:
                break
            await asyncio.sleep(0.01)
        print(
            f"invalidation at replica 2: all {len(workers)} workers serve the new token after {elapsed * 1000:.0f} ms"
        )
        assert old not in now_serving, f"still serving the invalidated token after 1 s: {now_serving}"
        assert len(set(now_serving)) == 1
        assert authserver.token_requests() == before + 1
