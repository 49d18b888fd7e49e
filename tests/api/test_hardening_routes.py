"""Hardening items 1 (the route part), 14, 15 and 16 through the app in-process (TestClient), on
real Redis and the real test authorization server."""

from __future__ import annotations

import asyncio
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from starlette.testclient import TestClient

from broker import redis_client
from broker.api import create_app
from broker.api.state import Broker
from broker.callers import hash_key, new_caller_key
from broker.clock import FakeClock
from broker.entries import CachedToken, fingerprint
from broker.settings import load_settings
from tests.api.helpers import assert_error
from tests.conftest import READ, SECRET_ENV, auth, token_body
from tests.support import CLIENT_ID, AuthServerProcess

PAYMENTS = "/v1/tokens/payments"
VAULT = "/v1/tokens/vault"
VAULT_SCOPE = "urn:x:read"
# Callers of the `vault` credential (no default_scopes): one granted nothing, one granted urn:x:read.
NO_GRANT_KEY, READER_KEY = new_caller_key(), new_caller_key()


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def vault_config(authserver: AuthServerProcess) -> str:
    return textwrap.dedent(
        f"""
        [credentials.vault]
        token_url = "{authserver.token_url}"
        client_id = "{CLIENT_ID}"
        client_secret = {{ env = "{SECRET_ENV}" }}
        scopes = ["{VAULT_SCOPE}"]

        [callers.nogrant]
        key_sha256 = "{hash_key(NO_GRANT_KEY)}"
        [callers.nogrant.grants]
        vault = []

        [callers.reader]
        key_sha256 = "{hash_key(READER_KEY)}"
        [callers.reader.grants]
        vault = ["{VAULT_SCOPE}"]
        """
    )


def broker_of(client: TestClient) -> Broker:
    broker: Broker = client.app_state["broker"]
    return broker


def cached(redis_url: str) -> list[str]:
    with redis.Redis.from_url(redis_url) as direct:
        return sorted(key.decode() for key in direct.scan_iter(match="tb:*"))


@pytest.fixture
def vault_apps(
    write_config: Callable[..., Path], authserver: AuthServerProcess
) -> Iterator[tuple[TestClient, TestClient]]:
    """(with the fast path, without it) on one config that has the `vault` credential."""
    settings = load_settings(write_config(vault_config(authserver)))
    with (
        TestClient(create_app(settings), raise_server_exceptions=False) as fast,
        TestClient(create_app(settings, fast_path=False), raise_server_exceptions=False) as slow,
    ):
        yield fast, slow


# -- item 1: no scope named, no default_scopes --------------------------------------------------


def test_no_scope_without_default_scopes_is_refused_on_both_paths(
    vault_apps: tuple[TestClient, TestClient], authserver: AuthServerProcess, redis_url: str, served: list[bool]
) -> None:
    """Defect (hardening item 1, the route part): a request naming no scope for a credential
    without `default_scopes` passed `check_scopes(granted, ())` whatever the caller's grant
    (`[]` included); the upstream request then carried no `scope`, the authorization server
    granted its default (often everything the client has) and the broker handed that out and
    cached it. Spec §4.8: such a request is refused, 400 invalid_request."""
    fast, slow = vault_apps
    for key in (NO_GRANT_KEY, READER_KEY):
        for query in ("", "?scope=", "?min_ttl=5"):
            answers = []
            for client in (fast, slow):
                response = client.get(f"{VAULT}{query}", headers=bearer(key))
                body = assert_error(response, 400, "invalid_request")
                assert "default scopes" in body["error_description"], body
                answers.append((response.status_code, response.headers.multi_items(), response.content))
            assert answers[0] == answers[1]  # the fast path falls through to the route's answer
    assert not any(served)
    assert authserver.token_requests() == 0
    assert cached(redis_url) == []
    # The credential works for a request that names its scope.
    assert token_body(fast.get(VAULT, params={"scope": VAULT_SCOPE}, headers=bearer(READER_KEY)))["scope"] == (
        VAULT_SCOPE
    )


def test_the_fast_path_never_serves_a_no_scope_request_without_default_scopes(
    vault_apps: tuple[TestClient, TestClient], authserver: AuthServerProcess, served: list[bool]
) -> None:
    """Defect (hardening item 1, the fast path): the fast path took `default_scopes` = () as the
    scope set "" and served whatever this worker's L1 held for it (what an earlier unscoped
    request had fetched). Now a credential without default scopes is left to the route (400)."""
    fast, _ = vault_apps
    tokens = broker_of(fast).tokens
    credential = broker_of(fast).settings.credentials["vault"]
    now = time.monotonic()
    leftover = CachedToken(
        access_token="fetched-without-scope",
        scope="urn:default",
        expires_at=time.time() + 3600,
        expires=now + 3600,
        fresh_until=now + 3570,
        refresh_at=now + 3000,
        fetched_at=now - 10,
        fingerprint=fingerprint("fetched-without-scope"),
    )
    tokens.l1.put(tokens.keys_for(credential, "").token, leftover)
    for key in (NO_GRANT_KEY, READER_KEY):
        response = fast.get(VAULT, headers=bearer(key))
        assert_error(response, 400, "invalid_request")
    assert served == [False, False]
    assert authserver.token_requests() == 0


def test_an_invalidation_without_scope_without_default_scopes_is_refused(
    vault_apps: tuple[TestClient, TestClient], authserver: AuthServerProcess, redis_url: str
) -> None:
    """Defect (hardening item 1): POST …/invalidate with no scope, for a credential without
    default_scopes, was taken as a report about the scope set "" and answered 204. Spec §4.8:
    400 invalid_request, as for GET."""
    fast, _ = vault_apps
    token = token_body(fast.get(VAULT, params={"scope": VAULT_SCOPE}, headers=bearer(READER_KEY)))["access_token"]
    before = cached(redis_url)
    for key in (NO_GRANT_KEY, READER_KEY):
        response = fast.post(f"{VAULT}/invalidate", json={"access_token": token}, headers=bearer(key))
        body = assert_error(response, 400, "invalid_request")
        assert "default scopes" in body["error_description"], body
    assert authserver.token_requests() == 1
    assert cached(redis_url) == before
    # the token named by its scope is still the cached one
    again = token_body(fast.get(VAULT, params={"scope": VAULT_SCOPE}, headers=bearer(READER_KEY)))
    assert again["access_token"] == token


# -- item 14: refresh bookkeeping is bounded ----------------------------------------------------


def wide_config(authserver: AuthServerProcess, count: int) -> str:
    scopes = ", ".join(f'"urn:w:{i}"' for i in range(count))
    return textwrap.dedent(
        f"""
        [credentials.wide]
        token_url = "{authserver.token_url}"
        client_id = "{CLIENT_ID}"
        client_secret = {{ env = "{SECRET_ENV}" }}
        scopes = [{scopes}]

        [callers.reader]
        key_sha256 = "{hash_key(READER_KEY)}"
        [callers.reader.grants]
        wide = [{scopes}]
        """
    )


def test_refresh_backoff_for_many_scope_sets_stays_bounded(
    write_config: Callable[..., Path], authserver: AuthServerProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Defect (hardening item 14): the per-key refresh bookkeeping (`_refresh_not_before`,
    `_refresh_delay`, now the backoff of broker/refresh.py) grew by one entry for every scope set whose
    refresh failed and was never pruned: a caller choosing scope subsets grew it without bound.
    It is bounded by `l1_max_entries` now, like L1, and so is the key memo."""
    limit, count = 4, 12
    monkeypatch.setenv("BROKER_CACHE_L1_MAX_ENTRIES", str(limit))
    settings = load_settings(write_config(wide_config(authserver, count)))
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        issued = []
        for i in range(count):
            body = token_body(client.get("/v1/tokens/wide", params={"scope": f"urn:w:{i}"}, headers=bearer(READER_KEY)))
            issued.append(body["access_token"])
        authserver.configure(fault="500")  # every refresh from now on fails
        for i, token in enumerate(issued):
            report = {"access_token": token, "scope": f"urn:w:{i}"}
            response = client.post("/v1/tokens/wide/invalidate", json=report, headers=bearer(READER_KEY))
            assert response.status_code == 204, response.text
        tokens = broker_of(client).tokens
        deadline = time.monotonic() + 60
        while tokens.flights._tasks and time.monotonic() < deadline:  # the failing refreshes finish
            time.sleep(0.05)
        assert not tokens.flights._tasks
        assert authserver.token_requests() > count  # the refreshes really went out (and failed)
        assert len(tokens.refresher) <= limit, len(tokens.refresher)
        assert len(tokens._keys) <= limit, len(tokens._keys)
        assert len(tokens.l1) <= limit


# -- item 15: a token that arrives with its window already over ---------------------------------


def test_an_answer_arriving_after_its_tokens_window_is_not_handed_out(
    client: TestClient, authserver: AuthServerProcess, redis_url: str
) -> None:
    """Defect (hardening item 15): a freshly fetched token was never checked with `is_fresh`. An
    answer that took longer than the token's own cached window (a 4 s token, skew 1 s, arriving
    after 3.5 s) was handed out with no life left to speak of (expires_in 0). It is now a 502
    upstream_invalid_response, and nothing is cached."""
    authserver.configure(lifetime=4, delay=3.5)
    response = client.get(PAYMENTS, params={"scope": READ}, headers=auth())
    body = assert_error(response, 502, "upstream_invalid_response")
    assert "life" in body["error_description"], body
    assert [key for key in cached(redis_url) if ":tok:" in key] == []
    authserver.configure(delay=0)
    assert token_body(client.get(PAYMENTS, params={"scope": READ}, headers=auth()))["expires_in"] >= 3


# -- item 16: a full connection pool is load, not an outage -------------------------------------

POOL = 2  # the events subscription holds one connection; the test holds the other


@pytest.fixture
def small_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    connect = redis_client.connect

    def small(url: str, **kwargs: Any) -> Any:
        return connect(url, **{**kwargs, "max_connections": POOL})

    monkeypatch.setattr(redis_client, "connect", small)  # what the app's lifespan calls


class HeldPool:
    """Takes the free connections of a TestClient app's Redis pool, in the app's own loop."""

    def __init__(self, client: TestClient) -> None:
        self.client = client
        self.pool = broker_of(client).store.redis.connection_pool
        self.held: list[Any] = []

    def __enter__(self) -> HeldPool:
        portal = self.client.portal
        assert portal is not None
        for _ in range(POOL - 1):  # the events subscription holds the other one
            self.held.append(portal.call(self.pool.get_connection))
        return self

    def __exit__(self, *exc: object) -> None:
        portal = self.client.portal
        assert portal is not None
        for connection in self.held:
            portal.call(self.pool.release, connection)


def test_a_full_pool_answers_503_without_fetching_and_redis_stays_reachable(
    small_pool: None, settings: Any, authserver: AuthServerProcess
) -> None:
    """Defect (hardening item 16): a full connection pool raised what an outage raises, so the
    Store marked Redis unreachable: fail-fast for every call, the fetch lock bypassed (an upstream
    request per worker), L1 served regardless of the subscription, /readyz degraded. Pool
    exhaustion is load: 503 temporarily_unavailable with Retry-After, no fetch without the lock."""
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        with HeldPool(client):
            response = client.get(PAYMENTS, params={"scope": READ}, headers=auth())
            assert client.get("/readyz").json() == {"status": "ok", "redis": "ok"}
            assert broker_of(client).store.reachable
        assert_error(response, 503, "temporarily_unavailable")
        assert response.headers["Retry-After"] == "1"
        assert authserver.token_requests() == 0
        # free connections again: served at once, one fetch, shared through Redis
        assert token_body(client.get(PAYMENTS, params={"scope": READ}, headers=auth()))
        assert authserver.token_requests() == 1


def test_a_full_pool_still_serves_a_fresh_cached_token(
    small_pool: None, settings: Any, authserver: AuthServerProcess
) -> None:
    """Defect (hardening item 16): with the pool full, a request that L1 could not answer outright
    (min_ttl more than the cached token has left) bypassed the lock and fetched a new token. A
    fresh cached token now wins over StoreBusy, and nothing is fetched."""
    clock = FakeClock(time.time())
    with TestClient(create_app(settings, clock=clock), raise_server_exceptions=False) as client:
        first = token_body(client.get(PAYMENTS, params={"scope": READ}, headers=auth()))
        clock.advance(2000)  # 1600 s left of 3600: fresh, before its refresh point (60-80 % of the window)
        with HeldPool(client):
            response = client.get(PAYMENTS, params={"scope": READ, "min_ttl": "1700"}, headers=auth())
            assert broker_of(client).store.reachable
        again = token_body(response)
        assert again["access_token"] == first["access_token"]
        assert 1500 <= again["expires_in"] <= 1600
        assert authserver.token_requests() == 1


def test_the_health_watcher_survives_a_full_pool(small_pool: None, settings: Any) -> None:
    """Defect (hardening item 16, in its fix): StoreBusy is not a StoreUnavailable, and the health
    watcher suppressed only the latter, so one ping that found the pool full ended the watcher
    for good (it is what notices Redis coming back when no request does) and its StoreBusy was
    raised again from the lifespan's shutdown. (The code before the fix passes: it raised
    StoreUnavailable for a full pool.)"""
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        portal = client.portal
        assert portal is not None

        async def watcher_alive() -> bool:
            return any(task.get_name() == "tb-health" and not task.done() for task in asyncio.all_tasks())

        assert portal.call(watcher_alive)
        with HeldPool(client):
            time.sleep(3.5)  # a ping waits 2 s for a connection, then fails
        assert portal.call(watcher_alive)
