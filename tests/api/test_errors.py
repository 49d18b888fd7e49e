"""Every row of the error table (spec §3.3) that exists now, and the error body contract."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from tests.api.helpers import (
    WWW_AUTHENTICATE,
    assert_error,
    broker_client,
    ops_auth,
    ops_config,
)
from tests.conftest import ADMIN, CALLER_KEYS, READ, WRITE, auth, token_body
from tests.support import AuthServerProcess, free_port

PAYMENTS = "/v1/tokens/payments"
INVALIDATE = "/v1/tokens/payments/invalidate"

# -- 400 invalid_request ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "query",
    [
        pytest.param({"scope": 'a"b'}, id="quote-in-scope"),
        pytest.param({"scope": "urn:test:claims\\read"}, id="backslash-in-scope"),
        pytest.param({"scope": "urn:test:claims.réad"}, id="non-ascii-scope"),
        pytest.param({"scope": "urn:test:\x01read"}, id="control-char-in-scope"),
        pytest.param({"scope": "urn:" + "x" * 300}, id="scope-token-too-long"),
        pytest.param({"scope": " ".join(f"urn:s{i}" for i in range(65))}, id="too-many-scopes"),
        pytest.param({"scope": "urn:" + "x" * 5000}, id="oversized-query"),
        pytest.param({"min_ttl": "-1"}, id="min_ttl-negative"),
        pytest.param({"min_ttl": "abc"}, id="min_ttl-text"),
        pytest.param({"min_ttl": "1.5"}, id="min_ttl-fraction"),
        pytest.param({"min_ttl": ""}, id="min_ttl-empty"),
        pytest.param({"min_ttl": "+5"}, id="min_ttl-plus-sign"),
        pytest.param({"min_ttl": "1e3"}, id="min_ttl-exponent"),
        pytest.param({"min_ttl": "\u0661"}, id="min_ttl-non-ascii-digit"),
        pytest.param({"min_ttl": "99999999999"}, id="min_ttl-huge"),
        pytest.param({"scope": READ, "min_ttl": "abc"}, id="valid-scope-bad-min_ttl"),
    ],
)
def test_malformed_query_is_invalid_request(
    client: TestClient, authserver: AuthServerProcess, query: dict[str, str]
) -> None:
    response = client.get(PAYMENTS, params=query, headers=auth())
    assert_error(response, 400, "invalid_request")
    assert authserver.token_requests() == 0


@pytest.mark.parametrize("name", ["scope", "min_ttl"])
def test_repeated_parameter_is_invalid_request(client: TestClient, authserver: AuthServerProcess, name: str) -> None:
    value = READ if name == "scope" else "10"
    response = client.get(f"{PAYMENTS}?{name}={value}&{name}={value}", headers=auth())
    body = assert_error(response, 400, "invalid_request")
    assert name in body["error_description"]
    assert authserver.token_requests() == 0


def test_oversized_credential_name_is_denied_like_any_unknown_one(
    client: TestClient, authserver: AuthServerProcess
) -> None:
    # The grant check runs before syntax (spec §3.3): a long name is just a credential without a grant.
    response = client.get("/v1/tokens/" + "p" * 1100, headers=auth())
    body = assert_error(response, 403, "access_denied")
    assert body == client.get("/v1/tokens/nope", headers=auth()).json()
    assert authserver.token_requests() == 0


def _chunks(data: bytes, size: int = 1024) -> Iterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


@pytest.mark.parametrize(
    "request_kwargs",
    [
        pytest.param({"content": b"{not json"}, id="invalid-json"),
        pytest.param({"content": b'{"access_token": "\xff\xfe"}'}, id="invalid-utf8"),
        pytest.param({"content": b""}, id="empty-body"),
        pytest.param({"json": []}, id="array"),
        pytest.param({"json": "a-token"}, id="string"),
        pytest.param({"json": None}, id="null"),
        pytest.param({"json": {}}, id="missing-access_token"),
        pytest.param({"json": {"scope": READ}}, id="scope-without-access_token"),
        pytest.param({"json": {"access_token": ""}}, id="empty-access_token"),
        pytest.param({"json": {"access_token": 42}}, id="numeric-access_token"),
        pytest.param({"json": {"access_token": None}}, id="null-access_token"),
        pytest.param({"json": {"access_token": "t", "scope": [READ]}}, id="scope-not-a-string"),
        pytest.param({"json": {"access_token": "t", "scope": 'a"b'}}, id="bad-scope-characters"),
        pytest.param({"json": {"access_token": "t", "pad": "x" * 20_000}}, id="oversized-body"),
        pytest.param(
            {"content": _chunks(b'{"access_token": "t", "pad": "' + b"x" * 20_000 + b'"}')},
            id="oversized-chunked-body",
        ),
    ],
)
def test_malformed_invalidate_body_is_invalid_request(
    client: TestClient, authserver: AuthServerProcess, request_kwargs: dict[str, Any]
) -> None:
    response = client.post(INVALIDATE, headers=auth(), **request_kwargs)
    assert_error(response, 400, "invalid_request")
    assert authserver.token_requests() == 0


# -- 401 invalid_token ------------------------------------------------------------------------

_UNKNOWN_KEY = "tbk_" + "A" * 43


@pytest.mark.parametrize(
    "authorization",
    [
        pytest.param(None, id="missing-header"),
        pytest.param("", id="empty-header"),
        pytest.param("Basic dGVzdC1jbGllbnQ6dGVzdC1zZWNyZXQ=", id="basic-scheme"),
        pytest.param(f"Token {CALLER_KEYS['billing']}", id="wrong-scheme-valid-key"),
        pytest.param("Bearer", id="scheme-without-key"),
        pytest.param("Bearer ", id="scheme-with-blank-key"),
        pytest.param(f"Bearer {_UNKNOWN_KEY}", id="unknown-key"),
        pytest.param(f"Bearer {CALLER_KEYS['billing']}x", id="valid-key-plus-one-char"),
        pytest.param("Bearer short", id="malformed-key-too-short"),
        pytest.param("Bearer tbk_has!bad$characters#here", id="malformed-key-characters"),
        pytest.param(f"Bearer {CALLER_KEYS['billing']} extra", id="malformed-key-with-space"),
    ],
)
@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", PAYMENTS), ("POST", INVALIDATE)],
)
def test_bad_caller_key_is_invalid_token(
    client: TestClient, authserver: AuthServerProcess, authorization: str | None, method: str, path: str
) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    response = client.request(method, path, headers=headers, json={"access_token": "t"})
    assert_error(response, 401, "invalid_token")
    assert response.headers["www-authenticate"] == WWW_AUTHENTICATE
    assert response.headers.get_list("www-authenticate") == [WWW_AUTHENTICATE]
    for key in (CALLER_KEYS["billing"], _UNKNOWN_KEY):  # a presented key is never echoed
        assert key not in response.text
    assert authserver.token_requests() == 0


# -- 403 access_denied ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "suffix", "kwargs"),
    [
        pytest.param("GET", "", {}, id="get"),
        pytest.param("GET", "", {"params": {"scope": READ, "min_ttl": "60"}}, id="get-with-query"),
        pytest.param("POST", "/invalidate", {"json": {"access_token": "t"}}, id="invalidate"),
    ],
)
def test_access_denied_is_identical_for_unknown_and_ungranted_credential(
    client: TestClient, authserver: AuthServerProcess, method: str, suffix: str, kwargs: dict[str, Any]
) -> None:
    # reporting is granted ledger only: payments exists, nope does not.
    existing = client.request(method, f"/v1/tokens/payments{suffix}", headers=auth("reporting"), **kwargs)
    unknown = client.request(method, f"/v1/tokens/nope{suffix}", headers=auth("reporting"), **kwargs)
    assert_error(existing, 403, "access_denied")
    assert existing.content == unknown.content
    assert existing.status_code == unknown.status_code
    assert dict(existing.headers) == dict(unknown.headers)
    assert "payments" not in existing.text
    assert authserver.token_requests() == 0


def test_access_denied_for_granted_caller_asking_for_unknown_credential(
    client: TestClient, authserver: AuthServerProcess
) -> None:
    assert_error(client.get("/v1/tokens/nope", headers=auth()), 403, "access_denied")
    assert authserver.token_requests() == 0


# -- 403 insufficient_scope -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("caller", "credential", "scope", "refused", "allowed"),
    [
        pytest.param("billing", "payments", ADMIN, [ADMIN], [], id="one-refused"),
        pytest.param("billing", "payments", f"{READ} {ADMIN} {WRITE}", [ADMIN], [READ, WRITE], id="mixed"),
        pytest.param("billing", "payments", f"{READ} urn:test:unknown", ["urn:test:unknown"], [READ], id="not-in-cred"),
        pytest.param("billing", "ledger", f"{WRITE} {ADMIN}", [WRITE, ADMIN], [], id="two-refused"),
        pytest.param("reporting", "ledger", WRITE, [WRITE], [], id="other-caller"),
    ],
)
def test_out_of_grant_scope_is_insufficient_scope(
    client: TestClient,
    authserver: AuthServerProcess,
    caller: str,
    credential: str,
    scope: str,
    refused: list[str],
    allowed: list[str],
) -> None:
    response = client.get(f"/v1/tokens/{credential}", params={"scope": scope}, headers=auth(caller))
    body = assert_error(response, 403, "insufficient_scope")
    for name in refused:
        assert name in body["error_description"]
    for name in allowed:
        assert name not in body["error_description"]
    assert authserver.token_requests() == 0


# -- 502 upstream_rejected --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "upstream_error", "upstream_status"),
    [
        ("invalid_client", "invalid_client", 401),
        ("invalid_scope", "invalid_scope", 400),
        ("unauthorized_client", "unauthorized_client", 400),
        ("invalid_grant", "invalid_grant", 400),
        ("401_empty", None, 401),
        ("403_empty", None, 403),
    ],
)
def test_upstream_refusal_is_upstream_rejected(
    client: TestClient,
    authserver: AuthServerProcess,
    fault: str,
    upstream_error: str | None,
    upstream_status: int,
) -> None:
    authserver.configure(fault=fault)
    response = client.get(PAYMENTS, params={"scope": READ}, headers=auth())
    body = assert_error(response, 502, "upstream_rejected", upstream=True)
    assert body["upstream_error"] == upstream_error
    assert body["upstream_status"] == upstream_status
    assert authserver.token_requests() == 1  # terminal: not retried


def test_wrong_client_secret_is_upstream_rejected_without_leaking_it(
    write_config: Callable[..., Path], authserver: AuthServerProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    wrong = "wrong-secret-do-not-show"
    monkeypatch.setenv("TB_API_WRONG_SECRET", wrong)
    with broker_client(write_config, ops_config(authserver, wrong_secret_env="TB_API_WRONG_SECRET")) as client:
        response = client.get("/v1/tokens/broken", headers=ops_auth())
    body = assert_error(response, 502, "upstream_rejected", upstream=True)
    assert (body["upstream_error"], body["upstream_status"]) == ("invalid_client", 401)
    assert wrong not in response.text


# -- 502 upstream_invalid_response ------------------------------------------------------------


@pytest.mark.parametrize(
    "config",
    [
        pytest.param({"fault": "html"}, id="html"),
        pytest.param({"fault": "array"}, id="array"),
        pytest.param({"fault": "bad_json"}, id="bad_json"),
        pytest.param({"fault": "missing_token"}, id="missing_token"),
        pytest.param({"fault": "empty_token"}, id="empty_token"),
        pytest.param({"fault": "huge"}, id="huge"),
        pytest.param({"fault": "redirect"}, id="redirect"),
        pytest.param({"token_type": "mac"}, id="token_type-mac"),
        pytest.param({"expires_in": 0}, id="expires_in-0"),
        pytest.param({"expires_in": -5}, id="expires_in-negative"),
        pytest.param({"expires_in": "garbage"}, id="expires_in-garbage"),
        pytest.param({"expires_in": True}, id="expires_in-boolean"),
        pytest.param({"expires_in": [3600]}, id="expires_in-array"),
    ],
)
def test_malformed_token_response_is_upstream_invalid_response(
    client: TestClient, authserver: AuthServerProcess, config: dict[str, Any]
) -> None:
    authserver.configure(**config)
    response = client.get(PAYMENTS, params={"scope": READ}, headers=auth())
    body = assert_error(response, 502, "upstream_invalid_response")
    assert "<html" not in body["error_description"]
    stats = authserver.stats()
    assert stats["token_requests"] >= 1
    assert stats["elsewhere_requests"] == 0  # a redirect is never followed


def test_invalid_response_is_not_cached(client: TestClient, authserver: AuthServerProcess) -> None:
    authserver.configure(fault="html", fault_count=1)
    assert_error(client.get(PAYMENTS, headers=auth()), 502, "upstream_invalid_response")
    token_body(client.get(PAYMENTS, headers=auth()))
    assert authserver.token_requests() == 2


# -- 503 upstream_unavailable -----------------------------------------------------------------


def _assert_retry_after(response: Any) -> None:
    value = response.headers["retry-after"]
    assert value.isdigit(), value
    assert int(value) >= 1


def test_persistent_5xx_is_upstream_unavailable_after_retries(
    client: TestClient, authserver: AuthServerProcess
) -> None:
    authserver.configure(fault="500")
    response = client.get(PAYMENTS, params={"scope": READ}, headers=auth())
    assert_error(response, 503, "upstream_unavailable")
    _assert_retry_after(response)
    assert authserver.token_requests() >= 2  # transient: retried before giving up


def test_transient_503_then_success_is_one_retry(client: TestClient, authserver: AuthServerProcess) -> None:
    authserver.configure(fault="503", fault_count=1)
    body = token_body(client.get(PAYMENTS, params={"scope": READ}, headers=auth()))
    assert body["access_token"]
    assert authserver.token_requests() == 2


@pytest.fixture
def one_attempt_client(write_config: Callable[..., Path], authserver: AuthServerProcess) -> Iterator[TestClient]:
    """A broker that does not retry, so that failure paths answer at once."""
    extra = ops_config(authserver, upstream="[upstream]\nmax_attempts = 1\n")
    with broker_client(write_config, extra) as test_client:
        yield test_client


@pytest.mark.parametrize("fault", ["503", "500", "429", "close"])
def test_unavailable_upstream_is_upstream_unavailable(
    one_attempt_client: TestClient, authserver: AuthServerProcess, fault: str
) -> None:
    authserver.configure(fault=fault)
    response = one_attempt_client.get(PAYMENTS, params={"scope": READ}, headers=auth())
    assert_error(response, 503, "upstream_unavailable")
    _assert_retry_after(response)
    assert authserver.token_requests() == 1


def test_unreachable_upstream_is_upstream_unavailable(
    write_config: Callable[..., Path], authserver: AuthServerProcess
) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    extra = ops_config(authserver, upstream="[upstream]\nmax_attempts = 1\n").replace(authserver.url, closed)
    with broker_client(write_config, extra) as client:
        response = client.get("/v1/tokens/journal", headers=ops_auth())
    assert_error(response, 503, "upstream_unavailable")
    _assert_retry_after(response)
