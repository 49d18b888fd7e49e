"""HEAD (RFC 9110 §9.3.2): a token route does not answer it, the service endpoints do.

Starlette answers HEAD for every GET route by running the GET endpoint and dropping the body, so
`HEAD /v1/tokens/{credential}` used to fetch a token upstream (or take one from the cache) only to
send no body. Under /v1/ HEAD is now 405 `method_not_allowed` with `Allow: GET`, after caller
authentication like every other answer there; /healthz, /readyz, /metrics and /openapi.yaml keep
answering HEAD like GET (load balancers probe with it).
"""

from __future__ import annotations

import time

import pytest
from starlette.testclient import TestClient

from tests.api.helpers import WWW_AUTHENTICATE, assert_error
from tests.conftest import READ, WRITE, auth
from tests.support import AuthServerProcess

TOKEN_URLS = [
    "/v1/tokens/payments",
    f"/v1/tokens/payments?scope={READ}",
    f"/v1/tokens/payments?scope={READ}+{WRITE}&min_ttl=60",
    f"/v1/tokens/ledger?scope={READ}",
    "/v1/tokens/nope",  # no such credential: the same answer
]


def assert_head_refused(client: TestClient, url: str) -> None:
    response = client.head(url, headers=auth())
    assert response.status_code == 405, (url, response.status_code, response.headers)
    assert response.headers["allow"] == "GET", url
    assert response.headers["content-type"].split(";")[0] == "application/json", url
    if response.content:  # the HTTP server drops it on the wire; in-process it is the JSON error
        assert_error(response, 405, "method_not_allowed")


def test_head_on_a_token_route_is_405_and_fetches_nothing(client: TestClient, authserver: AuthServerProcess) -> None:
    """HEAD /v1/tokens/… used to fetch a token upstream: now 405 `Allow: GET`, no upstream request."""
    answers = [(url, client.head(url, headers=auth()).status_code) for url in TOKEN_URLS]
    assert authserver.token_requests() == 0, f"HEAD went upstream: {answers}"
    for url in TOKEN_URLS:
        assert_head_refused(client, url)
    assert authserver.token_requests() == 0


def test_head_is_405_with_the_token_in_l1_too(client: TestClient, authserver: AuthServerProcess) -> None:
    """With the token cached in this worker (where the L1 fast path answers GET), HEAD still gets
    405 and no token, and the next GET is still a cache hit."""
    first = client.get(f"/v1/tokens/payments?scope={READ}", headers=auth())
    assert first.status_code == 200, first.text
    assert authserver.token_requests() == 1
    for url in TOKEN_URLS:
        assert_head_refused(client, url)
        assert first.json()["access_token"] not in client.head(url, headers=auth()).text
    again = client.get(f"/v1/tokens/payments?scope={READ}", headers=auth())
    assert again.json()["access_token"] == first.json()["access_token"]
    assert authserver.token_requests() == 1


def test_head_without_a_caller_key_is_401_first(client: TestClient) -> None:
    response = client.head("/v1/tokens/payments")
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == WWW_AUTHENTICATE


def test_head_on_invalidate_is_405_allow_post(client: TestClient, authserver: AuthServerProcess) -> None:
    response = client.head("/v1/tokens/payments/invalidate", headers=auth())
    assert response.status_code == 405
    assert response.headers["allow"] == "POST"
    assert authserver.token_requests() == 0


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/metrics", "/openapi.yaml"])
def test_head_on_service_endpoints_answers_like_get(client: TestClient, path: str) -> None:
    deadline = time.monotonic() + 3
    while client.get("/readyz").status_code == 503 and time.monotonic() < deadline:  # until Redis answered once
        time.sleep(0.02)
    get = client.get(path)
    head = client.head(path)
    assert head.status_code == get.status_code
    assert head.headers["content-type"] == get.headers["content-type"]
