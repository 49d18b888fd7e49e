"""Redis Sentinel (spec §7.4): a broker (2 workers) on `redis+sentinel://…/mymaster`, and the master
killed with SIGKILL while traffic flows.

The sentinel (quorum 1, down-after 1 s) promotes the replica. Throughout, every request is answered
(L1 copies while Redis is unreachable, then L2 from the promoted replica, which has the token by
replication); afterwards a new key is cached in the new master and an invalidation reported to one
worker reaches the other over the re-established subscription. No restart; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import pytest

from broker.store import Keys
from tests.conftest import READ, WRITE, StartBrokers, auth, config_text
from tests.support import AuthServerProcess, token_keys
from tests.topology.servers import RedisProcess, burst_through_small_pool, pin_every_worker, start_sentinel_group

pytestmark = pytest.mark.slow

TOKENS = "/v1/tokens/payments"
INVALIDATE = "/v1/tokens/payments/invalidate"
SERVICE = "mymaster"


async def wait_for(what: str, check: object, seconds: float) -> float:
    """Poll the zero-argument callable `check` until true; the time it took, or fail naming `what`."""
    assert callable(check)
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > seconds:
            raise AssertionError(f"{what}: not within {seconds} s")
        await asyncio.sleep(0.05)
    return time.monotonic() - started


async def _redis_ok(client: httpx.AsyncClient) -> bool:
    return bool((await client.get("/readyz")).json().get("redis") == "ok")


async def wait_for_async(what: str, check: Callable[[], Awaitable[bool]], seconds: float) -> None:
    started = time.monotonic()
    while not await check():
        if time.monotonic() - started > seconds:
            raise AssertionError(f"{what}: not within {seconds} s")
        await asyncio.sleep(0.05)


async def test_sentinel_failover_during_traffic(
    tmp_path: Path,
    redis_processes: list[RedisProcess],
    authserver: AuthServerProcess,
    start_brokers: StartBrokers,
) -> None:
    master, replica, sentinel = start_sentinel_group(redis_processes, SERVICE)
    config = tmp_path / "broker.toml"
    url = f"redis+sentinel://127.0.0.1:{sentinel.port}/{SERVICE}"
    config.write_text(config_text(url, authserver), encoding="utf-8")
    await burst_through_small_pool(url)  # the sentinel-managed pool waits for a connection too
    (broker,) = start_brokers(config, count=1, workers=2)
    read_key, write_key = token_keys(config, "payments", READ).token, token_keys(config, "payments", WRITE).token

    async with contextlib.AsyncExitStack() as stack:
        pinned = await pin_every_worker(broker, per_worker=1, stack=stack)
        workers = [clients[0] for clients in pinned.values()]
        results: list[tuple[float, int, str | None]] = []  # (latency, status, token)
        stop = asyncio.Event()

        async def traffic(client: httpx.AsyncClient) -> None:
            while not stop.is_set():
                started = time.monotonic()
                response = await client.get(TOKENS, params={"scope": READ}, headers=auth())
                token = response.json().get("access_token") if response.status_code == 200 else None
                results.append((time.monotonic() - started, response.status_code, token))
                await asyncio.sleep(0.02)

        loops = [asyncio.create_task(traffic(client)) for client in workers]
        try:
            await wait_for("traffic flows", lambda: len(results) >= 20, 10)
            with replica.client() as direct:  # replicated before the kill, so no write is lost
                await wait_for("token replicated", lambda: direct.exists(read_key), 5)

            master.kill()
            killed = time.monotonic()
            with sentinel.client() as s:
                promoted = await wait_for(
                    "sentinel promotes the replica",
                    lambda: int(s.execute_command("SENTINEL GET-MASTER-ADDR-BY-NAME", SERVICE)[1]) == replica.port,
                    20,
                )
            during = len(results)

            # A key never seen before: cached in the new master (retried while the broker notices).
            async def new_key_cached() -> bool:
                response = await workers[0].get(TOKENS, params={"scope": WRITE}, headers=auth())
                assert response.status_code == 200, response.text
                with replica.client() as direct:
                    return bool(direct.exists(write_key))

            deadline = time.monotonic() + 10
            while not await new_key_cached():
                assert time.monotonic() < deadline, "no token cached in the new master within 10 s"
                await asyncio.sleep(0.1)
            cached_after = time.monotonic() - killed

            # Both workers subscribe again, at the new master.
            with replica.client() as direct:
                await wait_for(
                    "workers subscribed at the new master",
                    lambda: direct.pubsub_numsub(Keys().events)[0][1] == 2,
                    10,
                )
            await asyncio.sleep(0.5)
        finally:
            stop.set()
            await asyncio.gather(*loops)

        statuses = [status for _, status, _ in results]
        read_tokens = [token for _, _, token in results]
        assert statuses == [200] * len(results), f"not every request was answered: {set(statuses)}"
        # Usually one token throughout (L1, then L2 from the promoted replica). A worker whose
        # subscription returns while the store still fails fast (its 1 s back-off after the outage)
        # starts from an empty L1 and fetches in-process: at most one more token per worker.
        distinct = len(set(read_tokens))
        assert distinct <= 1 + len(workers), f"{distinct} tokens for one key across one failover"

        # Once both workers see Redis again, an invalidation reported to one reaches the other
        # through the new master. A scope set not used so far, so both start from the same L2 entry.
        both = f"{READ} {WRITE}"
        for client in workers:
            await wait_for_async("worker ready again", lambda c=client: _redis_ok(c), 5)
        first = (await workers[0].get(TOKENS, params={"scope": both}, headers=auth())).json()["access_token"]
        second = (await workers[1].get(TOKENS, params={"scope": both}, headers=auth())).json()["access_token"]
        assert second == first
        report = await workers[0].post(INVALIDATE, json={"access_token": first, "scope": both}, headers=auth())
        assert report.status_code == 204
        started = time.monotonic()
        while True:
            response = await workers[1].get(TOKENS, params={"scope": both}, headers=auth())
            if response.json()["access_token"] != first or time.monotonic() - started > 1.0:
                break
            await asyncio.sleep(0.02)
        assert response.json()["access_token"] != first, "the other worker still serves the invalidated token"

    slowest = max(latency for latency, _, _ in results)
    print(
        f"\nsentinel failover: promoted {promoted:.1f} s after SIGKILL; {len(results)} requests all 200"
        f" ({during} before promotion), slowest {slowest * 1000:.0f} ms; new key cached in the new master"
        f" {cached_after:.1f} s after the kill; {distinct} distinct token(s) for the key in steady use;"
        f" upstream requests {authserver.token_requests()}"
    )
