"""The Python SDK (broker.client, issue 12) against a real broker process, the real test
authorization server and a real resource server that accepts only the token the test says is
current (tests/resourceserver.py).

The broker connection of the SDK under test is an ordinary httpx client with an event hook that
records what was sent to the broker: how many token requests, which min_ttl, which reports.
"""

from __future__ import annotations

import asyncio
import json
import math
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import requests

from broker.client import BrokerAuth, BrokerRefused, BrokerUnavailable
from tests.conftest import ADMIN, CALLER_KEYS, READ, WRITE, StartBrokers
from tests.resourceserver import ResourceServer
from tests.support import AuthServerProcess, BrokerProcess

pytestmark = pytest.mark.slow


class BrokerCalls:
    """Every request the SDK sent to the broker, recorded by an httpx event hook."""

    def __init__(self) -> None:
        self.sent: list[httpx.Request] = []
        self._lock = threading.Lock()
        self.sync = httpx.Client(timeout=15, event_hooks={"request": [self.record]})

    def record(self, request: httpx.Request) -> None:
        with self._lock:
            self.sent.append(request)

    async def arecord(self, request: httpx.Request) -> None:
        self.record(request)

    def async_client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(timeout=15, event_hooks={"request": [self.arecord]})

    @property
    def token_requests(self) -> list[httpx.Request]:
        return [r for r in self.sent if r.method == "GET"]

    @property
    def reports(self) -> list[dict[str, str]]:
        return [json.loads(r.content) for r in self.sent if r.url.path.endswith("/invalidate")]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def broker(start_brokers: StartBrokers, write_config: Callable[..., Path]) -> BrokerProcess:
    return start_brokers(write_config(), workers=1)[0]


@pytest.fixture
def resource(authserver: AuthServerProcess) -> Iterator[ResourceServer]:
    with ResourceServer(f"{authserver.url}/jwks") as server:
        yield server


@pytest.fixture
def calls() -> Iterator[BrokerCalls]:
    recorder = BrokerCalls()
    with recorder.sync:
        yield recorder


def sdk(broker: BrokerProcess, calls: BrokerCalls, scope: str | None = READ, **options: object) -> BrokerAuth:
    return BrokerAuth(
        "payments",
        scope,
        url=broker.url,
        caller_key=CALLER_KEYS["billing"],
        client=calls.sync,
        **options,  # type: ignore[arg-type]
    )


def margin(expires_in: int, min_ttl: float = 30.0, fraction: float = 0.1) -> float:
    """The SDK's documented renewal margin for a token that arrived with `expires_in` left."""
    return min(max(min_ttl, fraction * expires_in), expires_in / 2)


def test_a_token_rotated_under_the_caller_costs_one_401_one_report_and_one_retry(
    broker: BrokerProcess, resource: ResourceServer, calls: BrokerCalls, authserver: AuthServerProcess
) -> None:
    with sdk(broker, calls) as auth, httpx.Client(auth=auth) as http:
        assert http.get(f"{resource.url}/data").status_code == 200
        old = resource.seen.accepted[-1][0]
        resource.revoked.add(old)  # the authorization server rotated it; the broker still holds it

        response = http.post(f"{resource.url}/data", content=b"payload")

    assert response.status_code == 200
    assert [r.status_code for r in response.history] == [401]
    assert resource.seen.rejected == [(old, b"payload")]
    new, body = resource.seen.accepted[-1]
    assert new != old
    assert body == b"payload"
    assert calls.reports == [{"access_token": old, "scope": READ}]
    assert len(calls.token_requests) == 2
    assert authserver.token_requests() == 2


async def test_concurrent_401s_with_one_rotated_token_cause_one_report_and_one_refresh(
    broker: BrokerProcess, resource: ResourceServer, calls: BrokerCalls, authserver: AuthServerProcess
) -> None:
    async with (
        calls.async_client() as broker_http,
        sdk(broker, calls, async_client=broker_http) as auth,
        httpx.AsyncClient(auth=auth) as http,
    ):
        assert (await http.get(f"{resource.url}/data")).status_code == 200
        old = resource.seen.accepted[-1][0]
        resource.revoked.add(old)

        responses = await asyncio.gather(*(http.get(f"{resource.url}/data") for _ in range(50)))

    assert [r.status_code for r in responses] == [200] * 50
    assert resource.seen.rejected, "the requests went out with the rotated token"
    assert {token for token, _ in resource.seen.rejected} == {old}
    assert calls.reports == [{"access_token": old, "scope": READ}]
    assert len(calls.token_requests) == 2
    assert len({token for token, _ in resource.seen.accepted[1:]}) == 1
    assert authserver.token_requests() == 2


def test_concurrent_401s_in_threads_cause_one_report_and_one_refresh(
    broker: BrokerProcess, resource: ResourceServer, calls: BrokerCalls, authserver: AuthServerProcess
) -> None:
    start = threading.Barrier(30)
    with sdk(broker, calls) as auth, httpx.Client(auth=auth, limits=httpx.Limits(max_connections=30)) as http:
        assert http.get(f"{resource.url}/data").status_code == 200
        old = resource.seen.accepted[-1][0]
        resource.revoked.add(old)

        def one(_: int) -> int:
            start.wait(timeout=30)
            return http.get(f"{resource.url}/data").status_code

        with ThreadPoolExecutor(max_workers=30) as pool:
            statuses = list(pool.map(one, range(30)))

    assert statuses == [200] * 30
    assert resource.seen.rejected, "the requests went out with the rotated token"
    assert calls.reports == [{"access_token": old, "scope": READ}]
    assert len(calls.token_requests) == 2
    assert authserver.token_requests() == 2


async def test_100_concurrent_async_requests_of_one_client_cost_one_broker_request(
    broker: BrokerProcess, resource: ResourceServer, calls: BrokerCalls, authserver: AuthServerProcess
) -> None:
    authserver.configure(delay=0.3)  # the one token request is in flight while the others pile up
    async with (
        calls.async_client() as broker_http,
        sdk(broker, calls, async_client=broker_http) as auth,
        httpx.AsyncClient(auth=auth) as http,
    ):
        responses = await asyncio.gather(*(http.get(f"{resource.url}/data") for _ in range(100)))

    assert [r.status_code for r in responses] == [200] * 100
    assert len(calls.token_requests) == 1
    assert len({token for token, _ in resource.seen.accepted}) == 1


def test_100_concurrent_threads_of_one_client_cost_one_broker_request(
    broker: BrokerProcess, resource: ResourceServer, calls: BrokerCalls, authserver: AuthServerProcess
) -> None:
    authserver.configure(delay=0.3)
    start = threading.Barrier(100)
    with sdk(broker, calls) as auth, httpx.Client(auth=auth, limits=httpx.Limits(max_connections=100)) as http:

        def one(_: int) -> int:
            start.wait(timeout=30)
            return http.get(f"{resource.url}/data").status_code

        with ThreadPoolExecutor(max_workers=100) as pool:
            statuses = list(pool.map(one, range(100)))

    assert statuses == [200] * 100
    assert len(calls.token_requests) == 1
    assert len({token for token, _ in resource.seen.accepted}) == 1


def test_a_token_is_kept_until_its_margin_and_renewed_with_min_ttl(
    broker: BrokerProcess, resource: ResourceServer, calls: BrokerCalls
) -> None:
    clock = FakeClock()
    with sdk(broker, calls, clock=clock) as auth, httpx.Client(auth=auth) as http:
        assert http.get(f"{resource.url}/data").status_code == 200
        first = calls.token_requests[0]
        assert first.url.params["min_ttl"] == "30"
        assert first.url.params["scope"] == READ
        left = auth.token().expires_in
        assert left > 3000  # a fresh one-hour token

        clock.advance(left - margin(left) - 1)
        assert http.get(f"{resource.url}/data").status_code == 200
        assert len(calls.token_requests) == 1

        clock.advance(2)
        assert http.get(f"{resource.url}/data").status_code == 200
        assert len(calls.token_requests) == 2
        # asked for a token that would not need renewing right away
        assert calls.token_requests[1].url.params["min_ttl"] == str(math.ceil(margin(left)))


def test_a_renewal_gets_a_fresh_token_from_the_broker_not_the_near_expiry_one(
    start_brokers: StartBrokers,
    write_config: Callable[..., Path],
    resource: ResourceServer,
    calls: BrokerCalls,
    authserver: AuthServerProcess,
) -> None:
    """Without min_ttl on the renewal, the broker would hand back the token the SDK just found too
    old: it is still within the broker's window, and the broker refreshes it only at 90 %."""
    authserver.configure(lifetime=10)
    broker = start_brokers(write_config(), workers=1, env={"BROKER_CACHE_REFRESH_AT": "0.9,0.9"})[0]
    with sdk(broker, calls) as auth, httpx.Client(auth=auth) as http:
        assert http.get(f"{resource.url}/data").status_code == 200
        old = resource.seen.accepted[-1][0]
        left = auth.token().expires_in
        threading.Event().wait(margin(left) + 0.5)  # past the SDK's renewal point (half of 10 s)

        assert http.get(f"{resource.url}/data").status_code == 200

    assert len(calls.token_requests) == 2
    assert resource.seen.accepted[-1][0] != old
    assert resource.seen.rejected == []
    assert authserver.token_requests() == 2


def test_a_body_that_cannot_be_sent_again_gets_the_401_as_it_is(
    broker: BrokerProcess, resource: ResourceServer, calls: BrokerCalls
) -> None:
    def stream() -> Iterator[bytes]:
        yield b"part one, "
        yield b"part two"

    with sdk(broker, calls) as auth, httpx.Client(auth=auth) as http:
        assert http.get(f"{resource.url}/data").status_code == 200
        old = resource.seen.accepted[-1][0]
        resource.revoked.add(old)

        response = http.post(f"{resource.url}/data", content=stream())
        assert response.status_code == 401
        assert response.history == []
        assert resource.seen.rejected == [(old, b"part one, part two")]
        # the rejected token was still reported and replaced: the next request goes through at once
        assert calls.reports == [{"access_token": old, "scope": READ}]
        after = http.get(f"{resource.url}/data")

    assert after.status_code == 200
    assert after.history == []
    assert len(resource.seen.rejected) == 1


def test_a_request_is_retried_once_only(broker: BrokerProcess, resource: ResourceServer, calls: BrokerCalls) -> None:
    resource.reject_all = True
    with sdk(broker, calls) as auth, httpx.Client(auth=auth) as http:
        response = http.get(f"{resource.url}/data")

    assert response.status_code == 401
    assert [r.status_code for r in response.history] == [401]
    assert len(resource.seen.rejected) == 2
    assert len(calls.reports) == 1
    assert len(calls.token_requests) == 2


def test_the_requests_auth_retries_a_rotated_token_once(
    broker: BrokerProcess, resource: ResourceServer, calls: BrokerCalls
) -> None:
    with sdk(broker, calls) as auth, requests.Session() as session:
        session.auth = auth
        assert session.get(f"{resource.url}/data", timeout=10).status_code == 200
        old = resource.seen.accepted[-1][0]
        resource.revoked.add(old)

        response = session.post(f"{resource.url}/data", data=b"payload", timeout=10)

    assert response.status_code == 200
    assert [r.status_code for r in response.history] == [401]
    assert resource.seen.accepted[-1][1] == b"payload"
    assert resource.seen.accepted[-1][0] != old
    assert calls.reports == [{"access_token": old, "scope": READ}]


def test_broker_refusals_are_typed_and_never_show_the_caller_key(
    broker: BrokerProcess, resource: ResourceServer, calls: BrokerCalls
) -> None:
    cases = [
        (BrokerAuth("payments", READ, url=broker.url, caller_key=CALLER_KEYS["reporting"]), 403, "access_denied"),
        (BrokerAuth("payments", READ, url=broker.url, caller_key="tbk_" + "x" * 43), 401, "invalid_token"),
        (BrokerAuth("payments", ADMIN, url=broker.url, caller_key=CALLER_KEYS["billing"]), 403, "insufficient_scope"),
    ]
    for auth, status, error in cases:
        with auth, httpx.Client(auth=auth) as http, pytest.raises(BrokerRefused) as caught:
            http.get(f"{resource.url}/data")
        exc = caught.value
        assert (exc.status, exc.error) == (status, error)
        assert str(exc) == f"{exc.error_description} ({error})"
        assert exc.error_description.endswith(".")
        key = auth._key.reveal()
        assert key not in f"{exc!s} {exc!r} {exc.args} {auth!r} {auth!s}"
    assert resource.seen.accepted == resource.seen.rejected == []


def test_an_upstream_outage_is_surfaced_with_retry_after(
    broker: BrokerProcess, calls: BrokerCalls, authserver: AuthServerProcess
) -> None:
    authserver.configure(fault="503")
    with sdk(broker, calls, scope=WRITE) as auth, pytest.raises(BrokerUnavailable) as caught:
        auth.token()
    assert (caught.value.status, caught.value.error, caught.value.retry_after) == (503, "upstream_unavailable", 1.0)
    assert len(calls.token_requests) == 1  # surfaced, not retried in a loop


def test_while_the_broker_is_down_a_token_still_valid_is_used(
    broker: BrokerProcess, resource: ResourceServer, calls: BrokerCalls
) -> None:
    clock = FakeClock()
    with sdk(broker, calls, clock=clock) as auth, httpx.Client(auth=auth) as http:
        assert http.get(f"{resource.url}/data").status_code == 200
        left = auth.token().expires_in
        broker.stop()

        clock.advance(left - margin(left) + 1)  # past the renewal point, still valid
        assert http.get(f"{resource.url}/data").status_code == 200
        assert len(calls.token_requests) == 2  # one attempt at the broker ...
        assert http.get(f"{resource.url}/data").status_code == 200
        assert len(calls.token_requests) == 2  # ... then a pause before the next one
        clock.advance(2)
        assert http.get(f"{resource.url}/data").status_code == 200
        assert len(calls.token_requests) == 3

        clock.advance(margin(left))  # expired
        with pytest.raises(BrokerUnavailable) as caught:
            http.get(f"{resource.url}/data")
    assert (caught.value.status, caught.value.error) == (None, "broker_unreachable")
    assert len({token for token, _ in resource.seen.accepted}) == 1
