"""Issue 14: what a login must refuse (spec §5.2, §5.3, §3.3), in-process against the real test
authorization server, whose fault switches make it send the id_token a broken or hostile server
would. Each case has a precise answer: status, `error`, a sentence saying what was wrong; none
stores anything for the user, and none lets a caller read a subject it may not."""

from __future__ import annotations

import base64
import hashlib
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import redis
from starlette.testclient import TestClient

from broker.api import create_app
from broker.settings import load_settings
from tests.conftest import auth
from tests.support import AuthServerProcess
from tests.users import CALLBACK_PATH, PORTAL, audit, subject_path, write_portal_config

PUBLIC = "http://testserver"
ALLOWED = "https://app.example.com/done"


@pytest.fixture
def config(tmp_path: Path, redis_url: str, authserver: AuthServerProcess) -> Path:
    return write_portal_config(tmp_path / "users.toml", redis_url, authserver, public_url=PUBLIC)


@pytest.fixture
def app(config: Path) -> Iterator[TestClient]:
    with TestClient(create_app(load_settings(config)), raise_server_exceptions=False) as client:
        yield client


def start(app: TestClient, headers: dict[str, str] | None = None, **body: Any) -> dict[str, Any]:
    started = app.post(f"/v1/authorizations/{PORTAL}", json=body, headers=headers or auth())
    assert started.status_code == 200, started.text
    result: dict[str, Any] = started.json()
    return result


def come_back(authserver: AuthServerProcess, started: dict[str, Any], **login: Any) -> str:
    """The user logs in (or denies) at the authorization server → the callback's query."""
    back = authserver.login(started["authorize_url"], **login)
    assert back.path == CALLBACK_PATH, back
    return back.query.decode()


def callback(app: TestClient, query: str, *, json: bool = True) -> httpx.Response:
    headers = {"Accept": "application/json"} if json else {"Accept": "text/html"}
    return app.get(f"{CALLBACK_PATH}?{query}", headers=headers, follow_redirects=False)


def refused(response: httpx.Response, status: int, error: str, *words: str) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"] == error, body
    description: str = body["error_description"]
    for word in words:
        assert word in description, description
    assert "Traceback" not in response.text
    return description


def stored_for_users(redis_url: str) -> list[str]:
    """Every key a login leaves for a user: grants and tokens under {portal/<subject>}."""
    with redis.Redis.from_url(redis_url) as client:
        return sorted(key.decode() for key in client.scan_iter(match=f"tb:{{{PORTAL}/*"))


def logins_in_redis(redis_url: str) -> list[str]:
    with redis.Redis.from_url(redis_url) as client:
        return sorted(key.decode() for key in client.scan_iter(match="tb:{:login}:*"))


# -- state ----------------------------------------------------------------------------------------


def test_a_replayed_state_is_refused_and_never_reaches_the_server(
    app: TestClient, authserver: AuthServerProcess, redis_url: str
) -> None:
    query = come_back(authserver, start(app))
    assert callback(app, query).status_code == 200
    assert stored_for_users(redis_url)  # the grant and the token: what the refusals below never leave
    again = callback(app, query)
    refused(again, 400, "invalid_request", "unknown, expired or already used")
    stats = authserver.stats()
    assert stats["code_exchanges"] == 1  # the replay never sent the code again …
    assert stats["code_reuse_detections"] == 0  # … so the server had no reason to revoke anything
    assert not next(iter(stats["grants"].values()))["revoked"]


def test_an_unknown_or_missing_state_is_refused(app: TestClient, authserver: AuthServerProcess) -> None:
    refused(callback(app, "code=abc&state=made-up"), 400, "invalid_request", "unknown, expired or already used")
    refused(callback(app, "code=abc"), 400, "invalid_request", "no state")
    assert authserver.stats()["code_exchanges"] == 0


def test_an_expired_state_is_refused(app: TestClient, authserver: AuthServerProcess, redis_url: str) -> None:
    started = start(app)
    assert started["expires_in"] == 600
    (key,) = logins_in_redis(redis_url)
    with redis.Redis.from_url(redis_url) as client:
        assert 590_000 < client.pttl(key) <= 600_000  # kept in Redis for the login's 10 minutes
        query = come_back(authserver, started)
        client.pexpire(key, 1)  # the 10 minutes are up
    time.sleep(0.05)
    refused(callback(app, query), 400, "invalid_request", "unknown, expired or already used")
    assert authserver.stats()["code_exchanges"] == 0
    assert stored_for_users(redis_url) == []


# -- the authorization server says no ------------------------------------------------------------


def test_a_code_the_server_refuses_as_used_tells_the_person_to_start_again(
    app: TestClient, authserver: AuthServerProcess
) -> None:
    """Defect: a code the authorization server refused (invalid_grant: used, expired, or not for
    this verifier) got a page saying "try again in a moment", which can never succeed: the code
    is spent. The page now says to start the sign-in again."""
    first = httpx.QueryParams(come_back(authserver, start(app)))
    assert callback(app, str(first)).status_code == 200
    second = start(app)
    spent = first.set("state", second["state"])  # the first login's code under a live state
    page = callback(app, str(spent), json=False)
    assert page.status_code == 502, page.text
    assert "start the sign-in again" in page.text
    assert "try again in a moment" not in page.text
    refused(callback(app, str(first.set("state", start(app)["state"]))), 502, "upstream_rejected")


def test_access_denied_by_the_user_is_a_clear_answer(
    app: TestClient, authserver: AuthServerProcess, redis_url: str
) -> None:
    query = come_back(authserver, start(app), decision="deny")
    assert "error=access_denied" in query
    refused(callback(app, query), 400, "invalid_request", "not completed", "access_denied", "denied")
    refused(callback(app, query), 400, "invalid_request", "already used")  # the state went with it
    assert authserver.stats()["code_exchanges"] == 0
    assert stored_for_users(redis_url) == []


def test_the_page_a_browser_gets_for_an_error_escapes_what_the_server_said(
    app: TestClient, authserver: AuthServerProcess
) -> None:
    state = start(app)["state"]
    page = callback(
        app, f"error=login_required&error_description=%3Cscript%3Ealert(1)%3C/script%3E&state={state}", json=False
    )
    assert page.status_code == 400
    assert page.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assert page.headers["cache-control"] == "no-store"
    assert "<script>" not in page.text
    assert "&lt;script&gt;" in page.text
    assert "login_required" in page.text


def test_the_callback_page_allows_its_own_style_by_hash_and_no_other_inline_style(
    app: TestClient, authserver: AuthServerProcess
) -> None:
    """Defect: the page's policy allowed `style-src 'unsafe-inline'`, so markup injected into it
    (were an escape ever missed) could restyle it to mislead the person reading it. The one
    style the page has is allowed by its SHA-256, like the demo login page's."""
    page = callback(app, f"error=access_denied&state={start(app)['state']}", json=False)
    csp = page.headers["content-security-policy"]
    assert "unsafe-inline" not in csp
    (style,) = re.findall(r"<style>(.*?)</style>", page.text, flags=re.S)
    digest = base64.b64encode(hashlib.sha256(style.encode()).digest()).decode()
    assert f"style-src 'sha256-{digest}'" in csp


def test_a_callback_without_a_code_is_refused(app: TestClient, authserver: AuthServerProcess) -> None:
    state = start(app)["state"]
    refused(callback(app, f"state={state}"), 400, "invalid_request", "no code")


# -- the id_token ---------------------------------------------------------------------------------

ID_TOKEN_FAULTS = {
    "wrong_nonce": "its nonce is not the login's",
    "no_nonce": "its nonce is not the login's",
    "bad_signature": "its signature does not verify",  # tampered
    "alg_none": "signed with 'none'",
    "hs256": "signed with 'HS256'",  # the RSA public key as an HMAC secret
    "wrong_aud": "it is not for this client (aud)",
    "wrong_azp": "it was issued to another party (azp)",
    "wrong_iss": "its issuer is not the credential's",
    "expired": "it has expired",
    "future_iat": "its issue time (iat) is missing or in the future",
    "unknown_kid": "its signature does not verify",
}


@pytest.mark.parametrize("fault", sorted(ID_TOKEN_FAULTS))
def test_an_id_token_that_fails_a_check_is_refused_and_nothing_is_stored(
    fault: str, app: TestClient, authserver: AuthServerProcess, redis_url: str
) -> None:
    started = start(app)
    authserver.configure(id_token_fault=fault, id_token_fault_count=1)
    done = callback(app, come_back(authserver, started))
    refused(
        done,
        502,
        "upstream_invalid_response",
        "The id_token from the authorization server is not valid",
        ID_TOKEN_FAULTS[fault],
    )
    assert stored_for_users(redis_url) == []
    # not readable by anyone: the caller that started it does not own it, `any` finds no grant
    refused(app.get(subject_path("user-alice"), headers=auth()), 403, "access_denied")
    refused(app.get(subject_path("user-alice"), headers=auth("reporting")), 409, "reauthorization_required")


@pytest.mark.parametrize("variant", ["aud_array", "no_azp"])
def test_id_token_variants_real_servers_send_are_accepted(
    variant: str, app: TestClient, authserver: AuthServerProcess
) -> None:
    started = start(app)
    authserver.configure(id_token_fault=variant, id_token_fault_count=1)
    done = callback(app, come_back(authserver, started))
    assert done.status_code == 200, done.text
    assert done.json()["subject"] == "user-alice"


def test_a_rotated_signing_key_is_fetched_once_and_an_unknown_one_refused(
    app: TestClient, authserver: AuthServerProcess
) -> None:
    """An unknown `kid` refetches the issuer's JWKS once (at most every 5 s): a login signed with
    a newly published key succeeds; a key that is published nowhere is refused without a storm."""
    assert callback(app, come_back(authserver, start(app))).status_code == 200
    assert authserver.stats()["jwks_requests"] == 1
    time.sleep(5.1)  # past the refetch limit
    authserver.rotate_signing_key(publish=True)
    assert callback(app, come_back(authserver, start(app), username="bob")).status_code == 200
    assert authserver.stats()["jwks_requests"] == 2  # one refetch for the new kid
    for _ in range(3):
        started = start(app)
        authserver.configure(id_token_fault="unknown_kid", id_token_fault_count=1)
        refused(callback(app, come_back(authserver, started)), 502, "upstream_invalid_response", "signature")
    assert authserver.stats()["jwks_requests"] == 2  # just refetched: not again


def test_only_the_algorithms_the_issuer_advertises_are_accepted(app: TestClient, authserver: AuthServerProcess) -> None:
    """Discovery advertises RS256 only: the error names what is allowed, `none` is never in it."""
    started = start(app)
    authserver.configure(id_token_fault="alg_none", id_token_fault_count=1)
    description = refused(callback(app, come_back(authserver, started)), 502, "upstream_invalid_response")
    assert description.endswith("(RS256).")


# -- return_to ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "return_to",
    [
        "https://evil.example.com/done",
        "https://app.example.com/donex",  # not at a path boundary
        "https://app.example.com/done.evil.example.com",
        "https://app.example.com.evil.example.com/done",
        "http://app.example.com/done",  # another scheme
        "https://app.example.com/done@evil.example.com",
        "https://app.example.com:8443/done",
        "https://app.example.com/other",
        "/done",
        "javascript:alert(1)",
    ],
)
def test_a_return_to_outside_the_allow_list_is_refused(
    return_to: str, app: TestClient, authserver: AuthServerProcess, redis_url: str
) -> None:
    answer = app.post(f"/v1/authorizations/{PORTAL}", json={"return_to": return_to}, headers=auth())
    refused(answer, 400, "invalid_request", "return_to", "return_to_allow")
    assert logins_in_redis(redis_url) == []
    assert authserver.stats()["authorize_requests"] == 0


@pytest.mark.parametrize("return_to", [ALLOWED, f"{ALLOWED}/next", f"{ALLOWED}?tab=2", f"{ALLOWED}#top"])
def test_a_return_to_under_the_allow_list_is_where_the_browser_goes(
    return_to: str, app: TestClient, authserver: AuthServerProcess
) -> None:
    done = callback(app, come_back(authserver, start(app, return_to=return_to)), json=False)
    assert done.status_code == 303, done.text
    assert done.headers["location"] == return_to


# -- whose subject -----------------------------------------------------------------------------


def test_a_caller_may_not_read_or_log_out_a_subject_it_may_not(app: TestClient, authserver: AuthServerProcess) -> None:
    subject = callback(app, come_back(authserver, start(app))).json()["subject"]  # through billing
    assert app.get(subject_path(subject), headers=auth()).status_code == 200
    unknown = app.get(subject_path("user-nobody"), headers=audit())
    theirs = app.get(subject_path(subject), headers=audit())
    refused(theirs, 403, "access_denied")
    assert theirs.json() == unknown.json()  # the same answer: nothing tells whether the subject exists
    refused(app.delete(subject_path(subject), headers=audit()), 403, "access_denied")
    assert app.get(subject_path(subject), headers=auth()).status_code == 200  # still there
    assert authserver.stats()["revocations"] == []
    # `subjects = "any"` reads every subject of the credential
    assert app.get(subject_path(subject), headers=auth("reporting")).status_code == 200
    # once the subject logs in through audit too, audit reads it
    assert callback(app, come_back(authserver, start(app, headers=audit()))).json()["subject"] == subject
    assert app.get(subject_path(subject), headers=audit()).status_code == 200


def test_a_caller_without_a_grant_for_the_credential_gets_the_answer_of_a_credential_that_does_not_exist(
    app: TestClient,
) -> None:
    """`audit` has a grant for portal only: ledger (which exists) and a name that does not answer alike."""
    answers = [
        app.post(f"/v1/authorizations/{name}", json={}, headers=audit()) for name in ("ledger", "no-such-credential")
    ]
    assert [a.status_code for a in answers] == [403, 403]
    assert answers[0].json() == answers[1].json()


def test_after_a_logout_a_caller_reads_the_subject_only_if_they_log_in_through_it_again(
    app: TestClient, authserver: AuthServerProcess
) -> None:
    """Defect: a caller's access to a subject was remembered for a minute (the fast path reads no
    grant) and a logout did not forget it: when the user logged out and then in again through
    another caller, the first one went on reading the new login's token for up to a minute."""
    subject = callback(app, come_back(authserver, start(app))).json()["subject"]  # through billing
    assert app.get(subject_path(subject), headers=auth()).status_code == 200  # billing reads it (remembered)
    assert app.delete(subject_path(subject), headers=auth()).status_code == 204
    assert callback(app, come_back(authserver, start(app, headers=audit()))).json()["subject"] == subject
    assert app.get(subject_path(subject), headers=audit()).status_code == 200
    refused(app.get(subject_path(subject), headers=auth()), 403, "access_denied")


# -- subjects of any shape ------------------------------------------------------------------------


@pytest.mark.parametrize("sub", ["tenant/42", "https://idp.example.com/users/42", "auth0|bob 42"])
def test_a_subject_with_slashes_or_spaces_is_read_and_logged_out_like_any_other(
    sub: str, app: TestClient, authserver: AuthServerProcess
) -> None:
    """Defect: the subject routes matched one path segment, so a user whose `sub` has a slash
    (OIDC allows any ASCII up to 255 characters) logged in, and then no caller could read their
    token or log them out: 404 not_found."""
    authserver.set_users({"carol": {"password": "carol-password", "sub": sub}})
    started = start(app)
    done = callback(app, come_back(authserver, started, username="carol", password="carol-password"))
    assert done.json()["subject"] == sub
    path = subject_path(quote(sub, safe=""))
    first = app.get(path, headers=auth())
    assert first.status_code == 200, first.text
    again = app.get(path, headers=auth())  # from this worker's memory (the fast path)
    assert again.json()["access_token"] == first.json()["access_token"]
    assert app.delete(path, headers=auth()).status_code == 204
    assert authserver.stats()["revocations"]
    refused(app.get(path, headers=auth("reporting")), 409, "reauthorization_required")
