"""Per-caller rate limits through the API (spec §3.3, §6.6), in-process on real Redis and the real
test authorization server: 429 `rate_limited` with Retry-After after the scope check and before
the token, L1 hits count (the fast path's too), refused requests do not, invalidation is not
limited, other callers are unaffected, the metric counts by caller, and the admin API takes the
same keys in the same words as the config file."""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from broker.api import create_app
from broker.callers import hash_key, new_caller_key
from broker.settings import load_settings
from tests.api.helpers import WWW_AUTHENTICATE, assert_error
from tests.conftest import ADMIN, CALLER_KEYS, READ, WRITE, admin_auth, auth
from tests.support import AuthServerProcess

LIMITED_KEY = new_caller_key()
TOKENS = "/v1/tokens/payments"


def limited() -> dict[str, str]:
    return {"Authorization": f"Bearer {LIMITED_KEY}"}


def limited_caller(per_second: float, burst: int) -> str:
    return f"""
        [callers.limited]
        key_sha256 = "{hash_key(LIMITED_KEY)}"
        rate_limit_per_second = {per_second}
        rate_limit_burst = {burst}
        [callers.limited.grants]
        payments = ["{READ}", "{WRITE}"]
        """


@pytest.fixture
def app_with(write_config: Callable[..., Path]) -> Iterator[Callable[..., TestClient]]:
    """app_with(per_second, burst) → a TestClient of a broker whose caller `limited` has that limit."""
    clients: list[TestClient] = []

    def make(per_second: float, burst: int) -> TestClient:
        client = TestClient(create_app(load_settings(write_config(limited_caller(per_second, burst)))))
        clients.append(client.__enter__())
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


def test_over_the_limit_is_429_with_retry_after_and_costs_no_token(
    app_with: Callable[..., TestClient], authserver: AuthServerProcess
) -> None:
    client = app_with(0.001, 2)  # 2 at once, then one every 1000 s
    for _ in range(2):
        assert client.get(TOKENS, params={"scope": READ}, headers=limited()).status_code == 200
    response = client.get(TOKENS, params={"scope": WRITE}, headers=limited())  # not cached: would fetch
    body = assert_error(response, 429, "rate_limited")
    assert response.headers["retry-after"] == "1000"
    assert response.headers["cache-control"] == "no-store"
    assert body["error_description"] == (
        "Caller limited is over its rate limit of 0.001 token requests per second (burst 2): retry in 1000 s."
    )
    assert authserver.token_requests() == 1


def test_every_earlier_check_answers_before_the_rate_limit(
    app_with: Callable[..., TestClient], authserver: AuthServerProcess
) -> None:
    client = app_with(0.001, 1)
    assert client.get(TOKENS, params={"scope": READ}, headers=limited()).status_code == 200
    assert_error(client.get(TOKENS, params={"scope": READ}, headers=limited()), 429, "rate_limited")
    # over its limit, the caller still gets the answer of the first check that fails
    unauthenticated = client.get(TOKENS, params={"scope": READ})
    assert_error(unauthenticated, 401, "invalid_token")
    assert unauthenticated.headers["www-authenticate"] == WWW_AUTHENTICATE
    assert_error(client.get("/v1/tokens/ledger", params={"scope": READ}, headers=limited()), 403, "access_denied")
    assert_error(client.get(TOKENS, params={"scope": 'a"b'}, headers=limited()), 400, "invalid_request")
    assert_error(client.get(TOKENS, params={"scope": ADMIN}, headers=limited()), 403, "insufficient_scope")


def test_requests_refused_by_an_earlier_check_do_not_count(app_with: Callable[..., TestClient]) -> None:
    client = app_with(0.001, 1)
    for _ in range(5):
        assert client.get(TOKENS, params={"scope": ADMIN}, headers=limited()).status_code == 403
        assert client.get(TOKENS, params={"min_ttl": "-1"}, headers=limited()).status_code == 400
    assert client.get(TOKENS, params={"scope": READ}, headers=limited()).status_code == 200


def test_l1_hits_count_too(app_with: Callable[..., TestClient], served: list[bool]) -> None:
    client = app_with(0.001, 3)
    answers = [client.get(TOKENS, params={"scope": READ}, headers=limited()) for _ in range(4)]
    assert [a.status_code for a in answers] == [200, 200, 200, 429]
    assert len({a.json().get("access_token") for a in answers[:3]}) == 1  # one fetch, two L1 hits
    # below 40/s no unit is held, so the fast path left every one of them to the route
    assert not any(served)


def test_the_fast_path_serves_a_limited_callers_hits_from_units_in_hand(
    app_with: Callable[..., TestClient], served: list[bool]
) -> None:
    client = app_with(1000, 1000)  # batches of up to 50 units
    for _ in range(100):
        assert client.get(TOKENS, params={"scope": READ}, headers=limited()).status_code == 200
    assert served.count(True) >= 90  # the route only took the batches (and the first fetch)


def test_invalidation_is_not_rate_limited(app_with: Callable[..., TestClient]) -> None:
    client = app_with(0.001, 1)
    token = client.get(TOKENS, params={"scope": READ}, headers=limited()).json()["access_token"]
    assert client.get(TOKENS, params={"scope": READ}, headers=limited()).status_code == 429
    report = client.post(f"{TOKENS}/invalidate", json={"access_token": token, "scope": READ}, headers=limited())
    assert report.status_code == 204, report.text


def test_other_callers_are_unaffected(app_with: Callable[..., TestClient]) -> None:
    client = app_with(0.001, 1)
    assert client.get(TOKENS, params={"scope": READ}, headers=limited()).status_code == 200
    for _ in range(20):
        assert client.get(TOKENS, params={"scope": READ}, headers=limited()).status_code == 429
        assert client.get(TOKENS, params={"scope": READ}, headers=auth()).status_code == 200


def _counter(text: str, name: str, labels: str) -> float:
    for line in text.splitlines():
        if line.startswith(f"{name}{{{labels}}} "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_refusals_are_counted_by_caller(app_with: Callable[..., TestClient]) -> None:
    client = app_with(0.001, 1)
    before = client.get("/metrics").text
    assert client.get(TOKENS, params={"scope": READ}, headers=limited()).status_code == 200
    for _ in range(3):
        assert client.get(TOKENS, params={"scope": READ}, headers=limited()).status_code == 429
    after = client.get("/metrics").text
    by_caller = ("token_broker_rate_limited_requests_total", 'caller="limited"')
    by_outcome = ("token_broker_token_requests_total", 'credential="payments",outcome="rate_limited"')
    for name, labels in (by_caller, by_outcome):
        assert _counter(after, name, labels) - _counter(before, name, labels) == 3


def test_the_admin_api_takes_rate_limits_in_the_config_files_words(client: TestClient) -> None:
    url = "/v1/admin/callers/shipping"
    bad = client.put(url, headers=admin_auth(), json={"grants": {"payments": [READ]}, "rate_limit_burst": 5})
    assert_error(bad, 400, "invalid_request")
    assert bad.json()["error_description"] == (
        "callers.shipping.rate_limit_burst: needs rate_limit_per_second: a burst alone limits nothing."
    )
    bad = client.put(url, headers=admin_auth(), json={"rate_limit_per_second": 0, "rate_limit_burst": 1.5})
    assert bad.json()["error_description"] == (
        "callers.shipping.rate_limit_per_second: must be 0.001 to 1000000 token requests per second, got 0; "
        "callers.shipping.rate_limit_burst: must be a whole number of requests, got 1.5."
    )
    created = client.put(
        url,
        headers=admin_auth(),
        json={"grants": {"payments": [READ]}, "rate_limit_per_second": 0.001, "rate_limit_burst": 1},
    )
    assert created.status_code == 201, created.text
    view = created.json()
    assert (view["rate_limit_per_second"], view["rate_limit_burst"]) == (0.001, 1)
    key = {"Authorization": f"Bearer {view['caller_key']}"}
    assert client.get(TOKENS, params={"scope": READ}, headers=key).status_code == 200
    assert client.get(TOKENS, params={"scope": READ}, headers=key).status_code == 429
    # lifted: the next request is served
    lifted = client.put(url, headers=admin_auth(), json={"grants": {"payments": [READ]}})
    assert "rate_limit_per_second" not in lifted.json()
    assert client.get(TOKENS, params={"scope": READ}, headers=key).status_code == 200


def test_the_oauth_facade_spends_the_same_limit_and_answers_429_rate_limited(
    write_config: Callable[..., Path], authserver: AuthServerProcess
) -> None:
    """The facade's token endpoint (spec §3.5) counts against the caller's one limit, its hits on
    the fast path too, and renders the refusal as 429 `rate_limited` with Retry-After and no-store
    (RFC 6749 has no code for it); /v1 then refuses the same caller, and others are unaffected."""
    extra = limited_caller(0.001, 3) + '\n        [server]\n        public_url = "http://testserver"\n'
    basic = {"Authorization": "Basic " + base64.b64encode(f"limited:{LIMITED_KEY}".encode()).decode()}
    form = {"grant_type": "client_credentials", "scope": READ}
    with TestClient(create_app(load_settings(write_config(extra)))) as client:
        for _ in range(3):  # a fetch, then hits
            assert client.post("/oauth2/payments/token", headers=basic, data=form).status_code == 200
        response = client.post("/oauth2/payments/token", headers=basic, data=form)
        body = assert_error(response, 429, "rate_limited")
        assert response.headers["retry-after"] == "1000"
        assert response.headers["cache-control"] == "no-store"
        assert "rate limit" in body["error_description"]
        assert_error(client.get(TOKENS, params={"scope": READ}, headers=limited()), 429, "rate_limited")
        billing = {"Authorization": "Basic " + base64.b64encode(f"billing:{CALLER_KEYS['billing']}".encode()).decode()}
        assert client.post("/oauth2/payments/token", headers=billing, data=form).status_code == 200
    assert authserver.token_requests() == 1
