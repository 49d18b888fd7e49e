"""The test authorization server's authorization code grant, refresh tokens, revocation and
their fault switches, exercised over real HTTP: the broker's subject tests are only as good
as this server is strict."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import secrets
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs, urlencode

import httpx
import pytest
from joserfc import jwt
from joserfc.errors import BadSignatureError, JoseError
from joserfc.jwk import KeySet

from tests.support import CLIENT_ID, CLIENT_SECRET, WEIRD_CLIENT_ID, WEIRD_CLIENT_SECRET, AuthServerProcess, LoginForm

REDIRECT = "http://127.0.0.1:9/v1/oauth/callback"  # never followed: the test is the browser
CLIENT = (CLIENT_ID, CLIENT_SECRET)


@pytest.fixture(scope="module")
def server() -> Iterator[AuthServerProcess]:
    with AuthServerProcess() as srv:
        yield srv


@pytest.fixture(autouse=True)
def _fresh_server(server: AuthServerProcess) -> None:
    server.reset()
    server.register_redirect_uris(REDIRECT)


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=10.0, trust_env=False) as client:
        yield client


@dataclasses.dataclass
class Login:
    code: str
    verifier: str
    state: str
    nonce: str


def _challenge(verifier: str) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()


def authorize_url(server: AuthServerProcess, verifier: str = "v" * 43, **overrides: str | None) -> str:
    """An authorization request as the broker builds it; an override of None leaves the parameter out."""
    params: dict[str, str | None] = {
        "response_type": "code",
        "client_id": CLIENT_ID,
        "redirect_uri": REDIRECT,
        "scope": "openid email urn:a urn:b",
        "state": "the-state",
        "nonce": "the-nonce",
        "code_challenge": _challenge(verifier),
        "code_challenge_method": "S256",
    } | overrides
    return f"{server.url}/authorize?" + urlencode({k: v for k, v in params.items() if v is not None})


def answer(location: httpx.URL) -> dict[str, str]:
    """The authorization response's parameters, after checking it goes to REDIRECT."""
    assert str(location.copy_with(query=None)) == REDIRECT
    return {name: values[0] for name, values in parse_qs(location.query.decode(), strict_parsing=True).items()}


def log_in(server: AuthServerProcess, username: str = "alice", **overrides: str | None) -> Login:
    verifier = secrets.token_urlsafe(32)
    state, nonce = secrets.token_urlsafe(8), secrets.token_urlsafe(8)
    url = authorize_url(server, verifier, state=state, nonce=nonce, **overrides)
    got = answer(server.login(url, username))
    assert got["state"] == state, got
    return Login(got["code"], verifier, state, nonce)


def redeem(
    http: httpx.Client,
    server: AuthServerProcess,
    login: Login,
    *,
    verifier: str | None = None,
    redirect_uri: str = REDIRECT,
    client: tuple[str, str] = CLIENT,
) -> httpx.Response:
    form = {"grant_type": "authorization_code", "code": login.code, "redirect_uri": redirect_uri}
    form["code_verifier"] = verifier if verifier is not None else login.verifier
    return http.post(server.token_url, data=form, auth=client)


def refresh(
    http: httpx.Client, server: AuthServerProcess, refresh_token: str, client: tuple[str, str] = CLIENT, **extra: str
) -> httpx.Response:
    form = {"grant_type": "refresh_token", "refresh_token": refresh_token, **extra}
    return http.post(server.token_url, data=form, auth=client)


def signed_in(
    http: httpx.Client, server: AuthServerProcess, username: str = "alice", **overrides: str
) -> dict[str, Any]:
    """Log in and redeem the code: the token answer, plus the login under "login"."""
    login = log_in(server, username, **overrides)
    response = redeem(http, server, login)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body | {"login": login}


def jwks(http: httpx.Client, server: AuthServerProcess) -> KeySet:
    return KeySet.import_key_set(http.get(f"{server.url}/jwks").json())


def verified(http: httpx.Client, server: AuthServerProcess, token: str) -> dict[str, Any]:
    claims: dict[str, Any] = jwt.decode(token, jwks(http, server), algorithms=["RS256"]).claims
    return claims


def unverified(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(header, claims) of a JWT, signature unchecked."""
    header, payload = (
        json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))) for part in token.split(".")[:2]
    )
    return header, payload


def userinfo(http: httpx.Client, server: AuthServerProcess, access_token: str) -> httpx.Response:
    return http.get(f"{server.url}/userinfo", headers={"Authorization": f"Bearer {access_token}"})


def the_grant(server: AuthServerProcess) -> dict[str, Any]:
    (grant,) = server.grants().values()
    return grant


# --- discovery ------------------------------------------------------------------------------


def test_discovery_advertises_the_code_flow(server: AuthServerProcess, http: httpx.Client) -> None:
    url = f"{server.url}/.well-known/openid-configuration"
    metadata = http.get(url).json()
    assert metadata["authorization_endpoint"] == f"{server.url}/authorize"
    assert metadata["revocation_endpoint"] == f"{server.url}/revoke"
    assert metadata["jwks_uri"] == f"{server.url}/jwks"
    assert metadata["response_types_supported"] == ["code"]
    assert set(metadata["grant_types_supported"]) == {"client_credentials", "authorization_code", "refresh_token"}
    assert metadata["code_challenge_methods_supported"] == ["S256"]
    assert metadata["id_token_signing_alg_values_supported"] == ["RS256"]
    assert "openid" in metadata["scopes_supported"]
    assert metadata["subject_types_supported"] == ["public"]

    server.configure(advertise_revocation=False)
    assert "revocation_endpoint" not in http.get(url).json()


# --- /authorize -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "error"),
    [
        ({"client_id": None}, "invalid_request"),
        ({"client_id": "nobody"}, "invalid_client"),
        ({"redirect_uri": None}, "invalid_request"),
        ({"redirect_uri": "http://127.0.0.1:9/elsewhere"}, "invalid_request"),
        ({"redirect_uri": REDIRECT + "/"}, "invalid_request"),  # exact match: no trailing slash
        ({"redirect_uri": REDIRECT + "?x=1"}, "invalid_request"),
        ({"redirect_uri": REDIRECT.replace("127.0.0.1", "localhost")}, "invalid_request"),
        ({"redirect_uri": REDIRECT, "client_id": WEIRD_CLIENT_ID}, "invalid_request"),  # another client's URI
    ],
)
def test_errors_before_the_redirect_uri_is_known_good_are_a_page_never_a_redirect(
    server: AuthServerProcess, http: httpx.Client, overrides: dict[str, str | None], error: str
) -> None:
    page = http.get(authorize_url(server, **overrides))
    assert page.status_code == 400
    assert "location" not in page.headers
    assert page.headers["content-type"].startswith("text/html")
    assert f'<code id="error">{error}</code>' in page.text


def test_a_repeated_redirect_uri_is_a_page(server: AuthServerProcess, http: httpx.Client) -> None:
    page = http.get(authorize_url(server) + "&" + urlencode({"redirect_uri": REDIRECT}))
    assert page.status_code == 400
    assert "location" not in page.headers


@pytest.mark.parametrize(
    ("overrides", "error"),
    [
        ({"response_type": None}, "invalid_request"),
        ({"response_type": "token"}, "unsupported_response_type"),
        ({"response_type": "code id_token"}, "unsupported_response_type"),
        ({"scope": "urn:a"}, "invalid_scope"),  # no openid
        ({"scope": None}, "invalid_scope"),
        ({"scope": "openid admin"}, "invalid_scope"),
        ({"nonce": None}, "invalid_request"),
        ({"code_challenge": None}, "invalid_request"),
        ({"code_challenge_method": None}, "invalid_request"),
        ({"code_challenge_method": "plain"}, "invalid_request"),
        ({"code_challenge": "too-short"}, "invalid_request"),
        ({"response_mode": "fragment"}, "invalid_request"),
        ({"prompt": "none"}, "login_required"),
        ({"request": "eyJhbGciOiJub25lIn0.e30."}, "request_not_supported"),
    ],
)
def test_errors_after_the_redirect_uri_go_back_to_it_with_state(
    server: AuthServerProcess, http: httpx.Client, overrides: dict[str, str | None], error: str
) -> None:
    response = http.get(authorize_url(server, **overrides))
    assert response.status_code == 302
    got = answer(httpx.URL(response.headers["location"]))
    assert got["error"] == error
    assert got["error_description"]
    assert got["state"] == "the-state"
    assert got["iss"] == server.url  # RFC 9207
    assert "code" not in got


def test_a_missing_state_is_refused(server: AuthServerProcess, http: httpx.Client) -> None:
    response = http.get(authorize_url(server, state=None))
    got = answer(httpx.URL(response.headers["location"]))
    assert got["error"] == "invalid_request"
    assert "state" not in got


def test_the_login_page_is_a_plain_form_with_a_strict_csp(server: AuthServerProcess, http: httpx.Client) -> None:
    page = http.get(authorize_url(server, login_hint="bob"))
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert page.headers["cache-control"] == "no-store"
    csp = page.headers["content-security-policy"]
    assert "default-src 'none'" in csp
    assert "form-action 'self' http://127.0.0.1:9" in csp  # the form's redirect to the client
    assert "<script" not in page.text
    form = LoginForm.parse(page.text)
    assert form.action == "/authorize"
    assert form.hidden["redirect_uri"] == REDIRECT
    assert form.hidden["state"] == "the-state"
    assert 'name="username" value="bob"' in page.text  # login_hint
    assert "openid email urn:a urn:b" in page.text  # what the client asks for


def test_a_wrong_password_shows_the_form_again(server: AuthServerProcess, http: httpx.Client) -> None:
    page = http.get(authorize_url(server))
    fields = {**LoginForm.parse(page.text).hidden, "username": "alice", "password": "guess", "decision": "allow"}
    again = http.post(f"{server.url}/authorize", data=fields)
    assert again.status_code == 200
    assert "location" not in again.headers
    assert "Wrong username or password." in again.text
    assert LoginForm.parse(again.text).hidden == LoginForm.parse(page.text).hidden
    for name in ("nobody", ""):
        fields |= {"username": name, "password": "alice-password"}
        assert "Wrong username or password." in http.post(f"{server.url}/authorize", data=fields).text
    stats = server.stats()
    assert (stats["login_failures"], stats["logins"], stats["codes_issued"]) == (3, 0, 0)
    with pytest.raises(AssertionError, match="without a redirect"):
        server.login(authorize_url(server), "alice", "guess")


def test_deny_sends_access_denied_with_state(server: AuthServerProcess) -> None:
    got = answer(server.login(authorize_url(server), decision="deny"))
    assert got["error"] == "access_denied"
    assert got["state"] == "the-state"
    assert "code" not in got
    assert server.stats()["consent_denials"] == 1


def test_allow_sends_a_code_with_state_and_iss(server: AuthServerProcess) -> None:
    location = server.login(authorize_url(server))
    got = answer(location)
    assert set(got) == {"code", "state", "iss"}
    assert got["state"] == "the-state"
    assert got["iss"] == server.url
    assert len(got["code"]) >= 43


def test_the_redirect_uri_keeps_its_own_query(server: AuthServerProcess) -> None:
    with_query = REDIRECT + "?tenant=a"
    server.register_redirect_uris(with_query)
    location = server.login(authorize_url(server, redirect_uri=with_query))
    assert location.params["tenant"] == "a"
    assert location.params["state"] == "the-state"


def test_the_posted_form_is_checked_again(server: AuthServerProcess, http: httpx.Client) -> None:
    """Hidden fields are the browser's to change: a swapped redirect_uri is refused, not followed."""
    page = http.get(authorize_url(server))
    fields = {**LoginForm.parse(page.text).hidden, "username": "alice", "password": "alice-password"}
    tampered = http.post(
        f"{server.url}/authorize", data=fields | {"redirect_uri": "http://evil.example/cb", "decision": "allow"}
    )
    assert tampered.status_code == 400
    assert "location" not in tampered.headers
    no_pkce = http.post(
        f"{server.url}/authorize", data=fields | {"code_challenge_method": "plain", "decision": "allow"}
    )
    assert answer(httpx.URL(no_pkce.headers["location"]))["error"] == "invalid_request"
    assert server.stats()["codes_issued"] == 0


# --- the code exchange ----------------------------------------------------------------------


def test_the_code_buys_access_refresh_and_id_token(server: AuthServerProcess, http: httpx.Client) -> None:
    server.configure(lifetime=600)
    before = int(time.time())
    body = signed_in(http, server)
    login = body["login"]
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == 600
    assert body["scope"] == "openid email urn:a urn:b"
    assert body["refresh_token"]

    header, _ = unverified(body["id_token"])
    assert header["alg"] == "RS256"
    assert header["kid"] in {key["kid"] for key in http.get(f"{server.url}/jwks").json()["keys"]}
    claims = verified(http, server, body["id_token"])
    assert claims["iss"] == server.url
    assert claims["sub"] == "user-alice"
    assert claims["aud"] == CLIENT_ID
    assert claims["azp"] == CLIENT_ID
    assert claims["nonce"] == login.nonce
    assert before <= claims["auth_time"] <= claims["iat"] < claims["exp"]
    assert claims["email"] == "alice@example.com"
    digest = hashlib.sha256(body["access_token"].encode()).digest()[:16]
    assert claims["at_hash"] == base64.urlsafe_b64encode(digest).rstrip(b"=").decode()

    access = verified(http, server, body["access_token"])
    assert (access["sub"], access["client_id"], access["scope"]) == ("user-alice", CLIENT_ID, body["scope"])
    assert access["exp"] - access["iat"] in (600, 601)  # iat rounded down, exp up
    info = userinfo(http, server, body["access_token"])
    assert info.json() == {"sub": "user-alice", "email": "alice@example.com", "email_verified": True}
    grant = the_grant(server)
    assert (grant["sub"], grant["client_id"], grant["refreshes"], grant["revoked"]) == (
        "user-alice",
        CLIENT_ID,
        0,
        False,
    )


def test_a_sub_with_a_pipe_is_kept_as_is(server: AuthServerProcess, http: httpx.Client) -> None:
    body = signed_in(http, server, "bob", scope="openid profile")
    claims = verified(http, server, body["id_token"])
    assert claims["sub"] == "auth0|bob-42"
    assert claims["name"] == "Bob Example"
    assert "email" not in claims


def test_pkce_mismatch_is_refused_and_does_not_spend_the_code(server: AuthServerProcess, http: httpx.Client) -> None:
    login = log_in(server)
    for wrong in (secrets.token_urlsafe(32), _challenge(login.verifier)):  # another verifier; the challenge itself
        refused = redeem(http, server, login, verifier=wrong)
        assert refused.status_code == 400
        assert refused.json()["error"] == "invalid_grant"
    missing = http.post(
        server.token_url,
        data={"grant_type": "authorization_code", "code": login.code, "redirect_uri": REDIRECT},
        auth=CLIENT,
    )
    assert missing.json()["error"] == "invalid_grant"
    malformed = redeem(http, server, login, verifier="short")
    assert malformed.json()["error"] == "invalid_request"
    assert redeem(http, server, login).status_code == 200  # an attacker without the verifier burnt nothing
    assert server.stats()["code_exchanges"] == 1


def test_the_redirect_uri_must_be_the_authorization_requests(server: AuthServerProcess, http: httpx.Client) -> None:
    other = "http://127.0.0.1:9/other"
    server.register_redirect_uris(REDIRECT, other)
    login = log_in(server)
    refused = redeem(http, server, login, redirect_uri=other)
    assert refused.status_code == 400
    assert refused.json()["error"] == "invalid_grant"
    missing = http.post(
        server.token_url,
        data={"grant_type": "authorization_code", "code": login.code, "code_verifier": login.verifier},
        auth=CLIENT,
    )
    assert missing.json()["error"] == "invalid_request"
    assert redeem(http, server, login).status_code == 200


def test_a_code_is_bound_to_its_client(server: AuthServerProcess, http: httpx.Client) -> None:
    login = log_in(server)
    refused = redeem(http, server, login, client=("nobody", "x"))
    assert (refused.status_code, refused.json()["error"]) == (401, "invalid_client")
    form = {
        "grant_type": "authorization_code",
        "code": login.code,
        "redirect_uri": REDIRECT,
        "code_verifier": login.verifier,
        "client_id": WEIRD_CLIENT_ID,
        "client_secret": WEIRD_CLIENT_SECRET,
    }
    other_client = http.post(server.token_url, data=form)
    assert (other_client.status_code, other_client.json()["error"]) == (400, "invalid_grant")
    assert redeem(http, server, login).status_code == 200


def test_a_second_redemption_fails_and_revokes_what_the_first_got(
    server: AuthServerProcess, http: httpx.Client
) -> None:
    """RFC 6749 §4.1.2: a code used twice is refused and every token issued from it revoked."""
    body = signed_in(http, server)
    assert userinfo(http, server, body["access_token"]).status_code == 200
    again = redeem(http, server, body["login"])
    assert again.status_code == 400
    assert again.json()["error"] == "invalid_grant"

    assert refresh(http, server, body["refresh_token"]).json()["error"] == "invalid_grant"
    revoked = userinfo(http, server, body["access_token"])
    assert revoked.status_code == 401
    assert 'error="invalid_token"' in revoked.headers["www-authenticate"]
    grant = the_grant(server)
    assert (grant["revoked"], grant["revoked_reason"]) == (True, "code_reuse")
    assert server.stats()["code_reuse_detections"] == 1


def test_a_code_expires(server: AuthServerProcess, http: httpx.Client) -> None:
    server.configure(code_lifetime=0)
    refused = redeem(http, server, log_in(server))
    assert refused.json() == {"error": "invalid_grant", "error_description": "authorization code expired"}
    assert redeem(http, server, Login("no-such-code", "v" * 43, "", "")).json()["error"] == "invalid_grant"


# --- refresh --------------------------------------------------------------------------------


def test_each_refresh_rotates_the_refresh_token(server: AuthServerProcess, http: httpx.Client) -> None:
    body = signed_in(http, server)
    tokens = [body["refresh_token"]]
    for _ in range(3):
        response = refresh(http, server, tokens[-1])
        assert response.status_code == 200, response.text
        renewed = response.json()
        assert renewed["scope"] == body["scope"]
        assert renewed["access_token"] != body["access_token"]
        tokens.append(renewed["refresh_token"])
    assert len(set(tokens)) == 4
    grant = the_grant(server)
    assert (grant["refreshes"], grant["refresh_tokens_issued"], grant["revoked"]) == (3, 4, False)


def test_reusing_a_rotated_refresh_token_revokes_the_whole_grant(server: AuthServerProcess, http: httpx.Client) -> None:
    """RFC 9700 §4.14: the old refresh token used again kills every token of the grant, the newest too."""
    body = signed_in(http, server)
    first = body["refresh_token"]
    renewed = refresh(http, server, first).json()
    other_login = signed_in(http, server, "bob")  # another grant, untouched

    reused = refresh(http, server, first)
    assert reused.status_code == 400
    assert reused.json()["error"] == "invalid_grant"
    assert refresh(http, server, renewed["refresh_token"]).json()["error"] == "invalid_grant"
    for access_token in (body["access_token"], renewed["access_token"]):
        assert userinfo(http, server, access_token).status_code == 401

    grants = {grant["sub"]: grant for grant in server.grants().values()}
    assert (grants["user-alice"]["revoked"], grants["user-alice"]["revoked_reason"]) == (True, "refresh_token_reuse")
    assert grants["auth0|bob-42"]["revoked"] is False
    assert refresh(http, server, other_login["refresh_token"]).status_code == 200
    assert server.stats()["refresh_reuse_detections"] == 1


def test_refresh_may_narrow_the_scope_but_not_widen_it(server: AuthServerProcess, http: httpx.Client) -> None:
    body = signed_in(http, server)
    narrow = refresh(http, server, body["refresh_token"], scope="urn:a")
    assert narrow.status_code == 200, narrow.text
    assert narrow.json()["scope"] == "urn:a"
    assert "id_token" not in narrow.json()  # no openid asked for
    assert verified(http, server, narrow.json()["access_token"])["scope"] == "urn:a"

    wide = refresh(http, server, narrow.json()["refresh_token"], scope="urn:a urn:c")
    assert (wide.status_code, wide.json()["error"]) == (400, "invalid_scope")
    full = refresh(http, server, narrow.json()["refresh_token"])  # a refused request spent nothing
    assert full.json()["scope"] == body["scope"]  # the refresh token keeps the grant's scope


def test_a_refresh_token_is_bound_to_its_client(server: AuthServerProcess, http: httpx.Client) -> None:
    body = signed_in(http, server)
    form = {
        "grant_type": "refresh_token",
        "refresh_token": body["refresh_token"],
        "client_id": WEIRD_CLIENT_ID,
        "client_secret": WEIRD_CLIENT_SECRET,
    }
    assert http.post(server.token_url, data=form).json()["error"] == "invalid_grant"
    assert refresh(http, server, "no-such-token").json()["error"] == "invalid_grant"
    missing = http.post(server.token_url, data={"grant_type": "refresh_token"}, auth=CLIENT)
    assert missing.json()["error"] == "invalid_request"
    assert refresh(http, server, body["refresh_token"]).status_code == 200


def test_a_refresh_token_can_expire(server: AuthServerProcess, http: httpx.Client) -> None:
    server.configure(refresh_lifetime=0)
    body = signed_in(http, server)
    assert refresh(http, server, body["refresh_token"]).json()["error_description"] == "refresh token expired"


def test_the_id_token_of_a_refresh_keeps_nonce_and_auth_time(server: AuthServerProcess, http: httpx.Client) -> None:
    body = signed_in(http, server)
    first = verified(http, server, body["id_token"])
    renewed = refresh(http, server, body["refresh_token"]).json()
    again = verified(http, server, renewed["id_token"])
    assert (again["nonce"], again["auth_time"], again["aud"], again["sub"]) == (
        first["nonce"],
        first["auth_time"],
        CLIENT_ID,
        "user-alice",
    )
    server.configure(id_token_on_refresh=False)
    assert "id_token" not in refresh(http, server, renewed["refresh_token"]).json()


def test_rotation_grace_lets_the_old_refresh_token_work_for_a_while(
    server: AuthServerProcess, http: httpx.Client
) -> None:
    server.configure(rotation_grace_seconds=30)
    body = signed_in(http, server)
    renewed = refresh(http, server, body["refresh_token"]).json()
    retried = refresh(http, server, body["refresh_token"])  # as after a lost answer
    assert retried.status_code == 200, retried.text
    assert retried.json()["refresh_token"] not in {body["refresh_token"], renewed["refresh_token"]}
    assert refresh(http, server, renewed["refresh_token"]).status_code == 200  # the first successor lives on
    grant = the_grant(server)
    assert (grant["grace_reuses"], grant["revoked"]) == (1, False)


def test_after_the_grace_a_reuse_revokes(server: AuthServerProcess, http: httpx.Client) -> None:
    server.configure(rotation_grace_seconds=0.2)
    body = signed_in(http, server)
    assert refresh(http, server, body["refresh_token"]).status_code == 200
    time.sleep(0.4)
    assert refresh(http, server, body["refresh_token"]).json()["error"] == "invalid_grant"
    assert the_grant(server)["revoked_reason"] == "refresh_token_reuse"


def test_without_rotation_the_answer_has_no_refresh_token_and_the_old_one_stays(
    server: AuthServerProcess, http: httpx.Client
) -> None:
    server.configure(rotate_refresh_tokens=False)
    body = signed_in(http, server)
    for _ in range(3):
        renewed = refresh(http, server, body["refresh_token"])
        assert renewed.status_code == 200, renewed.text
        assert "refresh_token" not in renewed.json()
    assert the_grant(server)["refreshes"] == 3


def test_close_after_drops_the_answer_of_a_refresh_that_happened(server: AuthServerProcess, http: httpx.Client) -> None:
    """The lost answer: the server rotated, the client never heard; its retry is a reuse."""
    body = signed_in(http, server)
    server.configure(refresh_fault="close_after", refresh_fault_count=1)
    with pytest.raises(httpx.RemoteProtocolError):
        refresh(http, server, body["refresh_token"])
    assert the_grant(server)["refreshes"] == 1
    assert refresh(http, server, body["refresh_token"]).json()["error"] == "invalid_grant"
    assert the_grant(server)["revoked_reason"] == "refresh_token_reuse"


def test_close_after_within_the_grace_can_be_retried(server: AuthServerProcess, http: httpx.Client) -> None:
    server.configure(rotation_grace_seconds=30)
    body = signed_in(http, server)
    server.configure(refresh_fault="close_after", refresh_fault_count=1)
    with pytest.raises(httpx.RemoteProtocolError):
        refresh(http, server, body["refresh_token"])
    assert refresh(http, server, body["refresh_token"]).status_code == 200
    assert the_grant(server)["revoked"] is False


def test_a_delayed_refresh_has_rotated_before_the_client_gives_up(server: AuthServerProcess) -> None:
    with httpx.Client(timeout=10.0, trust_env=False) as http:
        body = signed_in(http, server)
    server.configure(refresh_delay=2)
    with httpx.Client(timeout=0.3, trust_env=False) as impatient, pytest.raises(httpx.ReadTimeout):
        refresh(impatient, server, body["refresh_token"])
    server.configure(refresh_delay=0)
    with httpx.Client(timeout=10.0, trust_env=False) as http:
        assert refresh(http, server, body["refresh_token"]).json()["error"] == "invalid_grant"
    assert the_grant(server)["revoked_reason"] == "refresh_token_reuse"


@pytest.mark.parametrize(("fault", "status"), [("invalid_grant", 400), ("503", 503)])
def test_refresh_faults_before_processing_leave_the_token_as_it_was(
    server: AuthServerProcess, http: httpx.Client, fault: str, status: int
) -> None:
    body = signed_in(http, server)
    server.configure(refresh_fault=fault, refresh_fault_count=1)
    failed = refresh(http, server, body["refresh_token"])
    assert failed.status_code == status
    assert refresh(http, server, body["refresh_token"]).status_code == 200  # not a reuse
    assert server.stats()["refresh_requests"] == 2
    assert the_grant(server)["refreshes"] == 1


# --- id_token faults ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "claim", "expected"),
    [
        ("wrong_nonce", "nonce", lambda login: f"not-{login.nonce}"),
        ("no_nonce", "nonce", lambda login: None),
        ("wrong_aud", "aud", lambda login: "some-other-client"),
        ("wrong_azp", "azp", lambda login: "some-other-client"),
        ("wrong_iss", "iss", lambda login: "other"),
    ],
)
def test_id_token_claim_faults(
    server: AuthServerProcess, http: httpx.Client, fault: str, claim: str, expected: Any
) -> None:
    server.configure(id_token_fault=fault, id_token_fault_count=1)
    body = signed_in(http, server)
    claims = verified(http, server, body["id_token"])  # well signed, wrong inside
    want = expected(body["login"])
    if want == "other":
        assert claims[claim] == f"{server.url}/other"
    else:
        assert claims.get(claim) == want
    clean = verified(http, server, refresh(http, server, body["refresh_token"]).json()["id_token"])
    assert (clean["nonce"], clean["aud"], clean["azp"], clean["iss"]) == (
        body["login"].nonce,
        CLIENT_ID,
        CLIENT_ID,
        server.url,
    )


def test_id_token_variants_a_client_must_accept(server: AuthServerProcess, http: httpx.Client) -> None:
    server.configure(id_token_fault="aud_array", id_token_fault_count=1)
    claims = verified(http, server, signed_in(http, server)["id_token"])
    assert (claims["aud"], claims["azp"]) == ([CLIENT_ID, "test-api"], CLIENT_ID)
    server.configure(id_token_fault="no_azp", id_token_fault_count=1)
    claims = verified(http, server, signed_in(http, server)["id_token"])
    assert claims["aud"] == CLIENT_ID
    assert "azp" not in claims


def test_id_token_time_faults(server: AuthServerProcess, http: httpx.Client) -> None:
    server.configure(id_token_fault="expired")
    expired = verified(http, server, signed_in(http, server)["id_token"])
    assert expired["exp"] < time.time()
    server.configure(id_token_fault="future_iat")
    future = verified(http, server, signed_in(http, server)["id_token"])
    assert future["iat"] > time.time() + 600


def test_id_token_signature_faults(server: AuthServerProcess, http: httpx.Client) -> None:
    keys = jwks(http, server)

    server.configure(id_token_fault="alg_none")
    token = signed_in(http, server)["id_token"]
    assert unverified(token)[0]["alg"] == "none"
    assert token.endswith(".")

    server.configure(id_token_fault="hs256")
    token = signed_in(http, server)["id_token"]
    assert unverified(token)[0]["alg"] == "HS256"
    with pytest.raises(JoseError):
        jwt.decode(token, keys, algorithms=["RS256"])

    server.configure(id_token_fault="unknown_kid")
    token = signed_in(http, server)["id_token"]
    kid = unverified(token)[0]["kid"]
    assert kid not in {key["kid"] for key in http.get(f"{server.url}/jwks").json()["keys"]}

    server.configure(id_token_fault="bad_signature")
    with pytest.raises(BadSignatureError):
        jwt.decode(signed_in(http, server)["id_token"], keys, algorithms=["RS256"])

    server.configure(id_token_fault="none")
    jwt.decode(signed_in(http, server)["id_token"], keys, algorithms=["RS256"])


# --- revocation (RFC 7009) ------------------------------------------------------------------


def revoke(
    http: httpx.Client, server: AuthServerProcess, token: str, client: tuple[str, str] | None = CLIENT, **extra: str
) -> httpx.Response:
    return http.post(f"{server.url}/revoke", data={"token": token, **extra}, auth=client)


def test_revoking_a_refresh_token_revokes_its_grant(server: AuthServerProcess, http: httpx.Client) -> None:
    body = signed_in(http, server)
    revoked = revoke(http, server, body["refresh_token"], token_type_hint="refresh_token")
    assert (revoked.status_code, revoked.content) == (200, b"")
    assert refresh(http, server, body["refresh_token"]).json()["error"] == "invalid_grant"
    assert userinfo(http, server, body["access_token"]).status_code == 401
    assert the_grant(server)["revoked_reason"] == "revoked"
    (entry,) = server.stats()["revocations"]
    assert entry["token_type"] == "refresh_token"
    assert entry["token_type_hint"] == "refresh_token"
    assert entry["client_id"] == CLIENT_ID
    assert entry["grant_id"] == the_grant(server)["id"]


def test_revoking_an_access_token_leaves_the_grant(server: AuthServerProcess, http: httpx.Client) -> None:
    body = signed_in(http, server)
    assert revoke(http, server, body["access_token"], token_type_hint="refresh_token").status_code == 200  # wrong hint
    assert userinfo(http, server, body["access_token"]).status_code == 401
    renewed = refresh(http, server, body["refresh_token"])
    assert renewed.status_code == 200
    assert userinfo(http, server, renewed.json()["access_token"]).status_code == 200
    assert server.stats()["revocations"][0]["token_type"] == "access_token"


def test_revoking_an_unknown_token_is_a_200(server: AuthServerProcess, http: httpx.Client) -> None:
    assert revoke(http, server, "no-such-token").status_code == 200
    (entry,) = server.stats()["revocations"]
    assert (entry["token_type"], entry["grant_id"]) == (None, None)


def test_revocation_needs_the_client_and_its_own_token(server: AuthServerProcess, http: httpx.Client) -> None:
    body = signed_in(http, server)
    anonymous = revoke(http, server, body["refresh_token"], client=None)
    assert (anonymous.status_code, anonymous.json()["error"]) == (401, "invalid_client")
    wrong_secret = revoke(http, server, body["refresh_token"], client=(CLIENT_ID, "nope"))
    assert wrong_secret.status_code == 401
    other = http.post(
        f"{server.url}/revoke",
        data={"token": body["refresh_token"], "client_id": WEIRD_CLIENT_ID, "client_secret": WEIRD_CLIENT_SECRET},
    )
    assert (other.status_code, other.json()["error"]) == (400, "invalid_request")
    no_token = http.post(f"{server.url}/revoke", data={}, auth=CLIENT)
    assert (no_token.status_code, no_token.json()["error"]) == (400, "invalid_request")
    assert refresh(http, server, body["refresh_token"]).status_code == 200
    assert server.stats()["revocations"] == []


def test_revocation_fault(server: AuthServerProcess, http: httpx.Client) -> None:
    body = signed_in(http, server)
    server.configure(revocation_fault="503", revocation_fault_count=1)
    assert revoke(http, server, body["refresh_token"]).status_code == 503
    assert refresh(http, server, body["refresh_token"]).status_code == 200


# --- keys, users, grants: /_control ---------------------------------------------------------


def test_signing_key_rotation(server: AuthServerProcess, http: httpx.Client) -> None:
    initial = {key["kid"] for key in http.get(f"{server.url}/jwks").json()["keys"]}
    rotated = server.rotate_signing_key()
    assert set(rotated["published_kids"]) == initial | {rotated["signing_kid"]}
    body = signed_in(http, server)
    for token in (body["id_token"], body["access_token"]):
        assert unverified(token)[0]["kid"] == rotated["signing_kid"]
        verified(http, server, token)
    client_credentials = http.post(server.token_url, data={"grant_type": "client_credentials"}, auth=CLIENT).json()
    assert unverified(client_credentials["access_token"])[0]["kid"] == rotated["signing_kid"]

    hidden = server.rotate_signing_key(publish=False)
    assert hidden["signing_kid"] not in hidden["published_kids"]
    token = signed_in(http, server)["id_token"]
    assert unverified(token)[0]["kid"] == hidden["signing_kid"]
    with pytest.raises(JoseError):
        verified(http, server, token)
    published = server.publish_signing_key()
    assert hidden["signing_kid"] in published["published_kids"]
    verified(http, server, token)

    only = server.rotate_signing_key(retire_others=True)
    assert only["published_kids"] == [only["signing_kid"]]
    server.reset()
    assert {key["kid"] for key in http.get(f"{server.url}/jwks").json()["keys"]} == initial


def test_users_can_be_replaced(server: AuthServerProcess, http: httpx.Client) -> None:
    server.set_users({"carol": {"password": "carol-pw", "sub": "c-1", "email": "carol@example.com"}})
    got = answer(server.login(authorize_url(server), "carol", "carol-pw"))
    login = Login(got["code"], "v" * 43, got["state"], "the-nonce")
    claims = verified(http, server, redeem(http, server, login).json()["id_token"])
    assert (claims["sub"], claims["email"]) == ("c-1", "carol@example.com")
    with pytest.raises(AssertionError, match="without a redirect"):
        server.login(authorize_url(server), "alice", "alice-password")
    with pytest.raises(ValueError, match="password and sub"):
        server.set_users({"dave": {"password": "x"}})
    server.reset()
    assert "alice" in http.get(f"{server.url}/_control/users").json()


def test_redirect_uris_are_checked_and_reset(server: AuthServerProcess, http: httpx.Client) -> None:
    with pytest.raises(ValueError, match="fragment"):
        server.register_redirect_uris("http://127.0.0.1:9/cb#x")
    with pytest.raises(ValueError, match="unknown client"):
        server.register_redirect_uris(REDIRECT, client_id="nobody")
    server.reset()
    assert http.get(authorize_url(server)).status_code == 400  # nothing registered after a reset


def test_a_grant_can_be_withdrawn_like_at_the_portal(server: AuthServerProcess, http: httpx.Client) -> None:
    alice, bob = signed_in(http, server), signed_in(http, server, "bob")
    assert len(server.revoke_grants(sub="user-alice")) == 1
    refused = refresh(http, server, alice["refresh_token"])
    assert refused.json() == {"error": "invalid_grant", "error_description": "the grant was revoked (admin)"}
    assert refresh(http, server, bob["refresh_token"]).status_code == 200


def test_code_flow_config_is_validated(server: AuthServerProcess) -> None:
    with pytest.raises(ValueError, match="unknown refresh_fault"):
        server.configure(refresh_fault="sometimes")
    with pytest.raises(ValueError, match="unknown id_token_fault"):
        server.configure(id_token_fault="weird")
    with pytest.raises(ValueError, match="bad type"):
        server.configure(rotate_refresh_tokens="yes")
    with pytest.raises(ValueError, match=">= 0"):
        server.configure(rotation_grace_seconds=-1)
    config = server.configure(lifetime=60, rotation_grace_seconds=5)
    assert (config["lifetime"], config["rotation_grace_seconds"]) == (60, 5)


@pytest.mark.parametrize("path", ["config", "users", "redirect_uris", "keys", "revoke_grant"])
def test_control_endpoints_answer_bad_json_with_a_400(server: AuthServerProcess, http: httpx.Client, path: str) -> None:
    """A body that is not JSON is a 400 with a sentence, never a 500 with a traceback."""
    response = http.post(
        f"{server.url}/_control/{path}", content=b"{nope", headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 400
    assert "not JSON" in response.json()["error"]


def test_key_control_flags_must_be_booleans(server: AuthServerProcess, http: httpx.Client) -> None:
    before = http.get(f"{server.url}/_control/keys").json()
    for body in ({"publish": "yes"}, {"retire_others": 1}, {"action": "spin"}, {"kid": "x"}, []):
        assert http.post(f"{server.url}/_control/keys", json=body).status_code == 400, body
    assert http.get(f"{server.url}/_control/keys").json() == before
