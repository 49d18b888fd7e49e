"""A remembered refusal is an upstream error like any other: a still-valid token beats it
(spec §3.3, §4.7).

After the authorization server refused a credential (say its secret was rotated there while the
tokens it issued are still valid), `min_ttl` callers keep getting the cached token while it is
valid, for the whole negative-cache window; the refusal still spares the server more requests.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.conftest import READ, StartBrokers
from tests.fault.conftest import get_token, until
from tests.support import AuthServerProcess

pytestmark = pytest.mark.slow

# Lifetime 8 s, no skew: cached for all 8 s; after 4.3 s less than half of it is left (min_ttl asks
# for at most half a lifetime), and it stays valid for the rest of the test. The refusal is
# remembered for 5 s (the default negative_ttl_seconds).
ENV = {"BROKER_CACHE_SKEW_SECONDS": "0"}
LATE_REFRESH = {**ENV, "BROKER_CACHE_REFRESH_AT": "0.95,0.99"}
EARLY_REFRESH = {**ENV, "BROKER_CACHE_REFRESH_AT": "0.3,0.35"}  # due 2.4-2.8 s after issue


def assert_cached(response: httpx.Response, token: str) -> None:
    assert response.status_code == 200, response.text
    assert response.json()["access_token"] == token


async def warm(client: httpx.AsyncClient, authserver: AuthServerProcess) -> tuple[str, float]:
    """The token cached, and a time by which it was surely issued (ages below are at least that)."""
    authserver.configure(lifetime=8)
    response = await get_token(client)
    assert response.status_code == 200, response.text
    token: str = response.json()["access_token"]
    return token, time.monotonic()


async def test_min_ttl_requests_after_a_refusal_get_the_still_valid_token(
    write_config: Callable[..., Path], authserver: AuthServerProcess, start_brokers: StartBrokers
) -> None:
    """Defect (hardening item 8): `raise_if_known_here` ran outside the `try` that falls back to a
    still-valid token, so after one refusal every `min_ttl` request got 502 `upstream_rejected`
    for the whole negative-cache window although a valid token was cached."""
    (broker,) = start_brokers(write_config(), workers=1, env=LATE_REFRESH)
    async with httpx.AsyncClient(base_url=broker.url, timeout=15, trust_env=False) as client:
        token, issued = await warm(client, authserver)
        await asyncio.sleep(max(0.0, issued + 4.3 - time.monotonic()))
        authserver.configure(fault="invalid_client")  # the secret was rotated at the server
        for _ in range(4):
            assert_cached(await get_token(client, READ, min_ttl=3600), token)
    assert authserver.token_requests() == 2  # the warm-up, then one refusal, remembered


async def test_a_refused_background_refresh_does_not_make_min_ttl_requests_fail(
    write_config: Callable[..., Path], authserver: AuthServerProcess, start_brokers: StartBrokers
) -> None:
    """Defect (hardening item 8), via refresh-ahead: a background refresh that the authorization
    server refused armed the same trap; the `min_ttl` requests that followed got 502 although the
    cached token was still valid."""
    (broker,) = start_brokers(write_config(), workers=1, env=EARLY_REFRESH)
    async with httpx.AsyncClient(base_url=broker.url, timeout=15, trust_env=False) as client:
        token, issued = await warm(client, authserver)
        authserver.configure(fault="invalid_client")
        await asyncio.sleep(max(0.0, issued + 2.9 - time.monotonic()))
        assert_cached(await get_token(client), token)  # past the refresh point: a refresh starts
        await until(lambda: authserver.token_requests() == 2, 5, "the background refresh")
        await asyncio.sleep(max(0.0, issued + 4.3 - time.monotonic()))
        for _ in range(4):
            assert_cached(await get_token(client, READ, min_ttl=3600), token)
    assert authserver.token_requests() == 2  # the refusal is remembered: the server is not asked again
