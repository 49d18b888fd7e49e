"""Issue 4, point 1: the authorization server is down or slow (spec §3.3, §4.5, §4.7).

A caller never waits past the request deadline; a per-credential circuit breaker stops the
broker from hammering a dead server and lets one probe through after its cool-down; every
still-valid cached token keeps being served (refresh failures are invisible) until its real
expiry minus skew, and only then do callers get 503 `upstream_unavailable` with Retry-After.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.conftest import READ, WRITE, StartBrokers
from tests.fault.conftest import BOTH, get_token, log_events
from tests.support import AuthServerProcess

pytestmark = pytest.mark.slow


def assert_unavailable(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text
    assert response.json()["error"] == "upstream_unavailable", response.text
    assert int(response.headers["Retry-After"]) >= 1


async def timed(client: httpx.AsyncClient, scope: str = READ, **params: object) -> tuple[float, httpx.Response]:
    started = time.monotonic()
    response = await get_token(client, scope, **params)
    return time.monotonic() - started, response


async def test_a_caller_never_waits_longer_than_the_deadline(
    write_config: Callable[..., Path], authserver: AuthServerProcess, start_brokers: StartBrokers
) -> None:
    (broker,) = start_brokers(write_config(), env={"BROKER_SERVER_REQUEST_DEADLINE_SECONDS": "2"})
    authserver.configure(delay=10)
    async with httpx.AsyncClient(base_url=broker.url, timeout=15, trust_env=False) as client:

        async def late(delay: float, scope: str) -> tuple[float, httpx.Response]:
            await asyncio.sleep(delay)  # joins a fetch (or a lock wait) that is already under way
            return await timed(client, scope)

        results = await asyncio.gather(
            *(timed(client, scope) for scope in (READ, WRITE, BOTH) for _ in range(4)),
            *(late(1.0, scope) for scope in (READ, WRITE, BOTH)),
        )
    for elapsed, response in results:
        assert_unavailable(response)
        assert elapsed <= 2.5, f"a caller waited {elapsed:.2f} s with a 2 s deadline"
    assert authserver.token_requests() >= 1  # the upstream was really asked (and was too slow)


async def test_circuit_breaker_stops_calls_to_a_failing_server_and_recovers_without_restart(
    write_config: Callable[..., Path], authserver: AuthServerProcess, start_brokers: StartBrokers
) -> None:
    (broker,) = start_brokers(
        write_config(),
        workers=1,  # the breaker is per credential in each worker process
        env={"BROKER_UPSTREAM_BREAKER_FAILURES": "3", "BROKER_UPSTREAM_BREAKER_COOLDOWN_SECONDS": "1.5"},
    )
    authserver.configure(fault="503")  # forever, with Retry-After: 1
    async with httpx.AsyncClient(base_url=broker.url, timeout=15, trust_env=False) as client:
        # closed: three attempts (max_attempts = 3), three consecutive failures → open
        _, first = await timed(client)
        assert_unavailable(first)
        opened = time.monotonic()
        assert authserver.token_requests() == 3

        # open: nobody reaches the authorization server, every answer is immediate
        burst = await asyncio.gather(*(timed(client, scope) for scope in (READ, WRITE, BOTH) for _ in range(10)))
        for elapsed, response in burst:
            assert_unavailable(response)
            assert "circuit open" in response.json()["error_description"]
            assert elapsed < 1.0  # a request that reached upstream would wait >= 1 s (Retry-After)
        assert authserver.token_requests() == 3

        # half-open after the cool-down: one probe for the whole credential (three scope sets
        # asked concurrently); it fails, so the breaker opens again for twice as long
        await asyncio.sleep(max(0.0, opened + 1.6 - time.monotonic()))
        probes = await asyncio.gather(*(timed(client, scope) for scope in (READ, WRITE, BOTH) for _ in range(5)))
        for _, response in probes:
            assert_unavailable(response)
        reopened = time.monotonic()
        assert authserver.token_requests() == 4
        _, still_open = await timed(client)
        assert_unavailable(still_open)
        assert authserver.token_requests() == 4

        # the server recovers: after the (doubled) cool-down one probe succeeds, service is back
        authserver.configure(fault="none")
        await asyncio.sleep(max(0.0, reopened + 2.1 - time.monotonic()))
        for scope in (READ, WRITE, BOTH):  # one at a time: the first is the probe that closes it
            _, response = await timed(client, scope)
            assert response.status_code == 200, response.text
        assert authserver.token_requests() == 7  # the probe, then the other two scope sets
        for _, response in await asyncio.gather(*(timed(client, scope) for scope in (READ, WRITE, BOTH))):
            assert response.status_code == 200
        assert authserver.token_requests() == 7  # and now they are cached
    events = [event["event"] for event in log_events(broker.output())]
    assert events.count("upstream.breaker_opened") == 2
    assert events.count("upstream.breaker_closed") == 1


async def test_cached_tokens_are_served_while_upstream_is_down_until_expiry_minus_skew(
    write_config: Callable[..., Path], authserver: AuthServerProcess, start_brokers: StartBrokers
) -> None:
    # lifetime 4 s: effective skew min(30, 4/4) = 1 s, so the token may be handed out for 3 s
    # after it was issued; refresh-ahead is due at 60-80 % of that (1.8-2.4 s)
    lifetime, skew = 4.0, 1.0
    (broker,) = start_brokers(write_config(), env={"BROKER_SERVER_REQUEST_DEADLINE_SECONDS": "2"})
    authserver.configure(lifetime=int(lifetime))
    async with httpx.AsyncClient(base_url=broker.url, timeout=15, trust_env=False) as client:
        before = time.time()
        warm = await get_token(client)
        after = time.time()
        assert warm.status_code == 200
        token = warm.json()["access_token"]
        authserver.configure(fault="503")  # forever

        # the token's cached window ends somewhere in [before, after] + lifetime - skew
        earliest_end, latest_end = before + lifetime - skew, after + lifetime - skew
        samples: list[tuple[float, float, httpx.Response]] = []
        upstream_before_end = 0
        while time.time() < latest_end + 4:
            started = time.time()
            elapsed, response = await timed(client)
            samples.append((started, elapsed, response))
            if started < earliest_end - 0.3:
                upstream_before_end = authserver.token_requests()
            if started > latest_end + 0.2 and response.status_code == 503:
                break
            await asyncio.sleep(0.05)

    valid = [(s, e, r) for s, e, r in samples if s < earliest_end - 0.2]
    expired = [(s, e, r) for s, e, r in samples if s > latest_end + 0.2]
    assert len(valid) > 20
    for _, elapsed, response in valid:
        assert response.status_code == 200, response.text
        assert response.json()["access_token"] == token
        assert elapsed < 0.8, "a refresh failure became visible to a caller as latency"
    assert expired, "no request was made after the token's cached window ended"
    for _, _, response in expired:
        assert_unavailable(response)
    for _, _, response in samples:
        if response.status_code == 200:
            assert response.json()["access_token"] == token  # never anything else
    # refresh-ahead did try (and fail) while callers were served the cached token
    assert upstream_before_end > 1
    assert log_events(broker.output(), "tokens.refresh_failed")


async def warm_then_fail(client: httpx.AsyncClient, authserver: AuthServerProcess) -> str:
    """A cached token with less than half its 8 s lifetime left (min_ttl asks for at most half a
    lifetime) but still valid for another ~1.7 s, then upstream failing for good."""
    authserver.configure(lifetime=8)
    warm = await get_token(client)
    assert warm.status_code == 200
    await asyncio.sleep(4.3)
    authserver.configure(fault="503")
    token: str = warm.json()["access_token"]
    return token


def assert_still_valid_token(response: httpx.Response, token: str) -> None:
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["access_token"] == token
    assert body["expires_in"] <= 60
    assert response.headers["Cache-Control"] == "no-store"


# One attempt per fetch: the fallback shows at once instead of after two Retry-After waits; the
# refresh-ahead point late in the window, so that no background refresh runs meanwhile.
ONE_ATTEMPT = {"BROKER_UPSTREAM_MAX_ATTEMPTS": "1", "BROKER_CACHE_REFRESH_AT": "0.95,0.99"}


async def test_min_ttl_beyond_what_is_left_gets_the_still_valid_token_while_upstream_is_down(
    write_config: Callable[..., Path], authserver: AuthServerProcess, start_brokers: StartBrokers
) -> None:
    (broker,) = start_brokers(write_config(), env=ONE_ATTEMPT)
    async with httpx.AsyncClient(base_url=broker.url, timeout=15, trust_env=False) as client:
        token = await warm_then_fail(client, authserver)
        for _ in range(3):
            requests_before = authserver.token_requests()
            assert_still_valid_token(await get_token(client, READ, min_ttl=3600), token)
            # the broker did try to get a longer-lived token before falling back
            assert authserver.token_requests() == requests_before + 1

        # and when upstream is back, min_ttl is honoured again with a fresh token
        authserver.configure(fault="none", lifetime=7200)
        fresh = await get_token(client, READ, min_ttl=3600)
        assert fresh.status_code == 200, fresh.text
        assert fresh.json()["access_token"] != token
        assert fresh.json()["expires_in"] >= 3600


JOINERS_GET_NO_FALLBACK = (
    "broker/tokens.py TokenService._get_slow: a caller that joins an in-process fetch already under "
    "way (`await self.flights.join(key)`) gets that fetch's UpstreamError as it is; the still-valid "
    "fallback is only computed further down, for the caller that runs the flight. Concurrent "
    "min_ttl callers: one gets 200, the others 503."
)


async def test_concurrent_min_ttl_callers_all_get_the_still_valid_token_while_upstream_is_down(
    write_config: Callable[..., Path], authserver: AuthServerProcess, start_brokers: StartBrokers
) -> None:
    (broker,) = start_brokers(write_config(), workers=1, env=ONE_ATTEMPT)
    authserver.configure(delay=0.3)  # the failing fetch is in flight while the others arrive
    async with httpx.AsyncClient(base_url=broker.url, timeout=15, trust_env=False) as client:
        token = await warm_then_fail(client, authserver)
        responses = await asyncio.gather(*(get_token(client, READ, min_ttl=3600) for _ in range(6)))
    statuses = [response.status_code for response in responses]
    assert statuses == [200] * 6, f"statuses {statuses}"
    for response in responses:
        assert_still_valid_token(response, token)
