"""GET /v1/tokens/{credential} (spec §3.1): the success shape, default and canonical scope sets,
the granted scope, and min_ttl with its one-second rule."""

from __future__ import annotations

import re
import time
from datetime import datetime
from typing import Any

import pytest
from starlette.testclient import TestClient

from tests.conftest import READ, WRITE, auth, token_body
from tests.support import AuthServerProcess

PAYMENTS = "/v1/tokens/payments"
_ISO_Z = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z")


def _get(client: TestClient, path: str = PAYMENTS, **params: str) -> dict[str, Any]:
    return token_body(client.get(path, params=params, headers=auth()))


def _assert_token_shape(body: dict[str, Any], *, lifetime: int) -> None:
    assert set(body) == {"access_token", "token_type", "expires_in", "expires_at", "scope"}
    assert isinstance(body["access_token"], str)
    assert body["access_token"]
    assert body["token_type"] == "Bearer"
    expires_in = body["expires_in"]
    assert type(expires_in) is int
    assert 0 < expires_in <= lifetime
    assert _ISO_Z.fullmatch(body["expires_at"]), body["expires_at"]
    expires_at = datetime.fromisoformat(body["expires_at"].replace("Z", "+00:00"))
    assert expires_at.tzinfo is not None
    assert abs(expires_at.timestamp() - (time.time() + expires_in)) <= 2
    assert isinstance(body["scope"], str)


@pytest.mark.parametrize("path", [PAYMENTS, "/v1/tokens/ledger"])
def test_success_shape(client: TestClient, authserver: AuthServerProcess, path: str) -> None:
    response = client.get(path, params={"scope": READ}, headers=auth())
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].split(";")[0] == "application/json"
    assert "no-store" in response.headers["cache-control"]
    body = response.json()
    _assert_token_shape(body, lifetime=3600)
    assert body["expires_in"] > 3600 - 5
    assert body["scope"] == READ


def test_cached_answer_counts_down_and_keeps_no_store(client: TestClient, authserver: AuthServerProcess) -> None:
    first = _get(client, scope=READ)
    response = client.get(PAYMENTS, params={"scope": READ}, headers=auth())
    second = token_body(response)
    assert "no-store" in response.headers["cache-control"]
    assert second["access_token"] == first["access_token"]
    assert second["expires_at"] == first["expires_at"]
    assert second["expires_in"] <= first["expires_in"]
    assert authserver.token_requests() == 1


@pytest.mark.parametrize("path", [PAYMENTS, "/v1/tokens/ledger"])
def test_no_scope_means_default_scopes(client: TestClient, authserver: AuthServerProcess, path: str) -> None:
    body = _get(client, path)
    assert body["scope"] == READ
    # ... and is the same cache entry as asking for the default scopes explicitly
    assert _get(client, path, scope=READ)["access_token"] == body["access_token"]
    stats = authserver.stats()
    assert stats["token_requests"] == 1
    assert stats["requests"][0]["scope"] == READ


def test_equivalent_scope_strings_share_one_cache_entry(client: TestClient, authserver: AuthServerProcess) -> None:
    tokens = {
        _get(client, scope=scope)["access_token"]
        for scope in (f"{WRITE} {READ}", f"{READ} {WRITE} {READ}", f"  {READ}\t{WRITE} ", f"{WRITE} {WRITE} {READ}")
    }
    assert len(tokens) == 1
    assert authserver.token_requests() == 1

    other = _get(client, scope=READ)
    assert other["access_token"] not in tokens
    assert other["scope"] == READ
    stats = authserver.stats()
    assert stats["token_requests"] == 2
    assert [r["scope"] for r in stats["requests"]] == [f"{READ} {WRITE}", READ]


def test_returned_scope_is_what_was_granted(client: TestClient, authserver: AuthServerProcess) -> None:
    authserver.configure(grant_scope=READ)
    body = _get(client, scope=f"{READ} {WRITE}")
    assert body["scope"] == READ
    assert authserver.stats()["requests"][0]["scope"] == f"{READ} {WRITE}"
    # served from the cache: still what was granted
    assert _get(client, scope=f"{WRITE} {READ}")["scope"] == READ
    assert authserver.token_requests() == 1


@pytest.mark.parametrize(
    ("expires_in", "low", "high"),
    [
        pytest.param("120", 115, 120, id="numeric-string"),
        pytest.param(None, 3590, 3600, id="omitted-jwt-exp"),
        pytest.param(90.5, 85, 90, id="float"),
    ],
)
def test_lifetime_sources(
    client: TestClient, authserver: AuthServerProcess, expires_in: object, low: int, high: int
) -> None:
    authserver.configure(expires_in=expires_in)
    body = _get(client, scope=READ)
    _assert_token_shape(body, lifetime=high)
    assert low <= body["expires_in"] <= high


def test_min_ttl_within_remaining_time_is_a_cache_hit(client: TestClient, authserver: AuthServerProcess) -> None:
    first = _get(client, scope=READ)
    for min_ttl in ("0", "60", "3000"):
        assert _get(client, scope=READ, min_ttl=min_ttl)["access_token"] == first["access_token"]
    assert authserver.token_requests() == 1


def test_min_ttl_longer_than_the_lifetime_cannot_make_every_request_a_fetch(
    client: TestClient, authserver: AuthServerProcess
) -> None:
    """Defect (hardening item 13): a min_ttl longer than the token's lifetime was satisfied only by
    a token fetched less than a second ago, so a caller asking for it cost one upstream request
    per second per key, forever. min_ttl now asks for at most half the lifetime."""
    authserver.configure(lifetime=120)
    first = _get(client, scope=READ, min_ttl="200")
    assert 115 <= first["expires_in"] <= 120  # returned as it is: expires_in tells the caller
    deadline = time.monotonic() + 3.5
    while time.monotonic() < deadline:
        again = _get(client, scope=READ, min_ttl="200")
        assert again["access_token"] == first["access_token"]
        time.sleep(0.25)
    assert authserver.token_requests() == 1


def test_token_shorter_than_two_seconds_is_not_cached(client: TestClient, authserver: AuthServerProcess) -> None:
    authserver.configure(lifetime=1)
    first = client.get(PAYMENTS, params={"scope": READ}, headers=auth())
    second = client.get(PAYMENTS, params={"scope": READ}, headers=auth())
    assert first.status_code == second.status_code == 200
    assert first.json()["access_token"] != second.json()["access_token"]
    assert authserver.token_requests() == 2
