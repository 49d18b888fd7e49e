"""The OAuth 2.0 token-endpoint facade (spec §3.5), in process: discovery, JWKS, the token
endpoint's answers and every RFC 6749 §5.2 error, the check order, min_ttl, counters and audit.

Real Redis and the real test authorization server; third-party client libraries against a real
broker process are in tests/integration/test_facade_clients.py.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from starlette.testclient import TestClient
from structlog.testing import capture_logs

from broker import errors
from broker.api import create_app
from broker.callers import hash_key, new_caller_key
from broker.clock import FakeClock
from broker.settings import load_settings
from tests.api.helpers import assert_error
from tests.conftest import ADMIN, CALLER_KEYS, READ, WRITE, auth
from tests.support import AuthServerProcess, free_port

PUBLIC_URL = "http://testserver"
ISSUER = f"{PUBLIC_URL}/oauth2/payments"
TOKEN = "/oauth2/payments/token"
DISCOVERY_KEYS = {
    "issuer",
    "token_endpoint",
    "jwks_uri",
    "grant_types_supported",
    "token_endpoint_auth_methods_supported",
    "response_types_supported",
    "subject_types_supported",
    "id_token_signing_alg_values_supported",
    "scopes_supported",
}
BASIC_CHALLENGE = 'Basic realm="token-broker"'
NOSCOPE_KEY = new_caller_key()


def facade_config(extra: str = "") -> str:
    """The facade on, and a credential `bare` without default scopes, granted to caller `noscope`."""
    return f"""
[server]
public_url = "{PUBLIC_URL}"
{extra}
[credentials.bare]
token_url = "{{token_url}}"
client_id = "test-client"
client_secret = {{ env = "TB_TEST_CLIENT_SECRET" }}
scopes = ["{READ}"]

[callers.noscope]
key_sha256 = "{hash_key(NOSCOPE_KEY)}"
[callers.noscope.grants]
bare = ["{READ}"]
"""


@pytest.fixture
def facade_settings_path(write_config: Callable[..., Path], authserver: AuthServerProcess) -> Path:
    return write_config(facade_config().replace("{token_url}", authserver.token_url))


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(time.time())


@pytest.fixture
def facade(facade_settings_path: Path, clock: FakeClock) -> Iterator[TestClient]:
    app = create_app(load_settings(facade_settings_path), clock=clock)
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


def basic(name: str, key: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{name}:{key}".encode()).decode()}


def billing() -> dict[str, str]:
    return basic("billing", CALLER_KEYS["billing"])


def form(**fields: str) -> dict[str, str]:
    return {"grant_type": "client_credentials", **fields}


def assert_facade_error(response: Any, status: int, error: str) -> dict[str, Any]:
    """RFC 6749 §5.2: status, `error`, a sentence, JSON, never cached; 401 names the Basic scheme."""
    body = assert_error(response, status, error)
    assert response.headers["cache-control"] == "no-store"
    assert response.headers["pragma"] == "no-cache"
    if status == 401:
        assert response.headers["www-authenticate"] == BASIC_CHALLENGE
    else:
        assert "www-authenticate" not in response.headers
    return body


# -- discovery ----------------------------------------------------------------------------------


def test_discovery_at_both_locations_is_the_same_document_with_the_issuer_byte_for_byte(facade: TestClient) -> None:
    oidc_url = f"{ISSUER}/.well-known/openid-configuration"
    oidc = facade.get(oidc_url, follow_redirects=False)
    rfc8414 = facade.get(f"{PUBLIC_URL}/.well-known/oauth-authorization-server/oauth2/payments", follow_redirects=False)
    assert oidc.status_code == rfc8414.status_code == 200
    assert oidc.content == rfc8414.content
    document = oidc.json()
    # OIDC Discovery §4.3: the issuer is the discovery URL without the well-known suffix, exactly
    assert document["issuer"] == oidc_url.removesuffix("/.well-known/openid-configuration")
    assert document["issuer"] == ISSUER
    assert set(document) == DISCOVERY_KEYS
    assert document["token_endpoint"] == f"{ISSUER}/token"
    assert document["jwks_uri"] == f"{ISSUER}/jwks"
    assert document["grant_types_supported"] == ["client_credentials"]
    assert document["token_endpoint_auth_methods_supported"] == ["client_secret_basic", "client_secret_post"]
    assert document["scopes_supported"] == sorted([READ, WRITE, ADMIN])
    assert "RS256" in document["id_token_signing_alg_values_supported"]  # OIDC Discovery §3
    assert document["subject_types_supported"] == ["public"]
    assert document["response_types_supported"]


def test_discovery_has_every_field_rfc8414_and_oidc_discovery_require(facade: TestClient) -> None:
    """RFC 8414 §2 REQUIRED: issuer, response_types_supported, token_endpoint (any grant but
    implicit), jwks_uri when keys are published. OIDC Discovery §3 REQUIRED: issuer, token_endpoint,
    jwks_uri, response_types_supported, subject_types_supported, id_token_signing_alg_values_supported
    (authorization_endpoint too, which a client-credentials-only issuer does not have: spec §3.5)."""
    document = facade.get(f"{ISSUER}/.well-known/openid-configuration").json()
    required = {
        "issuer",
        "token_endpoint",
        "jwks_uri",
        "response_types_supported",
        "subject_types_supported",
        "id_token_signing_alg_values_supported",
    }
    assert required <= set(document)
    for name in DISCOVERY_KEYS - {"issuer", "token_endpoint", "jwks_uri"}:
        assert isinstance(document[name], list)
        assert all(isinstance(value, str) for value in document[name])
    # RFC 8414 §2: https or http URL, no query or fragment
    assert "?" not in document["issuer"]
    assert "#" not in document["issuer"]


def test_a_trailing_slash_in_public_url_does_not_change_the_issuer(
    write_config: Callable[..., Path], authserver: AuthServerProcess
) -> None:
    text = facade_config().replace(PUBLIC_URL, PUBLIC_URL + "/").replace("{token_url}", authserver.token_url)
    with TestClient(create_app(load_settings(write_config(text)))) as client:
        document = client.get(f"{ISSUER}/.well-known/openid-configuration").json()
    assert document["issuer"] == ISSUER


@pytest.mark.parametrize(
    "path",
    [
        "/oauth2/nope/.well-known/openid-configuration",
        "/.well-known/oauth-authorization-server/oauth2/nope",
        "/oauth2/nope/jwks",
    ],
)
def test_unknown_credential_is_404_json(facade: TestClient, path: str) -> None:
    body = assert_error(facade.get(path), 404, "not_found")
    assert "nope" not in body["error_description"]


@pytest.mark.parametrize(
    "path",
    ["/oauth2/payments/.well-known/openid-configuration/", "/oauth2/payments/token/", "/oauth2/payments/"],
)
def test_never_a_redirect(facade: TestClient, path: str) -> None:
    response = facade.request("POST" if "token" in path else "GET", path, follow_redirects=False)
    assert response.status_code == 404


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/oauth2/payments/.well-known/openid-configuration"),
        ("GET", "/.well-known/oauth-authorization-server/oauth2/payments"),
        ("GET", "/oauth2/payments/jwks"),
        ("POST", TOKEN),
    ],
)
def test_without_public_url_the_facade_is_off_and_says_why(client: TestClient, method: str, path: str) -> None:
    response = client.request(method, path, headers=billing(), data=form())
    body = assert_error(response, 404, "not_found")
    assert "public_url" in body["error_description"]


# -- JWKS ----------------------------------------------------------------------------------------


def test_jwks_is_the_upstreams_key_set_fetched_once(facade: TestClient, authserver: AuthServerProcess) -> None:
    upstream = authserver._http().get("/jwks").json()
    before = authserver.stats()["jwks_requests"]
    first = facade.get("/oauth2/ledger/jwks")
    second = facade.get("/oauth2/ledger/jwks")
    assert first.status_code == second.status_code == 200
    assert first.json() == second.json() == {"keys": upstream["keys"]}
    assert all("d" not in key for key in first.json()["keys"])
    assert authserver.stats()["jwks_requests"] == before + 1


def test_jwks_of_a_credential_without_discovery_is_an_empty_key_set(facade: TestClient) -> None:
    response = facade.get("/oauth2/payments/jwks")
    assert response.status_code == 200
    assert response.json() == {"keys": []}


def test_jwks_while_the_upstream_is_down_is_temporarily_unavailable(
    write_config: Callable[..., Path], authserver: AuthServerProcess
) -> None:
    gone = f"""
[credentials.gone]
issuer = "http://127.0.0.1:{free_port()}"
client_id = "test-client"
client_secret = {{ env = "TB_TEST_CLIENT_SECRET" }}
"""
    text = facade_config().replace("{token_url}", authserver.token_url) + gone
    with TestClient(create_app(load_settings(write_config(text))), raise_server_exceptions=False) as client:
        response = client.get("/oauth2/gone/jwks")
    assert_facade_error(response, 503, "temporarily_unavailable")
    assert response.headers["retry-after"] == "1"


# -- the token endpoint: success ----------------------------------------------------------------


def _token_answer(response: Any) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.headers["cache-control"] == "no-store"
    assert response.headers["pragma"] == "no-cache"
    body: dict[str, Any] = response.json()
    assert list(body) == ["access_token", "token_type", "expires_in", "scope"]
    assert body["token_type"] == "Bearer"
    assert isinstance(body["expires_in"], int)
    return body


def test_basic_and_post_get_the_same_cached_token_as_v1(facade: TestClient, authserver: AuthServerProcess) -> None:
    by_basic = _token_answer(facade.post(TOKEN, headers=billing(), data=form(scope=f"{WRITE} {READ}")))
    by_post = _token_answer(
        facade.post(
            TOKEN, data=form(scope=f"{READ} {WRITE}", client_id="billing", client_secret=CALLER_KEYS["billing"])
        )
    )
    by_v1 = facade.get("/v1/tokens/payments", params={"scope": f"{READ} {WRITE}"}, headers=auth()).json()
    assert by_basic["access_token"] == by_post["access_token"] == by_v1["access_token"]
    assert by_basic["scope"] == f"{READ} {WRITE}"
    assert 3500 < by_basic["expires_in"] <= 3600
    assert authserver.token_requests() == 1


def test_no_scope_gets_the_default_scopes(facade: TestClient) -> None:
    body = _token_answer(facade.post(TOKEN, headers=billing(), data=form()))
    assert body["scope"] == READ
    assert _token_answer(facade.post(TOKEN, headers=billing(), data=form(scope="")))["scope"] == READ


def test_basic_parts_are_form_urldecoded(facade: TestClient) -> None:
    """RFC 6749 §2.3.1: clients form-urlencode id and secret before base64; raw ones work too."""
    key = CALLER_KEYS["billing"]
    encoded = "".join(f"%{b:02X}" for b in b"billing") + ":" + "".join(f"%{b:02X}" for b in key.encode())
    header = {"Authorization": "Basic " + base64.b64encode(encoded.encode()).decode()}
    assert _token_answer(facade.post(TOKEN, headers=header, data=form()))["scope"] == READ
    assert _token_answer(
        facade.post(TOKEN, headers={"Authorization": billing()["Authorization"].replace("Basic", "basic")}, data=form())
    )


def test_client_id_beside_basic_is_allowed_when_it_names_the_same_client(facade: TestClient) -> None:
    """RFC 6749 §3.2.1: a client may name itself with client_id; only a second secret is a second method."""
    _token_answer(facade.post(TOKEN, headers=billing(), data=form(client_id="billing")))


def test_unknown_form_fields_are_ignored(facade: TestClient) -> None:
    """RFC 6749 §3.2: the authorization server MUST ignore unrecognized request parameters."""
    _token_answer(facade.post(TOKEN, headers=billing(), data=form(audience="x", resource="https://y")))


def test_the_content_type_may_carry_a_charset(facade: TestClient) -> None:
    response = facade.post(
        TOKEN,
        headers={**billing(), "Content-Type": "application/x-www-form-urlencoded; charset=UTF-8"},
        content=b"grant_type=client_credentials",
    )
    _token_answer(response)


# -- the token endpoint: every RFC 6749 §5.2 error ----------------------------------------------

WRONG_KEY = new_caller_key()


@pytest.mark.parametrize(
    ("headers", "fields"),
    [
        pytest.param({}, form(), id="no-client-authentication"),
        pytest.param(basic("billing", WRONG_KEY), form(), id="basic-wrong-key"),
        pytest.param(basic("nobody", CALLER_KEYS["billing"]), form(), id="basic-unknown-name-with-a-real-key"),
        pytest.param(basic("reporting", CALLER_KEYS["billing"]), form(), id="basic-another-callers-key"),
        pytest.param(basic("nobody", WRONG_KEY), form(), id="basic-unknown-name"),
        pytest.param(basic("billing", ""), form(), id="basic-empty-key"),
        pytest.param({"Authorization": "Basic !!!notbase64"}, form(), id="basic-not-base64"),
        pytest.param({"Authorization": "Basic " + base64.b64encode(b"no-colon").decode()}, form(), id="basic-no-colon"),
        pytest.param(
            {"Authorization": "Basic " + base64.b64encode(b"\xff:\xfe").decode()}, form(), id="basic-not-utf8"
        ),
        pytest.param(auth(), form(), id="bearer-caller-key"),
        pytest.param({}, form(client_id="billing", client_secret=WRONG_KEY), id="post-wrong-key"),
        pytest.param({}, form(client_id="billing"), id="post-no-secret"),
        pytest.param({}, form(client_secret=CALLER_KEYS["billing"]), id="post-no-id"),
    ],
)
def test_bad_client_authentication_is_401_invalid_client(
    facade: TestClient, authserver: AuthServerProcess, headers: dict[str, str], fields: dict[str, str]
) -> None:
    assert_facade_error(facade.post(TOKEN, headers=headers, data=fields), 401, "invalid_client")
    assert authserver.token_requests() == 0


def test_an_unknown_name_answers_like_a_wrong_key(facade: TestClient) -> None:
    unknown = facade.post(TOKEN, headers=basic("nobody", CALLER_KEYS["billing"]), data=form())
    wrong = facade.post(TOKEN, headers=basic("billing", WRONG_KEY), data=form())
    assert (unknown.status_code, unknown.headers.multi_items(), unknown.content) == (
        wrong.status_code,
        wrong.headers.multi_items(),
        wrong.content,
    )


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        pytest.param({"data": {"scope": READ}}, "invalid_request", id="no-grant_type"),
        pytest.param(
            {"content": b"grant_type=client_credentials&grant_type=client_credentials"},
            "invalid_request",
            id="grant_type-twice",
        ),
        pytest.param(
            {"content": f"grant_type=client_credentials&scope={READ}&scope={READ}".encode()},
            "invalid_request",
            id="scope-twice",
        ),
        pytest.param({"data": form(client_secret="x")}, "invalid_request", id="basic-and-client_secret"),
        pytest.param({"data": form(client_id="reporting")}, "invalid_request", id="basic-and-another-client_id"),
        pytest.param(
            {"content": b"grant_type=client_credentials&client_id=a&client_id=b"},
            "invalid_request",
            id="client_id-twice",
        ),
        pytest.param({"json": form()}, "invalid_request", id="json-body"),
        pytest.param(
            {"content": b"grant_type=client_credentials", "headers": {"Content-Type": "text/plain"}},
            "invalid_request",
            id="text-body",
        ),
        pytest.param({"content": b"grant_type=client_credentials&x=\xff"}, "invalid_request", id="not-utf8"),
        pytest.param({"content": b"&".join([b"a=1"] * 40)}, "invalid_request", id="too-many-fields"),
        pytest.param(
            {"content": b"grant_type=client_credentials&x=" + b"y" * 20_000}, "invalid_request", id="oversized"
        ),
        pytest.param({"data": form(grant_type="password")}, "unsupported_grant_type", id="password-grant"),
        pytest.param({"data": form(grant_type="")}, "unsupported_grant_type", id="empty-grant_type"),
        pytest.param({"data": form(scope=ADMIN)}, "invalid_scope", id="scope-outside-grant"),
        pytest.param({"data": form(scope=f"{READ} {ADMIN}")}, "invalid_scope", id="one-scope-outside-grant"),
        pytest.param({"data": form(scope='a"b')}, "invalid_scope", id="malformed-scope"),
        pytest.param({"data": form(scope="urn:" + "x" * 300)}, "invalid_scope", id="scope-too-long"),
    ],
)
def test_bad_requests_are_400_with_the_rfc6749_code(
    facade: TestClient, authserver: AuthServerProcess, kwargs: dict[str, Any], error: str
) -> None:
    headers = {**billing(), **kwargs.pop("headers", {})}
    if "content" in kwargs:
        headers.setdefault("Content-Type", "application/x-www-form-urlencoded")
    assert_facade_error(facade.post(TOKEN, headers=headers, **kwargs), 400, error)
    assert authserver.token_requests() == 0


def test_invalid_scope_names_the_refused_scopes(facade: TestClient) -> None:
    body = assert_facade_error(facade.post(TOKEN, headers=billing(), data=form(scope=ADMIN)), 400, "invalid_scope")
    assert ADMIN in body["error_description"]


def test_no_scope_for_a_credential_without_default_scopes_is_invalid_scope(facade: TestClient) -> None:
    """RFC 6749 §3.3: without a default, a request that omits scope fails with invalid_scope
    (the /v1 route calls the same exception invalid_request, spec §4.8)."""
    response = facade.post("/oauth2/bare/token", headers=basic("noscope", NOSCOPE_KEY), data=form())
    assert "default scopes" in assert_facade_error(response, 400, "invalid_scope")["error_description"]
    v1 = facade.get("/v1/tokens/bare", headers={"Authorization": f"Bearer {NOSCOPE_KEY}"})
    assert_error(v1, 400, "invalid_request")
    assert v1.json()["error_description"] == response.json()["error_description"]


@pytest.mark.parametrize("credential", ["payments", "nope"])
def test_no_grant_is_unauthorized_client_whether_or_not_the_credential_exists(
    facade: TestClient, credential: str
) -> None:
    """The same bytes for a credential without a grant and for one that does not exist."""
    headers = basic("reporting", CALLER_KEYS["reporting"])  # granted ledger only
    response = facade.post(f"/oauth2/{credential}/token", headers=headers, data=form())
    assert_facade_error(response, 400, "unauthorized_client")
    other = facade.post("/oauth2/nope/token" if credential == "payments" else TOKEN, headers=headers, data=form())
    assert (response.status_code, response.headers.multi_items(), response.content) == (
        other.status_code,
        other.headers.multi_items(),
        other.content,
    )


def test_upstream_refusal_is_502_server_error(facade: TestClient, authserver: AuthServerProcess) -> None:
    authserver.configure(fault="invalid_client")
    body = assert_facade_error(facade.post(TOKEN, headers=billing(), data=form()), 502, "server_error")
    assert body["error_description"]


def test_upstream_invalid_answer_is_502_server_error(facade: TestClient, authserver: AuthServerProcess) -> None:
    authserver.configure(fault="html")
    assert_facade_error(facade.post(TOKEN, headers=billing(), data=form()), 502, "server_error")


def test_upstream_down_is_503_temporarily_unavailable_with_retry_after(
    facade: TestClient, authserver: AuthServerProcess
) -> None:
    authserver.configure(fault="503")
    response = facade.post(TOKEN, headers=billing(), data=form())
    assert_facade_error(response, 503, "temporarily_unavailable")
    assert int(response.headers["retry-after"]) >= 1


def test_get_on_the_token_endpoint_is_405(facade: TestClient) -> None:
    response = facade.get(TOKEN, headers=billing())
    assert_error(response, 405, "method_not_allowed")


# -- check order (spec §3.3) ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "content", "status", "error"),
    [
        pytest.param({}, b"grant_type=password&scope=a%22b", 401, "invalid_client", id="auth-before-grant_type"),
        pytest.param(
            basic("reporting", CALLER_KEYS["reporting"]),
            b"grant_type=password&scope=a%22b",
            400,
            "unauthorized_client",
            id="grant-before-syntax",
        ),
        pytest.param(
            basic("billing", CALLER_KEYS["billing"]),
            f"grant_type=password&scope={ADMIN}".encode(),
            400,
            "unsupported_grant_type",
            id="grant_type-before-scope",
        ),
        pytest.param(
            basic("billing", CALLER_KEYS["billing"]),
            f"grant_type=client_credentials&scope={ADMIN}&scope={READ}".encode(),
            400,
            "invalid_request",
            id="repeated-scope-before-scope-policy",
        ),
    ],
)
def test_checks_run_in_the_order_of_the_spec(
    facade: TestClient, headers: dict[str, str], content: bytes, status: int, error: str
) -> None:
    response = facade.post(
        TOKEN, headers={**headers, "Content-Type": "application/x-www-form-urlencoded"}, content=content
    )
    assert_facade_error(response, status, error)


# -- one error tree, two renderings --------------------------------------------------------------


def _tree(cls: type[errors.BrokerError]) -> Iterator[type[errors.BrokerError]]:
    yield cls
    for sub in cls.__subclasses__():
        yield from _tree(sub)


def test_every_error_in_the_tree_has_a_facade_rendering() -> None:
    expected = {
        "BrokerError": (500, "server_error"),
        "CallerError": (400, "invalid_request"),
        "InvalidRequest": (400, "invalid_request"),
        "InvalidScope": (400, "invalid_scope"),
        "UnsupportedGrantType": (400, "unsupported_grant_type"),
        "InvalidCallerToken": (401, "invalid_client"),
        "JWTRefused": (401, "invalid_client"),
        "AccessDenied": (400, "unauthorized_client"),
        "InsufficientScope": (400, "invalid_scope"),
        "NotFound": (404, "not_found"),
        "ReadOnly": (400, "invalid_request"),
        "RateLimited": (429, "rate_limited"),
        "UpstreamError": (502, "server_error"),
        "UpstreamRejected": (502, "server_error"),
        "UpstreamInvalidResponse": (502, "server_error"),
        "UpstreamUnavailable": (503, "temporarily_unavailable"),
        "ReauthorizationRequired": (400, "invalid_grant"),
        "StoreUnavailable": (503, "temporarily_unavailable"),
        "StoreBusy": (503, "temporarily_unavailable"),
    }
    found = {cls.__name__: cls.facade for cls in _tree(errors.BrokerError) if cls.__module__ == "broker.errors"}
    assert found == expected


def test_an_error_without_a_facade_rendering_cannot_be_defined() -> None:
    with pytest.raises(TypeError, match="facade"):

        class Forgotten(errors.CallerError):  # pragma: no cover - refused at definition
            status = 418
            code = "forgotten"


@pytest.mark.parametrize(
    ("error", "headers"),
    [
        (errors.UpstreamUnavailable("down", retry_after=7.2), {"Retry-After": "7"}),
        (errors.UpstreamUnavailable("down"), {"Retry-After": "1"}),
        (errors.StoreBusy("busy"), {"Retry-After": "1"}),
        (errors.StoreUnavailable("gone"), {"Retry-After": "1"}),
        (errors.InvalidCallerToken("no"), {"WWW-Authenticate": BASIC_CHALLENGE}),
        (errors.AccessDenied(), {}),
        (errors.UpstreamRejected("no", upstream_error="invalid_client", upstream_status=401), {}),
    ],
)
def test_facade_headers(error: errors.BrokerError, headers: dict[str, str]) -> None:
    assert error.facade_headers() == headers
    assert set(error.facade_body()) == {"error", "error_description"}


# -- min_ttl, counters, audit ---------------------------------------------------------------------


def _age(redis_url: str, clock: FakeClock, seconds: float) -> None:
    from tests.api.test_fastpath import age_tokens

    age_tokens(redis_url, clock, seconds)


def test_the_facade_asks_for_min_ttl_seconds_left(
    facade: TestClient, authserver: AuthServerProcess, clock: FakeClock, redis_url: str
) -> None:
    """Client libraries renew 30-60 s early: a token with less than [facade] min_ttl_seconds (120)
    left is replaced, where /v1 without min_ttl still serves it."""
    first = _token_answer(facade.post(TOKEN, headers=billing(), data=form()))
    _age(redis_url, clock, 3600 - 100)  # 100 s left: fresh for /v1 (skew 30), not for the facade
    v1 = facade.get("/v1/tokens/payments", headers=auth()).json()
    assert v1["access_token"] == first["access_token"]
    second = _token_answer(facade.post(TOKEN, headers=billing(), data=form()))
    assert second["access_token"] != first["access_token"]  # (its JWT exp is judged on the fake clock)
    assert authserver.token_requests() == 2


def test_min_ttl_seconds_is_capped_at_half_the_lifetime(
    facade: TestClient, authserver: AuthServerProcess, clock: FakeClock, redis_url: str
) -> None:
    """A 100 s token is not refetched on every call although it never has 120 s left."""
    authserver.configure(lifetime=100)
    _token_answer(facade.post(TOKEN, headers=billing(), data=form()))
    _age(redis_url, clock, 40)  # 60 s left: more than half the lifetime
    for _ in range(3):
        _token_answer(facade.post(TOKEN, headers=billing(), data=form()))
    assert authserver.token_requests() == 1


def test_min_ttl_seconds_is_configurable(
    write_config: Callable[..., Path], authserver: AuthServerProcess, clock: FakeClock, redis_url: str
) -> None:
    text = facade_config("[facade]\nmin_ttl_seconds = 0\n").replace("{token_url}", authserver.token_url)
    with TestClient(create_app(load_settings(write_config(text)), clock=clock)) as client:
        first = _token_answer(client.post(TOKEN, headers=billing(), data=form()))
        _age(redis_url, clock, 3600 - 100)
        second = _token_answer(client.post(TOKEN, headers=billing(), data=form()))
    assert second["access_token"] == first["access_token"]  # (past its refresh point: one refresh starts)
    assert second["expires_in"] <= 100


def _facade_counted(client: TestClient, outcome: str) -> float:
    prefix = f'token_broker_facade_requests_total{{credential="payments",outcome="{outcome}"}}'
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(prefix):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_facade_traffic_is_counted_and_audited_as_such(facade: TestClient, clock: FakeClock) -> None:
    fetched, unauthorized = _facade_counted(facade, "fetched"), _facade_counted(facade, "refused")
    _token_answer(facade.post(TOKEN, headers=billing(), data=form()))
    facade.get("/v1/tokens/payments", headers=auth())  # not facade traffic
    facade.post(TOKEN, headers=basic("reporting", CALLER_KEYS["reporting"]), data=form())
    assert _facade_counted(facade, "fetched") == fetched + 1
    assert _facade_counted(facade, "refused") == unauthorized + 1
    broker = facade.app_state["broker"]
    with capture_logs() as logs:
        broker.audit.flush()
    handed = sorted((e["via"], e["source"]) for e in logs if e["event"] == "audit.tokens_handed_out")
    assert handed == [("oauth2", "fetched"), ("v1", "l1")]


def test_a_failed_request_is_logged_with_its_rfc6749_code(facade: TestClient) -> None:
    with capture_logs() as logs:
        facade.post(TOKEN, headers=basic("reporting", CALLER_KEYS["reporting"]), data=form())
    [event] = [e for e in logs if e["event"] == "request"]
    assert (event["status"], event["error"], event["caller"], event["credential"]) == (
        400,
        "unauthorized_client",
        "reporting",
        "payments",
    )


def test_quote_is_not_needed_in_scope_values(facade: TestClient) -> None:
    """A scope sent with its ':' percent-encoded is the same scope set."""
    response = facade.post(
        TOKEN,
        headers={**billing(), "Content-Type": "application/x-www-form-urlencoded"},
        content=f"grant_type=client_credentials&scope={quote(READ, safe='')}".encode(),
    )
    assert _token_answer(response)["scope"] == READ


def test_a_token_request_never_shows_its_secret() -> None:
    from broker.api.facade import parse_token_request

    request = parse_token_request(billing()["Authorization"], "application/x-www-form-urlencoded", b"scope=a")
    assert request.client_secret == CALLER_KEYS["billing"]
    assert CALLER_KEYS["billing"] not in repr(request)
    assert CALLER_KEYS["billing"] not in str(request)
