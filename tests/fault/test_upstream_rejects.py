"""Issue 4, point 2: the authorization server says no (spec §3.3, §4.7).

A terminal refusal answers 502 `upstream_rejected` with `upstream_error`/`upstream_status` and is
remembered per (credential, scope set) for `negative_ttl_seconds`, in every worker and in Redis:
1,000 requests for a misconfigured credential cost the authorization server a handful of
requests, not 1,000. Once the refusal is forgotten, the broker asks again, once.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.conftest import WRITE, StartBrokers
from tests.fault.conftest import get_token
from tests.integration.workers import pin_connections
from tests.support import AuthServerProcess

pytestmark = pytest.mark.slow

NEGATIVE_TTL = 3.0


def assert_rejected(response: httpx.Response) -> None:
    assert response.status_code == 502, response.text
    body = response.json()
    assert body["error"] == "upstream_rejected", body
    assert body["upstream_error"] == "invalid_client", body
    assert body["upstream_status"] == 401, body
    assert "Retry-After" not in response.headers


async def test_a_thousand_requests_for_a_refused_credential_cost_a_handful_of_upstream_requests(
    write_config: Callable[..., Path], authserver: AuthServerProcess, start_brokers: StartBrokers
) -> None:
    (broker,) = start_brokers(write_config(), env={"BROKER_CACHE_NEGATIVE_TTL_SECONDS": str(NEGATIVE_TTL)})
    authserver.configure(fault="invalid_client")  # forever
    async with contextlib.AsyncExitStack() as stack:
        pinned = await pin_connections(broker, 10, stack)  # 10 connections on each of the 2 workers
        clients = [client for clients in pinned.values() for client in clients]

        async def batch() -> list[httpx.Response]:
            return await asyncio.gather(*(get_token(client) for client in clients))

        started = time.monotonic()
        responses = [response for _ in range(1000 // len(clients)) for response in await batch()]
        took = time.monotonic() - started
        assert len(responses) == 1000
        for response in responses:
            assert_rejected(response)
        upstream = authserver.token_requests()
        assert 1 <= upstream <= 5, f"{upstream} upstream requests for 1,000 refused requests in {took:.1f} s"

        # once the refusal is forgotten (in both workers and in Redis), the broker asks again,
        # once for the whole burst, and remembers the new answer
        last_asked = authserver.stats()["requests"][-1]["t"]
        await asyncio.sleep(max(0.0, last_asked + NEGATIVE_TTL + 0.3 - time.time()))
        for response in await batch():
            assert_rejected(response)
        assert authserver.token_requests() == upstream + 1
        for response in await batch():
            assert_rejected(response)
        assert authserver.token_requests() == upstream + 1

        # a refusal for one scope set says nothing about another
        other = await get_token(clients[0], WRITE)
        assert_rejected(other)
        assert authserver.token_requests() == upstream + 2
