"""The upstream client against the real test authorization server: whatever goes wrong in the
exchange reaches the caller as an UpstreamError, and the circuit breaker's half-open probe is
settled whatever the attempt ends in, cancellation included (hardening issue item 3)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import httpx
import pytest

from broker.errors import UpstreamError, UpstreamInvalidResponse, UpstreamUnavailable
from broker.secret import Secret
from broker.settings import UpstreamSettings
from broker.upstream.breaker import BreakerState
from broker.upstream.client import UpstreamClient
from broker.upstream.exchange import new_http_client
from broker.vault.models import CredentialSettings
from tests.conftest import READ
from tests.support import CLIENT_ID, CLIENT_SECRET, AuthServerProcess

# discovery_ttl 0: every attempt discovers, so a broken discovery document can meet the probe
SETTINGS = UpstreamSettings(max_attempts=1, breaker_failures=1, breaker_cooldown_seconds=0.2, discovery_ttl_seconds=0)


@pytest.fixture
async def upstream() -> AsyncIterator[UpstreamClient]:
    async with new_http_client(SETTINGS) as http:
        yield UpstreamClient(http, SETTINGS, default_expires_in=300)


def credential(authserver: AuthServerProcess, *, discovered: bool = False) -> CredentialSettings:
    where = {"issuer": authserver.url} if discovered else {"token_url": authserver.token_url}
    return CredentialSettings(name="payments", client_id=CLIENT_ID, client_secrets=(Secret(CLIENT_SECRET),), **where)


def deadline(seconds: float = 5.0) -> float:
    return time.monotonic() + seconds


async def open_circuit(upstream: UpstreamClient, authserver: AuthServerProcess, cred: CredentialSettings) -> None:
    """One transient failure opens it (breaker_failures=1); then wait out the cool-down."""
    authserver.configure(fault="503")
    with pytest.raises(UpstreamUnavailable):
        await upstream.fetch(cred, READ, deadline())
    assert upstream.breaker(cred.name).state is BreakerState.OPEN
    await asyncio.sleep(SETTINGS.breaker_cooldown_seconds + 0.05)


async def test_a_cancelled_probe_gives_its_slot_back(upstream: UpstreamClient, authserver: AuthServerProcess) -> None:
    """Defect: a half-open probe whose task was cancelled (shutdown, a cancelled refresh) kept
    the probe slot, so every later request for the credential was refused as "circuit open"."""
    cred = credential(authserver)
    await open_circuit(upstream, authserver, cred)
    authserver.configure(fault="none", delay=5)
    probe = asyncio.create_task(upstream.fetch(cred, READ, deadline(10)))
    while authserver.token_requests() < 2:  # the probe has reached the server
        await asyncio.sleep(0.02)
    probe.cancel()
    with pytest.raises(asyncio.CancelledError):
        await probe

    authserver.configure(delay=0)
    token = await upstream.fetch(cred, READ, deadline())
    assert token.scope == READ
    assert authserver.token_requests() == 3
    assert upstream.breaker(cred.name).state is BreakerState.CLOSED


@pytest.mark.parametrize(
    ("config", "words"),
    [
        ({"fault": "bad_gzip"}, "Content-Encoding"),
        ({"discovery_fault": "bad_gzip"}, "discovery endpoint sent a body that cannot be decoded"),
        ({"discovery_fault": "nested"}, "nested too deeply"),
    ],
    ids=["token-bad-gzip", "discovery-bad-gzip", "discovery-nested"],
)
async def test_an_unreadable_answer_on_the_probe_is_invalid_response_and_closes_the_circuit(
    upstream: UpstreamClient, authserver: AuthServerProcess, config: dict[str, str], words: str
) -> None:
    """Defect: httpx.DecodingError and RecursionError escaped fetch (callers got 500) and, on the
    half-open probe, kept its slot for ever. Now: 502 upstream_invalid_response, and the circuit
    closes, since the server answered (malformed answers never open it either)."""
    cred = credential(authserver, discovered=True)
    await open_circuit(upstream, authserver, cred)
    authserver.configure(**{"fault": "none", **config})
    with pytest.raises(UpstreamInvalidResponse, match=words) as caught:
        await upstream.fetch(cred, READ, deadline())
    assert caught.value.__cause__ is not None  # the original is kept, chained
    assert upstream.breaker(cred.name).state is BreakerState.CLOSED

    authserver.configure(fault="none", discovery_fault="none")
    assert (await upstream.fetch(cred, READ, deadline())).scope == READ


async def test_exceptions_from_below_the_exchange_become_upstream_errors(authserver: AuthServerProcess) -> None:
    """Anything the HTTP layer raises, known or not, reaches the caller from the error tree."""
    failures: list[BaseException] = [
        httpx.DecodingError("broken"),
        httpx.TooManyRedirects("loop"),
        httpx.ReadTimeout("slow"),
        httpx.ConnectError("refused"),
        RuntimeError("a bug in a library"),
        RecursionError("deep"),
        UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"),
    ]
    for failure in failures:

        def handler(request: httpx.Request, failure: BaseException = failure) -> httpx.Response:
            raise failure

        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
            upstream = UpstreamClient(http, SETTINGS, default_expires_in=300)
            with pytest.raises(UpstreamError) as caught:
                await upstream.fetch(credential(authserver), READ, deadline())
        expected = UpstreamUnavailable if isinstance(failure, httpx.TransportError) else UpstreamInvalidResponse
        assert type(caught.value) is expected, (failure, caught.value)
        assert caught.value.__cause__ is failure
        assert caught.value.description.endswith("."), caught.value.description
