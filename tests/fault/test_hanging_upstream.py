"""A hanging authorization server: a valid cached token still beats the error (spec §3.3, §4.5).

One deadline per request, taken when it arrives: when it runs out while the upstream hangs, a
caller whose `min_ttl` the cached token cannot meet gets that still-valid token, exactly as when
the upstream answers an error at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.conftest import READ, StartBrokers
from tests.fault.conftest import get_token
from tests.support import AuthServerProcess

pytestmark = pytest.mark.slow

# Lifetime 8 s, no skew: cached for all 8 s. After 4.3 s it has less than half its life left
# (min_ttl asks for at most half a lifetime) and is still valid past a 2 s deadline. The
# refresh-ahead point late (7.6-7.9 s), so no background refresh runs meanwhile.
HANGING = {
    "BROKER_CACHE_SKEW_SECONDS": "0",
    "BROKER_SERVER_REQUEST_DEADLINE_SECONDS": "2",
    "BROKER_CACHE_REFRESH_AT": "0.95,0.99",
}


async def cached_then_hanging(client: httpx.AsyncClient, authserver: AuthServerProcess) -> str:
    authserver.configure(lifetime=8)
    warm = await get_token(client)
    assert warm.status_code == 200, warm.text
    await asyncio.sleep(4.3)
    authserver.configure(delay=30)  # answers long after any deadline
    token: str = warm.json()["access_token"]
    return token


def assert_cached(response: httpx.Response, token: str) -> None:
    assert response.status_code == 200, response.text
    assert response.json()["access_token"] == token
    assert 0 < response.json()["expires_in"] <= 4


async def test_min_ttl_gets_the_still_valid_token_when_the_upstream_hangs(
    write_config: Callable[..., Path], authserver: AuthServerProcess, start_brokers: StartBrokers
) -> None:
    """Defect (hardening item 4): the outer `asyncio.timeout` in `TokenService.get` started before
    the L2 read and the flight's deadline later, so for a `min_ttl` request the outer timeout fired
    first and the still-valid fallback never ran: 503 after the deadline when the authorization
    server hung, though it answered 200 at once when the server said 503."""
    (broker,) = start_brokers(write_config(), workers=1, env=HANGING)
    async with httpx.AsyncClient(base_url=broker.url, timeout=15, trust_env=False) as client:
        token = await cached_then_hanging(client, authserver)
        asked = authserver.token_requests()
        assert_cached(await get_token(client, READ, min_ttl=3600), token)
        assert authserver.token_requests() == asked + 1  # it did ask for a longer-lived token


async def test_concurrent_callers_joining_a_hanging_fetch_all_get_the_still_valid_token(
    write_config: Callable[..., Path], authserver: AuthServerProcess, start_brokers: StartBrokers
) -> None:
    """Defect (hardening item 4), callers that join the same hanging fetch: each must get the
    still-valid token when the deadline runs out, not 503."""
    (broker,) = start_brokers(write_config(), workers=1, env=HANGING)
    async with httpx.AsyncClient(base_url=broker.url, timeout=15, trust_env=False) as client:
        token = await cached_then_hanging(client, authserver)
        asked = authserver.token_requests()

        async def late(delay: float) -> httpx.Response:
            await asyncio.sleep(delay)  # joins the fetch that is already hanging
            return await get_token(client, READ, min_ttl=3600)

        responses = await asyncio.gather(*(late(0.0) for _ in range(4)), *(late(0.5) for _ in range(2)))
    assert [response.status_code for response in responses] == [200] * 6, [r.text for r in responses]
    for response in responses:
        assert_cached(response, token)
    assert authserver.token_requests() == asked + 1  # one fetch for all of them
