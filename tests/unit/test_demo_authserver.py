"""The demo authorization server of `token-broker dev` (broker/demo.py): its login page and the
authorization code grant a broker runs against it, through its real app."""

from __future__ import annotations

import base64
import hashlib
import re
import secrets
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest
from joserfc import jwt
from joserfc.jwk import KeySet
from starlette.testclient import TestClient

from broker.demo import DEMO_CLIENT_ID, DEMO_PASSWORD, DEMO_SUBJECT, DEMO_USER, create_demo_authserver
from tests.support import LoginForm

ISSUER = "http://testserver"
SECRET = "demo-secret"
CALLBACK = "http://127.0.0.1:8080/v1/oauth/callback"
CLIENT = (DEMO_CLIENT_ID, SECRET)


@pytest.fixture
def demo() -> Iterator[TestClient]:
    app = create_demo_authserver(ISSUER, SECRET, redirect_uris=[CALLBACK])
    with TestClient(app, base_url=ISSUER, follow_redirects=False) as client:
        yield client


def _authorize(verifier: str, **overrides: str | None) -> str:
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    params: dict[str, str | None] = {
        "response_type": "code",
        "client_id": DEMO_CLIENT_ID,
        "redirect_uri": CALLBACK,
        "scope": "openid urn:demo:claims.read",
        "state": "st",
        "nonce": "nn",
        "code_challenge": challenge,
        "code_challenge_method": "S256",
    } | overrides
    return "/authorize?" + urlencode({k: v for k, v in params.items() if v is not None})


def _callback(response: httpx.Response) -> httpx.URL:
    assert response.status_code in (302, 303), response.text
    location = httpx.URL(response.headers["location"])
    assert str(location.copy_with(query=None)) == CALLBACK
    return location


def _log_in(
    demo: TestClient, verifier: str, password: str = DEMO_PASSWORD, decision: str = "allow", **overrides: str | None
) -> httpx.Response:
    page = demo.get(_authorize(verifier, **overrides))
    assert page.status_code == 200, page.text
    form = LoginForm.parse(page.text)
    fields = {**form.hidden, "username": DEMO_USER, "password": password, "decision": decision}
    return demo.post(form.action, data=fields)


def _signed_in(demo: TestClient, **overrides: str | None) -> dict[str, Any]:
    verifier = secrets.token_urlsafe(32)
    code = _callback(_log_in(demo, verifier, **overrides)).params["code"]
    form = {"grant_type": "authorization_code", "code": code, "redirect_uri": CALLBACK, "code_verifier": verifier}
    response = demo.post("/oauth/token", data=form, auth=CLIENT)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body | {"code": code, "verifier": verifier}


def _refresh(demo: TestClient, refresh_token: str, **extra: str) -> httpx.Response:
    return demo.post(
        "/oauth/token", data={"grant_type": "refresh_token", "refresh_token": refresh_token, **extra}, auth=CLIENT
    )


def test_the_login_page_has_no_script_and_a_strict_csp(demo: TestClient) -> None:
    page = demo.get(_authorize("v" * 43))
    assert page.status_code == 200
    csp = page.headers["content-security-policy"]
    assert "default-src 'none'" in csp
    assert "script-src" not in csp  # falls back to default-src 'none'
    assert "form-action 'self' http://127.0.0.1:8080;" in csp
    assert "frame-ancestors 'none'" in csp
    (style,) = re.findall(r"<style>(.*?)</style>", page.text)
    digest = base64.b64encode(hashlib.sha256(style.encode()).digest()).decode()
    assert f"style-src 'sha256-{digest}'" in csp  # the one inline style, by hash
    assert "<script" not in page.text
    assert f"<code>{DEMO_USER}</code>" in page.text
    assert page.headers["cache-control"] == "no-store"


def test_a_login_buys_tokens_for_the_demo_user(demo: TestClient) -> None:
    location = _callback(_log_in(demo, "v" * 43))
    assert (location.params["state"], location.params["iss"]) == ("st", ISSUER)
    body = _signed_in(demo, scope="openid profile urn:demo:claims.read")
    assert set(body) >= {"access_token", "refresh_token", "id_token", "expires_in", "scope"}
    keys = KeySet.import_key_set(demo.get("/jwks").json())
    claims = jwt.decode(body["id_token"], keys, algorithms=["RS256"]).claims
    assert (claims["iss"], claims["sub"], claims["aud"], claims["azp"]) == (
        ISSUER,
        DEMO_SUBJECT,
        DEMO_CLIENT_ID,
        DEMO_CLIENT_ID,
    )
    assert claims["nonce"] == "nn"
    assert claims["name"] == "Demo User"
    assert claims["iat"] >= claims["auth_time"]
    access = jwt.decode(body["access_token"], keys, algorithms=["RS256"]).claims
    assert (access["sub"], access["scope"]) == (DEMO_SUBJECT, "openid profile urn:demo:claims.read")


@pytest.mark.parametrize(
    "overrides",
    [{"redirect_uri": CALLBACK + "/"}, {"redirect_uri": "http://evil.example/cb"}, {"client_id": "other"}],
)
def test_a_bad_client_or_redirect_uri_is_a_page_not_a_redirect(demo: TestClient, overrides: dict[str, str]) -> None:
    page = demo.get(_authorize("v" * 43, **overrides))
    assert page.status_code == 400
    assert "location" not in page.headers


@pytest.mark.parametrize(
    ("overrides", "error"),
    [
        ({"scope": "urn:demo:claims.read"}, "invalid_scope"),
        ({"scope": "openid urn:other"}, "invalid_scope"),
        ({"response_type": "token"}, "unsupported_response_type"),
        ({"nonce": None}, "invalid_request"),
        ({"code_challenge_method": "plain"}, "invalid_request"),
        ({"code_challenge": None}, "invalid_request"),
    ],
)
def test_other_request_errors_go_back_with_state(
    demo: TestClient, overrides: dict[str, str | None], error: str
) -> None:
    location = _callback(demo.get(_authorize("v" * 43, **overrides)))
    assert (location.params["error"], location.params["state"]) == (error, "st")


def test_wrong_password_and_deny(demo: TestClient) -> None:
    wrong = _log_in(demo, "v" * 43, password="guess")
    assert wrong.status_code == 200
    assert "Wrong username or password." in wrong.text
    denied = _callback(_log_in(demo, "v" * 43, decision="deny"))
    assert (denied.params["error"], denied.params["state"]) == ("access_denied", "st")
    assert "code" not in denied.params


def test_the_code_needs_its_verifier_and_redirect_uri_and_works_once(demo: TestClient) -> None:
    verifier = secrets.token_urlsafe(32)
    code = _callback(_log_in(demo, verifier)).params["code"]
    form = {"grant_type": "authorization_code", "code": code, "redirect_uri": CALLBACK, "code_verifier": verifier}
    for wrong in (
        {"code_verifier": secrets.token_urlsafe(32)},
        {"code_verifier": ""},
        {"redirect_uri": CALLBACK + "x"},
    ):
        refused = demo.post("/oauth/token", data=form | wrong, auth=CLIENT)
        assert (refused.status_code, refused.json()["error"]) == (400, "invalid_grant")
    first = demo.post("/oauth/token", data=form, auth=CLIENT)
    assert first.status_code == 200
    again = demo.post("/oauth/token", data=form, auth=CLIENT)
    assert again.json()["error"] == "invalid_grant"
    # RFC 6749 §4.1.2: what the first redemption got is revoked
    assert _refresh(demo, first.json()["refresh_token"]).json()["error"] == "invalid_grant"


def test_refresh_tokens_rotate_and_a_reuse_revokes_the_grant(demo: TestClient) -> None:
    body = _signed_in(demo)
    renewed = _refresh(demo, body["refresh_token"])
    assert renewed.status_code == 200
    newer = renewed.json()["refresh_token"]
    assert newer != body["refresh_token"]
    assert "id_token" in renewed.json()
    assert _refresh(demo, body["refresh_token"]).json()["error"] == "invalid_grant"
    assert _refresh(demo, newer).json()["error"] == "invalid_grant"  # the whole grant, RFC 9700 §4.14
    other = _signed_in(demo)
    assert _refresh(demo, other["refresh_token"]).status_code == 200  # other grants live on


def test_refresh_may_narrow_the_scope(demo: TestClient) -> None:
    body = _signed_in(demo)
    narrow = _refresh(demo, body["refresh_token"], scope="urn:demo:claims.read")
    assert narrow.json()["scope"] == "urn:demo:claims.read"
    assert "id_token" not in narrow.json()
    wide = _refresh(demo, narrow.json()["refresh_token"], scope="urn:demo:claims.write")
    assert wide.json()["error"] == "invalid_scope"
    assert _refresh(demo, narrow.json()["refresh_token"]).json()["scope"] == body["scope"]


def test_revocation(demo: TestClient) -> None:
    body = _signed_in(demo)
    assert demo.post("/revoke", data={"token": body["refresh_token"]}).status_code == 401
    assert demo.post("/revoke", data={"token": "unknown"}, auth=CLIENT).status_code == 200
    assert demo.post("/revoke", data={"token": body["refresh_token"]}, auth=CLIENT).status_code == 200
    assert _refresh(demo, body["refresh_token"]).json()["error"] == "invalid_grant"


def test_a_non_ascii_client_secret_is_refused_not_a_crash() -> None:
    """Defect: the demo compared secrets with hmac.compare_digest on str, which raises TypeError
    for non-ASCII input: a Basic header with "é" in the secret got a 500 instead of a 401."""
    raw = base64.b64encode("demo-client:sécret".encode()).decode()
    with TestClient(create_demo_authserver(ISSUER, SECRET), base_url=ISSUER, raise_server_exceptions=False) as demo:
        response = demo.post(
            "/oauth/token", data={"grant_type": "client_credentials"}, headers={"Authorization": f"Basic {raw}"}
        )
    assert (response.status_code, response.json()["error"]) == (401, "invalid_client")


def test_discovery_and_client_credentials(demo: TestClient) -> None:
    metadata = demo.get("/.well-known/openid-configuration").json()
    assert metadata["authorization_endpoint"] == f"{ISSUER}/authorize"
    assert metadata["revocation_endpoint"] == f"{ISSUER}/revoke"
    assert metadata["code_challenge_methods_supported"] == ["S256"]
    assert metadata["id_token_signing_alg_values_supported"] == ["RS256"]
    token = demo.post("/oauth/token", data={"grant_type": "client_credentials"}, auth=CLIENT)
    assert token.json()["scope"] == "urn:demo:claims.read"


def test_without_redirect_uris_no_login_can_start() -> None:
    with TestClient(create_demo_authserver(ISSUER, SECRET), base_url=ISSUER, follow_redirects=False) as demo:
        assert demo.get(_authorize("v" * 43)).status_code == 400
