"""Users who log in (spec §5), in-process against the real test authorization server: the whole
flow — start, the user's login, the callback, a subject's token, refresh, logout."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from starlette.testclient import TestClient

from broker.api import create_app
from broker.settings import load_settings
from tests.conftest import CALLER_KEYS, READ, SECRET_ENV, auth
from tests.support import CLIENT_ID, AuthServerProcess

PUBLIC = "http://testserver"
CALLBACK = f"{PUBLIC}/v1/oauth/callback"


def user_config(authserver: AuthServerProcess, subjects: str = "own") -> str:
    return f"""
[server]
public_url = "{PUBLIC}"

[credentials.portal]
issuer = "{authserver.url}"
client_id = "{CLIENT_ID}"
client_secret = {{ env = "{SECRET_ENV}" }}
grant = "authorization_code"
scopes = ["{READ}"]
default_scopes = ["{READ}"]
return_to_allow = ["https://app.example.com/done"]
"""


@pytest.fixture
def app(write_config: Callable[..., Path], authserver: AuthServerProcess) -> Iterator[TestClient]:
    authserver.register_redirect_uris(CALLBACK)
    text = user_config(authserver)
    path = write_config(text)
    raw = path.read_text()
    # billing may read its own users of portal; reporting any user's
    raw = raw.replace("[callers.billing.grants]\n", '[callers.billing.grants]\nportal = ["' + READ + '"]\n').replace(
        "[callers.reporting.grants]\n",
        '[callers.reporting.grants]\nportal = { scopes = ["' + READ + '"], subjects = "any" }\n',
    )
    path.write_text(raw)
    with TestClient(create_app(load_settings(path)), raise_server_exceptions=False) as client:
        yield client


def log_in(
    app: TestClient, authserver: AuthServerProcess, user: str = "alice", caller: str = "billing"
) -> dict[str, Any]:
    started = app.post("/v1/authorizations/portal", json={}, headers=auth(caller))
    assert started.status_code == 200, started.text
    body = started.json()
    back = authserver.login(body["authorize_url"], user)
    assert str(back).startswith(CALLBACK), back
    done = app.get(f"/v1/oauth/callback?{urlsplit(str(back)).query}", headers={"Accept": "application/json"})
    assert done.status_code == 200, done.text
    result: dict[str, Any] = done.json()
    return result


def test_the_whole_flow(app: TestClient, authserver: AuthServerProcess) -> None:
    started = app.post("/v1/authorizations/portal", json={}, headers=auth())
    url = urlsplit(started.json()["authorize_url"])
    query = parse_qs(url.query)
    assert query["response_type"] == ["code"]
    assert query["redirect_uri"] == [CALLBACK]
    assert "openid" in query["scope"][0].split()
    assert query["code_challenge_method"] == ["S256"]
    assert "nonce" in query
    assert "state" in query
    login = log_in(app, authserver)
    subject = login["subject"]
    token = app.get(f"/v1/tokens/portal/subjects/{subject}", headers=auth())
    assert token.status_code == 200, token.text
    first = token.json()["access_token"]
    # served from the cache: no refresh
    assert app.get(f"/v1/tokens/portal/subjects/{subject}", headers=auth()).json()["access_token"] == first
    grants = authserver.grants()
    assert [g["refreshes"] for g in grants.values()] == [0]
    # another caller with "own" may not read it; "any" may
    other = app.get(f"/v1/tokens/portal/subjects/{subject}", headers=auth("reporting"))
    assert other.status_code == 200, other.text
    # logout: revoked upstream, forgotten here
    assert app.delete(f"/v1/tokens/portal/subjects/{subject}", headers=auth()).status_code == 204
    assert authserver.stats()["revocations"]
    gone = app.get(f"/v1/tokens/portal/subjects/{subject}", headers=auth("reporting"))
    assert gone.status_code == 409, gone.text
    assert gone.json()["error"] == "reauthorization_required"


def test_a_refresh_spends_the_refresh_token_once_and_rotates_it(app: TestClient, authserver: AuthServerProcess) -> None:
    authserver.configure(lifetime=6)
    subject = log_in(app, authserver)["subject"]
    path = f"/v1/tokens/portal/subjects/{subject}"
    first = app.get(path, headers=auth()).json()["access_token"]
    time.sleep(3.2)  # less than half its 6 s left: min_ttl (at most half a lifetime) wants a fresher one
    refreshed = app.get(path, params={"min_ttl": "5"}, headers=auth())
    assert refreshed.status_code == 200, refreshed.text
    assert refreshed.json()["access_token"] != first
    (grant,) = authserver.grants().values()
    assert grant["refreshes"] == 1
    assert not grant["revoked"]
    # the server revokes the grant (the user withdrew consent): once the cached token is too old,
    # the refresh is refused, and the answer is 409 (a still-valid token beats it until then)
    authserver.revoke_grants(sub=subject)
    time.sleep(3.2)
    still = app.get(path, params={"min_ttl": "5"}, headers=auth())
    assert still.status_code == 200, still.text
    time.sleep(1.5)  # past the cached window (4.5 s of 6)
    dead = app.get(path, headers=auth())
    assert dead.status_code == 409, dead.text
    assert dead.json()["error"] == "reauthorization_required"


def test_subject_hits_take_the_fast_path_with_the_routes_answer(app: TestClient, authserver: AuthServerProcess) -> None:
    from broker.api.fastpath import FastPath

    subject = log_in(app, authserver)["subject"]
    path = f"/v1/tokens/portal/subjects/{subject}"
    slow = app.get(path, headers=auth())  # L2 → L1, and the access check is remembered
    assert slow.status_code == 200
    served: list[bool] = []
    original = FastPath._hit

    def spy(self: FastPath, scope: dict[str, Any]) -> Any:
        answer = original(self, scope)
        served.append(answer is not None)
        return answer

    FastPath._hit = spy  # type: ignore[method-assign]
    try:
        fast = app.get(path, headers=auth())
    finally:
        FastPath._hit = original  # type: ignore[method-assign]
    assert served == [True]
    assert fast.headers.get("content-type") == slow.headers.get("content-type")
    fast_body, slow_body = fast.json(), slow.json()
    assert fast_body["access_token"] == slow_body["access_token"]
    assert set(fast_body) == set(slow_body)
    assert abs(fast_body["expires_in"] - slow_body["expires_in"]) <= 1


def test_a_credential_users_log_in_to_gives_no_client_credentials_token(app: TestClient) -> None:
    response = app.get("/v1/tokens/portal", headers=auth())
    assert response.status_code == 400
    assert "/v1/tokens/portal/subjects/" in response.json()["error_description"]
    assert CALLER_KEYS["billing"] not in response.text
