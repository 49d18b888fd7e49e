"""The test authorization server itself, exercised over real HTTP."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from urllib.parse import quote_plus

import httpx
import pytest
from joserfc import jwt
from joserfc.errors import BadSignatureError
from joserfc.jwk import KeySet

from tests.support import (
    CLIENT_ID,
    CLIENT_SECRET,
    WEIRD_CLIENT_ID,
    WEIRD_CLIENT_SECRET,
    AuthServerProcess,
)

GRANT = {"grant_type": "client_credentials"}


@pytest.fixture(scope="module")
def server() -> Iterator[AuthServerProcess]:
    with AuthServerProcess() as srv:
        yield srv


@pytest.fixture(autouse=True)
def _fresh_server(server: AuthServerProcess) -> None:
    server.reset()


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=10.0, trust_env=False) as client:
        yield client


def basic(client_id: str, secret: str, *, urlencode: bool = True) -> dict[str, str]:
    if urlencode:
        client_id, secret = quote_plus(client_id), quote_plus(secret)
    raw = f"{client_id}:{secret}".encode()
    return {"Authorization": "Basic " + base64.b64encode(raw).decode("ascii")}


def test_basic_auth_needs_form_urlencoded_id_and_secret(server: AuthServerProcess, http: httpx.Client) -> None:
    data = {**GRANT, "scope": "urn:a urn:b"}
    ok = http.post(server.token_url, data=data, headers=basic(WEIRD_CLIENT_ID, WEIRD_CLIENT_SECRET))
    assert ok.status_code == 200, ok.text
    assert ok.json()["scope"] == "urn:a urn:b"

    naive = basic(WEIRD_CLIENT_ID, WEIRD_CLIENT_SECRET, urlencode=False)
    rejected = http.post(server.token_url, data=data, headers=naive)
    assert rejected.status_code == 401
    assert rejected.json()["error"] == "invalid_client"
    assert rejected.headers["www-authenticate"].startswith("Basic")

    first = server.stats()["requests"][0]
    assert (first["auth"], first["client_id"]) == ("basic", WEIRD_CLIENT_ID)


def test_client_secret_post(server: AuthServerProcess, http: httpx.Client) -> None:
    data = {**GRANT, "client_id": WEIRD_CLIENT_ID, "client_secret": WEIRD_CLIENT_SECRET}
    response = http.post(server.token_url, data=data)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.headers["cache-control"] == "no-store"
    body = response.json()
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == 3600
    assert body["scope"] == "urn:default"

    (recorded,) = server.stats()["requests"]
    assert recorded["auth"] == "post"
    assert "client_secret" not in recorded["form"]


def test_access_token_verifies_against_jwks(server: AuthServerProcess, http: httpx.Client) -> None:
    server.configure(lifetime=120)
    metadata = http.get(f"{server.url}/.well-known/openid-configuration").json()
    assert metadata["issuer"] == server.url
    assert metadata["token_endpoint"] == server.token_url
    keys = KeySet.import_key_set(http.get(metadata["jwks_uri"]).json())

    data = {**GRANT, "audience": "orders"}
    headers = basic(CLIENT_ID, CLIENT_SECRET)
    tokens = [http.post(server.token_url, data=data, headers=headers).json()["access_token"] for _ in range(2)]
    decoded = [jwt.decode(token, keys, algorithms=["RS256"]) for token in tokens]
    registry = jwt.JWTClaimsRegistry(
        iss={"essential": True, "value": server.url},
        aud={"essential": True, "value": "orders"},
        sub={"essential": True, "value": CLIENT_ID},
    )
    for token in decoded:
        registry.validate(token.claims)  # also checks exp is in the future
        # iat is rounded down and exp up, so exp is never earlier than expires_in says
        assert token.claims["exp"] - token.claims["iat"] in (120, 121)
    assert decoded[0].claims["jti"] != decoded[1].claims["jti"]

    head, _, signature = tokens[0].rpartition(".")
    forged = f"{head}.{signature[:10]}{'B' if signature[10] == 'A' else 'A'}{signature[11:]}"
    with pytest.raises(BadSignatureError):
        jwt.decode(forged, keys, algorithms=["RS256"])


def test_fault_with_count_applies_once(server: AuthServerProcess, http: httpx.Client) -> None:
    server.configure(fault="503", fault_count=1)
    headers = basic(CLIENT_ID, CLIENT_SECRET)
    first = http.post(server.token_url, data=GRANT, headers=headers)
    assert first.status_code == 503
    assert first.headers["retry-after"] == "1"
    assert http.post(server.token_url, data=GRANT, headers=headers).status_code == 200
    assert server.stats()["token_requests"] == 2


def test_close_fault_drops_connection(server: AuthServerProcess, http: httpx.Client) -> None:
    server.configure(fault="close", fault_count=1)
    with pytest.raises(httpx.RemoteProtocolError):
        http.post(server.token_url, data=GRANT, headers=basic(CLIENT_ID, CLIENT_SECRET))


@pytest.mark.parametrize(("expires_in", "expected"), [(None, "absent"), ("60", "60"), (-5, -5), (0, 0)])
def test_expires_in_override(
    server: AuthServerProcess, http: httpx.Client, expires_in: object, expected: object
) -> None:
    server.configure(expires_in=expires_in)
    body = http.post(server.token_url, data=GRANT, headers=basic(CLIENT_ID, CLIENT_SECRET)).json()
    assert body.get("expires_in", "absent") == expected


@pytest.mark.parametrize(
    ("data", "headers", "status", "error"),
    [
        (GRANT, basic(CLIENT_ID, "wrong"), 401, "invalid_client"),
        (GRANT, {}, 401, "invalid_client"),
        ({"grant_type": "password"}, basic(CLIENT_ID, CLIENT_SECRET), 400, "unsupported_grant_type"),
        ({**GRANT, "scope": "urn:ok openid"}, basic(CLIENT_ID, CLIENT_SECRET), 400, "invalid_scope"),
        (
            {**GRANT, "client_secret": CLIENT_SECRET},
            basic(CLIENT_ID, CLIENT_SECRET),
            400,
            "invalid_request",
        ),
    ],
)
def test_rejections(
    server: AuthServerProcess,
    http: httpx.Client,
    data: dict[str, str],
    headers: dict[str, str],
    status: int,
    error: str,
) -> None:
    response = http.post(server.token_url, data=data, headers=headers)
    assert (response.status_code, response.json()["error"]) == (status, error)


def test_stats_count_and_reset(server: AuthServerProcess, http: httpx.Client) -> None:
    server.configure(fault="500")  # faulty requests are counted too
    for _ in range(3):
        http.post(server.token_url, data={**GRANT, "scope": "urn:s"})
    http.get(f"{server.url}/.well-known/openid-configuration")
    stats = server.stats()
    assert (stats["token_requests"], stats["discovery_requests"]) == (3, 1)
    assert [r["scope"] for r in stats["requests"]] == ["urn:s"] * 3
    server.reset()
    assert server.token_requests() == 0
    assert server.configure()["fault"] == "none"


def test_control_rejects_unknown_settings(server: AuthServerProcess) -> None:
    with pytest.raises(ValueError, match="unknown fault"):
        server.configure(fault="teapot")
    with pytest.raises(ValueError, match="unknown config key"):
        server.configure(lifetme=5)
    with pytest.raises(ValueError, match="unknown discovery_fault"):
        server.configure(discovery_fault="teapot")


def test_bad_gzip_fault_cannot_be_decoded(server: AuthServerProcess, http: httpx.Client) -> None:
    server.configure(fault="bad_gzip", fault_count=1)
    with pytest.raises(httpx.DecodingError):
        http.post(server.token_url, data=GRANT, headers=basic(CLIENT_ID, CLIENT_SECRET))


def test_discovery_faults(server: AuthServerProcess, http: httpx.Client) -> None:
    url = f"{server.url}/.well-known/openid-configuration"
    server.configure(discovery_fault="nested")
    nested = http.get(url)
    assert nested.status_code == 200
    assert len(nested.content) < 64 * 1024  # under the broker's size cap: the parser meets it
    with pytest.raises(RecursionError):
        nested.json()
    server.configure(discovery_fault="bad_gzip")
    with pytest.raises(httpx.DecodingError):
        http.get(url)
    server.configure(discovery_fault="none")
    assert http.get(url).json()["issuer"] == server.url


def test_jwt_lifetime_sets_exp_apart_from_expires_in(server: AuthServerProcess, http: httpx.Client) -> None:
    server.configure(lifetime=3600, jwt_lifetime=-30)
    response = http.post(server.token_url, data=GRANT, headers=basic(CLIENT_ID, CLIENT_SECRET))
    body = response.json()
    assert body["expires_in"] == 3600
    payload = body["access_token"].split(".")[1]
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    assert claims["exp"] - claims["iat"] in (-30, -29)


def test_reissue_hands_out_the_same_token_with_the_whole_seconds_it_has_left(
    server: AuthServerProcess, http: httpx.Client
) -> None:
    server.configure(lifetime=30, reissue=True)
    headers = basic(CLIENT_ID, CLIENT_SECRET)
    first = http.post(server.token_url, data={**GRANT, "scope": "urn:a"}, headers=headers).json()
    again = http.post(server.token_url, data={**GRANT, "scope": "urn:a"}, headers=headers).json()
    other = http.post(server.token_url, data={**GRANT, "scope": "urn:b"}, headers=headers).json()
    assert first["expires_in"] == 30
    assert again["access_token"] == first["access_token"]
    assert again["expires_in"] == 29  # rounded down, never more than the token has left
    assert other["access_token"] != first["access_token"]  # per client, scope and audience
    server.configure(reissue=False)
    fresh = http.post(server.token_url, data={**GRANT, "scope": "urn:a"}, headers=headers).json()
    assert fresh["access_token"] != first["access_token"]
    with pytest.raises(ValueError, match="bad type"):
        server.configure(reissue=1)


def test_accepted_secrets_change_at_run_time_and_each_request_records_its_secret(
    server: AuthServerProcess, http: httpx.Client
) -> None:
    def status(secret: str) -> int:
        return http.post(server.token_url, data=GRANT, headers=basic(CLIENT_ID, secret)).status_code

    server.accept_secrets("new-one", "old-one")
    assert [status("new-one"), status("old-one"), status(CLIENT_SECRET)] == [200, 200, 401]
    server.accept_secrets("new-one")
    assert status("old-one") == 401
    assert server.requests_by_secret() == [
        ("new-one", 200),
        ("old-one", 200),
        (CLIENT_SECRET, 401),
        ("old-one", 401),
    ]
    server.reset()  # back to CLIENTS
    assert [status(CLIENT_SECRET), status("new-one")] == [200, 401]
