"""The test authorization server's keyless client authentication (tests/authserver_keyless.py),
exercised over real HTTP and HTTPS: it must really verify what the broker sends, or the broker's
tests of private_key_jwt and tls_client_auth would prove nothing."""

from __future__ import annotations

import ssl
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from joserfc import jwt
from joserfc.jwk import OctKey

from tests.authserver_keyless import ASSERTION_TYPE
from tests.support import CLIENT_ID, CLIENT_SECRET, AuthServerProcess
from tests.support_keyless import ClientCertFiles, Pki, SigningKeyPair, ec_key, rsa_key

GRANT = {"grant_type": "client_credentials", "scope": "urn:a"}
KEY = rsa_key()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def server(pki: Pki) -> Iterator[AuthServerProcess]:
    with AuthServerProcess(tls=pki.tls) as srv:
        yield srv


@pytest.fixture(autouse=True)
def _fresh_server(server: AuthServerProcess) -> None:
    server.reset()


def claims(server: AuthServerProcess, **changes: Any) -> dict[str, Any]:
    now = int(time.time())
    base = {
        "iss": CLIENT_ID,
        "sub": CLIENT_ID,
        "aud": server.token_url,
        "jti": uuid.uuid4().hex,
        "iat": now,
        "exp": now + 60,
    }
    return {k: v for k, v in {**base, **changes}.items() if v is not None}


def assertion(key: SigningKeyPair, body: dict[str, Any], alg: str = "RS256", **header: Any) -> str:
    return jwt.encode({"alg": alg, **header}, body, key.key, algorithms=[alg])


def post_assertion(url: str, token: str, **extra: str) -> httpx.Response:
    form = {**GRANT, "client_id": CLIENT_ID, "client_assertion_type": ASSERTION_TYPE, "client_assertion": token}
    return httpx.post(url, data={**form, **extra}, timeout=10, trust_env=False)


def refused(response: httpx.Response, words: str) -> None:
    assert response.status_code == 401, response.text
    assert response.json()["error"] == "invalid_client"
    assert words in response.json()["error_description"]


@pytest.mark.parametrize(("alg", "key"), [("RS256", KEY), ("PS256", KEY), ("ES256", ec_key())])
def test_a_signed_assertion_with_a_registered_key_gets_a_token(
    server: AuthServerProcess, alg: str, key: SigningKeyPair
) -> None:
    server.register_keyless(jwks=key.jwks())
    response = post_assertion(server.token_url, assertion(key, claims(server), alg))
    assert response.status_code == 200, response.text
    [record] = server.stats()["requests"]
    assert record["auth"] == "private_key_jwt"


def test_a_replayed_assertion_is_refused(server: AuthServerProcess) -> None:
    server.register_keyless(jwks=KEY.jwks())
    token = assertion(KEY, claims(server))
    assert post_assertion(server.token_url, token).status_code == 200
    refused(post_assertion(server.token_url, token), "replayed")
    assert server.stats()["assertion_replays"] == 1


@dataclass(frozen=True)
class FromNow:
    """A claim's time, `seconds` from when the test runs."""

    seconds: int


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"aud": "https://elsewhere.example/oauth/token"}, "aud"),
        ({"exp": FromNow(-30), "iat": FromNow(-60)}, "expired"),
        ({"exp": FromNow(3600)}, "longer than 60 s"),
        ({"iat": FromNow(600), "exp": FromNow(630)}, "future"),
        ({"sub": "someone-else"}, "sub"),
        ({"jti": None}, "jti"),
        ({"exp": None}, "exp"),
    ],
    ids=["aud", "expired", "too-long", "future", "sub", "no-jti", "no-exp"],
)
def test_claims_are_checked(server: AuthServerProcess, changes: dict[str, Any], words: str) -> None:
    server.register_keyless(jwks=KEY.jwks())
    # times from when the test runs, not from collection (a whole suite can take longer than 630 s)
    now = int(time.time())
    changes = {k: now + v.seconds if isinstance(v, FromNow) else v for k, v in changes.items()}
    refused(post_assertion(server.token_url, assertion(KEY, claims(server, **changes))), words)


def test_the_signature_is_checked_against_the_registered_key(server: AuthServerProcess) -> None:
    server.register_keyless(jwks=rsa_key().jwks())
    refused(post_assertion(server.token_url, assertion(KEY, claims(server))), "signature")
    server.register_keyless(jwks=None)
    refused(post_assertion(server.token_url, assertion(KEY, claims(server))), "no keys registered")


def test_symmetric_and_unsigned_assertions_are_refused(server: AuthServerProcess) -> None:
    server.register_keyless(jwks=KEY.jwks())
    hs256 = jwt.encode({"alg": "HS256"}, claims(server), OctKey.import_key(b"k" * 32), algorithms=["HS256"])
    refused(post_assertion(server.token_url, hs256), "'HS256' is not allowed")
    unsigned = ".".join(hs256.split(".")[:2]).replace(hs256.split(".")[0], "eyJhbGciOiJub25lIn0") + "."
    refused(post_assertion(server.token_url, unsigned), "'none' is not allowed")


def test_the_audience_is_the_endpoint_the_request_came_to(server: AuthServerProcess, pki: Pki) -> None:
    """Over HTTPS, the alias URL is the audience (the issuer's token_endpoint is not)."""
    server.register_keyless(jwks=KEY.jwks())
    assert server.tls_url is not None
    https = f"{server.tls_url}/oauth/token"
    verify = ssl.create_default_context(cafile=pki.tls.server_ca_file)
    form = {**GRANT, "client_id": CLIENT_ID, "client_assertion_type": ASSERTION_TYPE}
    with httpx.Client(verify=verify, trust_env=False) as client:
        wrong = client.post(https, data={**form, "client_assertion": assertion(KEY, claims(server))})
        refused(wrong, "aud")
        right = client.post(https, data={**form, "client_assertion": assertion(KEY, claims(server, aud=https))})
        assert right.status_code == 200, right.text


def test_discovery_names_the_mtls_aliases(server: AuthServerProcess) -> None:
    document = httpx.get(f"{server.url}/.well-known/openid-configuration", trust_env=False).json()
    assert document["mtls_endpoint_aliases"]["token_endpoint"] == f"{server.tls_url}/oauth/token"
    assert "tls_client_auth" in document["token_endpoint_auth_methods_supported"]
    assert "private_key_jwt" in document["token_endpoint_auth_methods_supported"]


def mtls_post(server: AuthServerProcess, pki: Pki, cert: ClientCertFiles | None) -> httpx.Response:
    context = ssl.create_default_context(cafile=pki.tls.server_ca_file)
    if cert is not None:
        context.load_cert_chain(cert.cert_file, cert.key_file)
    with httpx.Client(verify=context, trust_env=False, timeout=10) as client:
        return client.post(f"{server.tls_url}/oauth/token", data={**GRANT, "client_id": CLIENT_ID})


def test_a_client_certificate_with_the_registered_subject_gets_a_token(server: AuthServerProcess, pki: Pki) -> None:
    cert = pki.client_cert("keyless-client")
    server.register_keyless(tls_client_auth_subject_dn=cert.subject)
    response = mtls_post(server, pki, cert)
    assert response.status_code == 200, response.text
    [record] = server.stats()["requests"]
    assert (record["auth"], record["client_cert"]) == ("tls_client_auth", cert.subject)


def test_a_certificate_of_another_subject_or_none_is_refused(server: AuthServerProcess, pki: Pki) -> None:
    server.register_keyless(tls_client_auth_subject_dn=pki.client_cert("keyless-client").subject)
    refused(mtls_post(server, pki, pki.client_cert("another-client")), "is not the registered one")
    refused(mtls_post(server, pki, None), "no client certificate")


def test_a_certificate_from_an_untrusted_ca_fails_the_handshake(server: AuthServerProcess, pki: Pki) -> None:
    cert = pki.client_cert("keyless-client", ca=pki.untrusted_ca)
    server.register_keyless(tls_client_auth_subject_dn=cert.subject)
    with pytest.raises(httpx.TransportError):
        mtls_post(server, pki, cert)
    assert server.stats()["token_requests"] == 0


def test_secrets_still_work_beside_keyless_registrations(server: AuthServerProcess) -> None:
    server.register_keyless(jwks=KEY.jwks())
    response = httpx.post(server.token_url, data=GRANT, auth=(CLIENT_ID, CLIENT_SECRET), trust_env=False)
    assert response.status_code == 200, response.text
