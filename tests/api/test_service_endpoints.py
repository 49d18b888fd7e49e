"""Service endpoints (spec §3.4) and the JSON answers for unknown routes and wrong methods.
None of these need a caller key, except that everything under /v1/ does."""

from __future__ import annotations

import time

import pytest
from starlette.testclient import TestClient

from tests.api.helpers import WWW_AUTHENTICATE, assert_error
from tests.conftest import auth


def test_healthz(client: TestClient) -> None:
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.headers["content-type"].split(";")[0] == "application/json"
    assert response.json() == {"status": "ok"}


def test_healthz_ignores_a_bad_caller_key(client: TestClient) -> None:
    assert client.get("/healthz", headers={"Authorization": "Bearer nope"}).status_code == 200


def test_readyz_once_redis_answered(client: TestClient) -> None:
    # 503 is allowed only until Redis has answered once, which happens right after start.
    deadline = time.monotonic() + 3
    response = client.get("/readyz")
    while response.status_code == 503 and time.monotonic() < deadline:
        time.sleep(0.02)
        response = client.get("/readyz")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].split(";")[0] == "application/json"
    assert response.json() == {"status": "ok", "redis": "ok"}


@pytest.mark.parametrize("path", ["/nope", "/v2/tokens/payments", "/healthz/extra"])
def test_unknown_route_is_json_404(client: TestClient, path: str) -> None:
    body = assert_error(client.get(path), 404, "not_found")
    assert body["error_description"]


def test_unknown_v1_route_with_a_key_is_json_404(client: TestClient) -> None:
    assert_error(client.get("/v1/nope", headers=auth()), 404, "not_found")
    assert_error(client.get("/v1/tokens/payments/extra/parts", headers=auth()), 404, "not_found")


@pytest.mark.parametrize(
    ("method", "path"),
    [("POST", "/healthz"), ("DELETE", "/readyz"), ("PUT", "/healthz")],
)
def test_wrong_method_is_json_405(client: TestClient, method: str, path: str) -> None:
    response = client.request(method, path)
    assert_error(response, 405, "method_not_allowed")
    assert "GET" in response.headers["allow"]


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("POST", "/v1/tokens/payments", "GET"),
        ("DELETE", "/v1/tokens/payments", "GET"),
        ("GET", "/v1/tokens/payments/invalidate", "POST"),
    ],
)
def test_wrong_method_on_v1_with_a_key_is_json_405(client: TestClient, method: str, path: str, allowed: str) -> None:
    response = client.request(method, path, headers=auth())
    assert_error(response, 405, "method_not_allowed")
    assert allowed in response.headers["allow"]


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/"),
        ("GET", "/v1/nope"),
        ("GET", "/v1/tokens"),
        ("DELETE", "/v1/tokens/payments"),
        ("GET", "/v1/tokens/payments/invalidate"),
    ],
)
def test_v1_without_a_key_is_401_even_for_unknown_paths(client: TestClient, method: str, path: str) -> None:
    response = client.request(method, path)
    assert_error(response, 401, "invalid_token")
    assert response.headers["www-authenticate"] == WWW_AUTHENTICATE


@pytest.mark.parametrize("path", ["/healthz/", "/v1/tokens/payments/"])
def test_trailing_slash_is_a_json_404_not_a_redirect(client: TestClient, path: str) -> None:
    response = client.get(path, headers=auth(), follow_redirects=False)
    assert_error(response, 404, "not_found")
