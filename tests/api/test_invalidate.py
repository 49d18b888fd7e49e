"""POST /v1/tokens/{credential}/invalidate (spec §3.2): drops the cached token only if it is
the one reported; 204 either way."""

from __future__ import annotations

from typing import Any

from starlette.testclient import TestClient

from tests.api.helpers import assert_error
from tests.conftest import ADMIN, READ, WRITE, auth, token_body
from tests.support import AuthServerProcess

PAYMENTS = "/v1/tokens/payments"
INVALIDATE = "/v1/tokens/payments/invalidate"


def _token(client: TestClient, scope: str | None = READ, caller: str = "billing") -> str:
    params = {} if scope is None else {"scope": scope}
    token: str = token_body(client.get(PAYMENTS, params=params, headers=auth(caller)))["access_token"]
    return token


def _invalidate(client: TestClient, payload: dict[str, Any], caller: str = "billing") -> Any:
    return client.post(INVALIDATE, json=payload, headers=auth(caller))


def test_reporting_the_current_token_replaces_it(client: TestClient, authserver: AuthServerProcess) -> None:
    old = _token(client)
    response = _invalidate(client, {"access_token": old, "scope": READ})
    assert response.status_code == 204, response.text
    assert response.content == b""

    new = _token(client)
    assert new != old
    assert _token(client) == new  # the replacement is cached in turn
    assert authserver.token_requests() == 2


def test_scope_in_the_report_is_canonicalised(client: TestClient, authserver: AuthServerProcess) -> None:
    old = _token(client, f"{READ} {WRITE}")
    assert _invalidate(client, {"access_token": old, "scope": f"{WRITE} {READ} {WRITE}"}).status_code == 204
    assert _token(client, f"{READ} {WRITE}") != old
    assert authserver.token_requests() == 2


def test_report_without_scope_means_default_scopes(client: TestClient, authserver: AuthServerProcess) -> None:
    old = _token(client, None)
    assert _invalidate(client, {"access_token": old}).status_code == 204
    assert _token(client, READ) != old
    assert authserver.token_requests() == 2


def test_reporting_another_token_is_a_no_op(client: TestClient, authserver: AuthServerProcess) -> None:
    current = _token(client)
    other = _token(client, f"{READ} {WRITE}")  # a real token, but not the one cached for READ
    for stale in ("not-the-cached-token", other):
        response = _invalidate(client, {"access_token": stale, "scope": READ})
        assert response.status_code == 204, response.text
    assert _token(client) == current
    assert _token(client, f"{READ} {WRITE}") == other
    assert authserver.token_requests() == 2


def test_report_for_the_wrong_scope_set_is_a_no_op(client: TestClient, authserver: AuthServerProcess) -> None:
    current = _token(client, READ)
    assert _invalidate(client, {"access_token": current, "scope": f"{READ} {WRITE}"}).status_code == 204
    assert _token(client, READ) == current
    assert authserver.token_requests() == 1


def test_report_with_nothing_cached_fetches_nothing(client: TestClient, authserver: AuthServerProcess) -> None:
    assert _invalidate(client, {"access_token": "some-token", "scope": READ}).status_code == 204
    assert authserver.token_requests() == 0


def test_many_reports_of_one_token_cause_one_refresh(client: TestClient, authserver: AuthServerProcess) -> None:
    old = _token(client)
    for _ in range(10):
        assert _invalidate(client, {"access_token": old, "scope": READ}).status_code == 204
    new = _token(client)
    assert new != old
    # a late report about the replaced token changes nothing
    assert _invalidate(client, {"access_token": old, "scope": READ}).status_code == 204
    assert _token(client) == new
    assert authserver.token_requests() == 2


def test_out_of_grant_scope_is_insufficient_scope(client: TestClient, authserver: AuthServerProcess) -> None:
    current = _token(client)
    body = assert_error(
        _invalidate(client, {"access_token": current, "scope": f"{READ} {ADMIN}"}), 403, "insufficient_scope"
    )
    assert ADMIN in body["error_description"]
    assert _token(client) == current
    assert authserver.token_requests() == 1


def test_callers_without_access_cannot_drop_tokens(client: TestClient, authserver: AuthServerProcess) -> None:
    current = _token(client)
    assert_error(_invalidate(client, {"access_token": current, "scope": READ}, "reporting"), 403, "access_denied")
    unauthenticated = client.post(INVALIDATE, json={"access_token": current, "scope": READ})
    assert_error(unauthenticated, 401, "invalid_token")
    assert _token(client) == current
    assert authserver.token_requests() == 1
