"""Hardening issue, item 3: every failure of the upstream exchange is an UpstreamError.

An answer the broker cannot even read (a 200 whose gzip body is not gzip, a discovery document
nested thousands of levels deep) used to escape the upstream client as httpx.DecodingError or
RecursionError. That skipped the "a valid token beats an error" fallback (500 although a token
was cached) and, on a half-open probe, left the circuit breaker's probe slot taken for good.
Real processes throughout: `token-broker serve`, the test authorization server, Redis.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import pytest

from tests.conftest import READ, WRITE, StartBrokers, auth
from tests.fault.conftest import get_token, keys
from tests.support import AuthServerProcess, token_keys

pytestmark = pytest.mark.slow

# One attempt per fetch; the refresh-ahead point late in the window, so no background refresh runs.
ONE_ATTEMPT = {"BROKER_UPSTREAM_MAX_ATTEMPTS": "1", "BROKER_CACHE_REFRESH_AT": "0.95,0.99"}
LEDGER = "/v1/tokens/ledger"  # the credential with an `issuer`: its token endpoint is discovered


def assert_invalid(response: httpx.Response, *words: str) -> None:
    """502 upstream_invalid_response with a sentence that says what was wrong."""
    assert response.status_code == 502, response.text
    body = response.json()
    assert body["error"] == "upstream_invalid_response", body
    description = body["error_description"]
    assert description.endswith("."), description
    for word in words:
        assert word in description, description


async def warm(get: Callable[[], Awaitable[httpx.Response]], authserver: AuthServerProcess) -> str:
    """A token of 8 s with less than half of it left, valid for ~1.7 s more: from now on
    min_ttl=3600 forces a fetch (min_ttl asks for at most half a lifetime)."""
    authserver.configure(lifetime=8)
    response = await get()
    assert response.status_code == 200, response.text
    await asyncio.sleep(4.3)
    token: str = response.json()["access_token"]
    return token


async def test_an_undecodable_token_answer_gives_the_cached_token_or_502_never_500(
    write_config: Callable[..., Path], redis_url: str, authserver: AuthServerProcess, start_brokers: StartBrokers
) -> None:
    """Defect: httpx.DecodingError (a 200 with `Content-Encoding: gzip` and a body that is not
    gzip) escaped UpstreamClient.fetch, skipped the `except UpstreamError` fallback in tokens.py and
    answered 500, although a valid token was cached; without one it was 500 instead of 502."""
    config = write_config()
    (broker,) = start_brokers(config, workers=1, env=ONE_ATTEMPT)
    async with httpx.AsyncClient(base_url=broker.url, timeout=15, trust_env=False) as client:
        token = await warm(lambda: get_token(client, READ), authserver)
        authserver.configure(fault="bad_gzip")  # forever

        for _ in range(2):
            before = authserver.token_requests()
            fallback = await get_token(client, READ, min_ttl=3600)
            assert fallback.status_code == 200, fallback.text
            assert fallback.json()["access_token"] == token
            assert authserver.token_requests() == before + 1  # it did ask, and fell back

        assert_invalid(await get_token(client, WRITE), "Content-Encoding")  # nothing cached for it
        assert keys(redis_url, "tb:*:tok:*") == [token_keys(config, "payments", READ).token]

        authserver.configure(fault="none")
        assert (await get_token(client, WRITE)).status_code == 200


async def test_a_broken_discovery_document_gives_the_cached_token_or_502_never_500(
    write_config: Callable[..., Path], redis_url: str, authserver: AuthServerProcess, start_brokers: StartBrokers
) -> None:
    """Defect: a discovery document nested thousands of levels deep made json.loads raise
    RecursionError (only ValueError was caught), and a discovery answer with a broken
    Content-Encoding raised httpx.DecodingError: both escaped as 500, cached token or not."""
    # discovery_ttl 0: every fetch discovers again, so a broken document also meets a cached token
    env = {**ONE_ATTEMPT, "BROKER_UPSTREAM_DISCOVERY_TTL_SECONDS": "0"}
    (broker,) = start_brokers(write_config(), workers=1, env=env)
    async with httpx.AsyncClient(base_url=broker.url, timeout=15, trust_env=False) as client:

        async def ledger(**params: object) -> httpx.Response:
            return await client.get(LEDGER, params={"scope": READ, **params}, headers=auth())

        for fault, words in [("nested", ("discovery", "nested")), ("bad_gzip", ("discovery", "Content-Encoding"))]:
            authserver.configure(discovery_fault=fault)
            assert_invalid(await ledger(), *words)
        assert authserver.stats()["discovery_requests"] == 2
        assert authserver.token_requests() == 0
        assert keys(redis_url, "tb:*:tok:*") == []

        authserver.configure(discovery_fault="none")
        token = await warm(ledger, authserver)
        for fault in ("nested", "bad_gzip"):
            authserver.configure(discovery_fault=fault)
            discoveries = authserver.stats()["discovery_requests"]
            fallback = await ledger(min_ttl=3600)
            assert fallback.status_code == 200, fallback.text
            assert fallback.json()["access_token"] == token
            assert authserver.stats()["discovery_requests"] == discoveries + 1


async def test_a_probe_that_meets_an_undecodable_answer_does_not_jam_the_circuit(
    write_config: Callable[..., Path], authserver: AuthServerProcess, start_brokers: StartBrokers
) -> None:
    """Defect: the half-open probe's slot (`_probing`) was given back only by record_success or
    record_failure. A probe that ended in anything else (here httpx.DecodingError) kept it, so
    that worker answered 503 "circuit open" for the credential for ever, with zero upstream
    calls, long after the authorization server had recovered."""
    env = {
        **ONE_ATTEMPT,
        "BROKER_UPSTREAM_BREAKER_FAILURES": "2",
        "BROKER_UPSTREAM_BREAKER_COOLDOWN_SECONDS": "1",
    }
    (broker,) = start_brokers(write_config(), workers=1, env=env)  # the breaker lives in a worker
    async with httpx.AsyncClient(base_url=broker.url, timeout=15, trust_env=False) as client:
        authserver.configure(fault="503")
        for _ in range(2):
            assert (await get_token(client)).status_code == 503
        circuit_open = await get_token(client)
        assert circuit_open.status_code == 503
        assert "circuit open" in circuit_open.json()["error_description"]
        assert authserver.token_requests() == 2

        await asyncio.sleep(1.2)  # past the cool-down: the next request is the half-open probe
        authserver.configure(fault="bad_gzip", fault_count=1)
        probe = await get_token(client)
        assert authserver.token_requests() == 3

        # the server has recovered; whatever the probe did, the circuit must not stay open
        await asyncio.sleep(2.2)  # past even a doubled cool-down
        recovered = [await get_token(client, scope) for scope in (READ, WRITE, READ)]
        statuses = [(response.status_code, response.json().get("error")) for response in recovered]
        assert statuses == [(200, None)] * 3, f"{statuses}; upstream calls: {authserver.token_requests() - 3}"
        assert authserver.token_requests() == 5  # READ and WRITE fetched, then READ from the cache

    # the probe got an answer it could not read: that is an invalid response, not a 500
    assert_invalid(probe, "Content-Encoding")
