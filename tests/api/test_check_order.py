"""The order in which checks run (spec §3.3): caller authentication, grant, request syntax,
scopes within the grant, then the token itself. The first failing check answers, and no 4xx
ever costs an upstream request."""

from __future__ import annotations

from typing import Any

import pytest
from starlette.testclient import TestClient

from tests.api.helpers import WWW_AUTHENTICATE, assert_error
from tests.conftest import ADMIN, READ, auth
from tests.support import AuthServerProcess

BAD_SCOPE = 'a"b'


@pytest.mark.parametrize(
    ("method", "path", "kwargs"),
    [
        pytest.param("GET", "/v1/tokens/nope", {"params": {"scope": BAD_SCOPE, "min_ttl": "-1"}}, id="get-unknown"),
        pytest.param("GET", "/v1/tokens/payments", {"params": {"scope": BAD_SCOPE}}, id="get-known"),
        pytest.param("POST", "/v1/tokens/nope/invalidate", {"content": b"{not json"}, id="invalidate-unknown"),
        pytest.param("POST", "/v1/tokens/payments/invalidate", {"json": {"scope": ADMIN}}, id="invalidate-known"),
    ],
)
def test_unauthenticated_answers_401_before_anything_else(
    client: TestClient, authserver: AuthServerProcess, method: str, path: str, kwargs: dict[str, Any]
) -> None:
    response = client.request(method, path, **kwargs)
    assert_error(response, 401, "invalid_token")
    assert response.headers["www-authenticate"] == WWW_AUTHENTICATE
    assert authserver.token_requests() == 0


@pytest.mark.parametrize(
    ("method", "suffix", "kwargs"),
    [
        pytest.param("GET", "", {"params": {"scope": BAD_SCOPE, "min_ttl": "abc"}}, id="bad-scope-and-min_ttl"),
        pytest.param("GET", "", {"params": {"scope": ADMIN}}, id="out-of-any-grant-scope"),
        pytest.param("GET", f"?scope={READ}&scope={READ}", {}, id="repeated-scope"),
        pytest.param("POST", "/invalidate", {"content": b"{not json"}, id="invalidate-bad-json"),
        pytest.param("POST", "/invalidate", {"json": {"access_token": "t", "scope": BAD_SCOPE}}, id="inv-bad-scope"),
    ],
)
def test_no_grant_answers_access_denied_before_syntax(
    client: TestClient, authserver: AuthServerProcess, method: str, suffix: str, kwargs: dict[str, Any]
) -> None:
    plain = client.get("/v1/tokens/payments", headers=auth("reporting"))
    for credential in ("payments", "nope"):
        response = client.request(method, f"/v1/tokens/{credential}{suffix}", headers=auth("reporting"), **kwargs)
        assert_error(response, 403, "access_denied")
        # Nothing about the rest of the request shows through: the same bytes as a plain request.
        assert response.content == plain.content
    assert authserver.token_requests() == 0


@pytest.mark.parametrize(
    ("method", "path", "kwargs"),
    [
        pytest.param("GET", "/v1/tokens/payments", {"params": {"scope": f"{ADMIN} {BAD_SCOPE}"}}, id="bad-scope-char"),
        pytest.param("GET", "/v1/tokens/payments", {"params": {"scope": ADMIN, "min_ttl": "abc"}}, id="bad-min_ttl"),
        pytest.param("GET", f"/v1/tokens/payments?scope={ADMIN}&scope={ADMIN}", {}, id="repeated-scope"),
        pytest.param(
            "POST", "/v1/tokens/payments/invalidate", {"json": {"access_token": "", "scope": ADMIN}}, id="inv-no-token"
        ),
        pytest.param(
            "POST",
            "/v1/tokens/payments/invalidate",
            {"json": {"access_token": "t", "scope": f"{ADMIN} {BAD_SCOPE}"}},
            id="inv-bad-scope-char",
        ),
    ],
)
def test_syntax_answers_400_before_scope_grant(
    client: TestClient, authserver: AuthServerProcess, method: str, path: str, kwargs: dict[str, Any]
) -> None:
    response = client.request(method, path, headers=auth(), **kwargs)
    assert_error(response, 400, "invalid_request")
    assert authserver.token_requests() == 0


@pytest.mark.parametrize(
    ("method", "path", "kwargs"),
    [
        pytest.param("GET", "/v1/tokens/payments", {"params": {"scope": f"{READ} {ADMIN}", "min_ttl": "60"}}, id="get"),
        pytest.param(
            "POST", "/v1/tokens/payments/invalidate", {"json": {"access_token": "t", "scope": ADMIN}}, id="invalidate"
        ),
    ],
)
def test_out_of_grant_scope_answers_403_before_the_token(
    client: TestClient, authserver: AuthServerProcess, method: str, path: str, kwargs: dict[str, Any]
) -> None:
    authserver.configure(fault="500")  # the token itself would fail: the scope check must answer first
    response = client.request(method, path, headers=auth(), **kwargs)
    body = assert_error(response, 403, "insufficient_scope")
    assert ADMIN in body["error_description"]
    assert authserver.token_requests() == 0


def test_no_4xx_reaches_the_authorization_server(client: TestClient, authserver: AuthServerProcess) -> None:
    requests: list[tuple[str, dict[str, Any], int]] = [
        ("/v1/tokens/payments", {}, 401),
        ("/v1/tokens/payments", {"headers": auth("reporting")}, 403),
        ("/v1/tokens/ledger", {"headers": auth(), "params": {"scope": BAD_SCOPE}}, 400),
        ("/v1/tokens/ledger", {"headers": auth(), "params": {"scope": ADMIN}}, 403),
        ("/v1/tokens/ledger", {"headers": auth("reporting"), "params": {"min_ttl": "x"}}, 400),
    ]
    for path, kwargs, status in requests:
        assert client.get(path, **kwargs).status_code == status
    stats = authserver.stats()
    assert stats["token_requests"] == 0
    assert stats["discovery_requests"] == 0
