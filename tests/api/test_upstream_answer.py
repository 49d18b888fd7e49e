"""What the broker accepts from an authorization server's token answer, through the app (hardening
issue items 1 and 15): a granted scope beyond the requested set is refused and never cached
(spec §4.8), and a JWT `exp` earlier than `expires_in` bounds the token's lifetime (spec §4.2)."""

from __future__ import annotations

import redis
from starlette.testclient import TestClient

from tests.api.helpers import assert_error
from tests.conftest import ADMIN, READ, WRITE, auth, token_body
from tests.support import AuthServerProcess

PAYMENTS = "/v1/tokens/payments"


def cached_tokens(redis_url: str) -> list[bytes]:
    with redis.Redis.from_url(redis_url) as client:
        return list(client.scan_iter(match="tb:*:tok:*"))


def test_a_grant_beyond_the_requested_scope_is_refused_and_nothing_is_cached(
    client: TestClient, authserver: AuthServerProcess, redis_url: str
) -> None:
    """Defect (spec §4.8): parse_token_response took any granted scope as it was, so a token the
    authorization server granted `admin` on top of `claims.read` was cached under the claims.read
    scope set and handed to every caller with a grant for claims.read."""
    authserver.configure(grant_scope=f"{READ} {ADMIN}")
    for _ in range(2):  # nothing is remembered: each request asks again, and is refused again
        response = client.get(PAYMENTS, params={"scope": READ}, headers=auth())
        body = assert_error(response, 502, "upstream_invalid_response")
        assert ADMIN in body["error_description"], body
        assert READ not in body["error_description"], body  # only the extra scope is named
    assert authserver.token_requests() == 2
    assert cached_tokens(redis_url) == []

    authserver.configure(grant_scope=None)  # the server behaves again
    good = token_body(client.get(PAYMENTS, params={"scope": READ}, headers=auth()))
    assert good["scope"] == READ
    assert authserver.token_requests() == 3
    assert len(cached_tokens(redis_url)) == 1


def test_the_requested_set_granted_in_another_order_is_accepted(
    client: TestClient, authserver: AuthServerProcess
) -> None:
    authserver.configure(grant_scope=f"{WRITE}  {READ}")
    body = token_body(client.get(PAYMENTS, params={"scope": f"{READ} {WRITE}"}, headers=auth()))
    assert body["scope"] == f"{READ} {WRITE}"


def test_an_earlier_jwt_exp_bounds_the_lifetime(client: TestClient, authserver: AuthServerProcess) -> None:
    """Defect (spec §4.2): `expires_in` won over an earlier JWT `exp`, so the broker cached and
    handed out a token for up to an hour after the moment its own `exp` says it expires."""
    authserver.configure(lifetime=3600, jwt_lifetime=120)
    body = token_body(client.get(PAYMENTS, params={"scope": READ}, headers=auth()))
    assert 100 <= body["expires_in"] <= 121, body


def test_a_later_jwt_exp_does_not_lengthen_expires_in(client: TestClient, authserver: AuthServerProcess) -> None:
    authserver.configure(lifetime=120, jwt_lifetime=3600)
    body = token_body(client.get(PAYMENTS, params={"scope": READ}, headers=auth()))
    assert 100 <= body["expires_in"] <= 120, body


def test_a_jwt_exp_already_past_is_upstream_invalid_response(
    client: TestClient, authserver: AuthServerProcess, redis_url: str
) -> None:
    """Defect (spec §4.2): with an `expires_in` beside it, a JWT whose `exp` had already passed was
    cached and handed out as valid for the whole `expires_in`."""
    authserver.configure(lifetime=3600, jwt_lifetime=-30)
    body = assert_error(client.get(PAYMENTS, params={"scope": READ}, headers=auth()), 502, "upstream_invalid_response")
    assert "already expired" in body["error_description"], body
    assert cached_tokens(redis_url) == []
