"""Callers authenticated by workload JWTs (spec §6.3), through the public API.

The issuers are tests/callerissuer.py in a real process (discovery and key sets over HTTP); the
tests hold the signing keys. Every attack is its own test and gets the one answer: 401
`invalid_token`, "The caller token is not valid.", whatever check failed.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from joserfc import jwt
from joserfc.errors import SecurityWarning
from joserfc.jwk import RSAKey
from starlette.testclient import TestClient
from structlog.testing import capture_logs

from broker.api import create_app
from broker.api.fastpath import FastPath
from broker.caller_jwt import KEYS_TTL_SECONDS, MAX_TOKEN_BYTES, CallerJWTs, RefusalLog
from broker.clock import FakeClock
from broker.errors import JWTRefused
from broker.settings import load_settings
from tests.api.helpers import WWW_AUTHENTICATE
from tests.callerissuer import AUDIENCE, CallerIssuerProcess, Signer, new_key
from tests.conftest import READ, WRITE, auth

SUBJECT = "system:serviceaccount:billing:api"
REPORTING_SUBJECT = "system:serviceaccount:reporting:cron"
OTHER_ONLY_SUBJECT = "repo:example/deploy:ref:refs/heads/main"
REFUSED = {"error": "invalid_token", "error_description": "The caller token is not valid."}
TOKEN_URL = f"/v1/tokens/payments?scope={READ}"


@pytest.fixture(scope="module")
def issuers() -> Iterator[CallerIssuerProcess]:
    with CallerIssuerProcess() as process:
        yield process


@pytest.fixture
def cluster(issuers: CallerIssuerProcess) -> Signer:
    """The trusted issuer `cluster` (key set found by discovery), with one RSA, EC and OKP key."""
    issuers.reset()
    signer = Signer(issuers.issuer("cluster"), [new_key("RSA"), new_key("EC"), new_key("OKP")])
    issuers.publish("cluster", signer)
    return signer


@pytest.fixture
def other(issuers: CallerIssuerProcess, cluster: Signer) -> Signer:
    """A second trusted issuer, `other`, with its own key and a configured jwks_uri."""
    signer = Signer(issuers.issuer("other"))
    issuers.publish("other", signer)
    return signer


def jwt_config(cluster: Signer, other: Signer, extra: str = "") -> str:
    return f"""
        [caller_issuers.cluster]
        issuer = "{cluster.issuer}"
        audience = "{AUDIENCE}"

        [caller_issuers.other]
        issuer = "{other.issuer}"
        jwks_uri = "{other.issuer}/jwks"
        audience = "{AUDIENCE}"

        [callers.billing-pods]
        jwt_subjects = ["{SUBJECT}"]
        [callers.billing-pods.grants]
        payments = ["{READ}"]

        [callers.reporting-pods]
        jwt_subjects = [{{ issuer = "cluster", subject = "{REPORTING_SUBJECT}" }}]
        [callers.reporting-pods.grants]
        payments = ["{READ}", "{WRITE}"]

        [callers.deploy]
        jwt_subjects = [{{ issuer = "other", subject = "{OTHER_ONLY_SUBJECT}" }}]
        [callers.deploy.grants]
        payments = ["{READ}"]
        {extra}
        """


@pytest.fixture
def jwt_client(write_config: Callable[..., Path], cluster: Signer, other: Signer) -> Iterator[TestClient]:
    settings = load_settings(write_config(jwt_config(cluster, other)))
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        yield client


@pytest.fixture
def reasons(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Why each refused JWT was refused: what the log says (aggregated), never the answer."""
    seen: list[str] = []
    original = RefusalLog.record

    def spy(self: RefusalLog, refusal: JWTRefused) -> None:
        seen.append(refusal.reason)
        original(self, refusal)

    monkeypatch.setattr(RefusalLog, "record", spy)
    return seen


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def assert_refused(response: httpx.Response) -> None:
    assert response.status_code == 401, response.text
    assert response.json() == REFUSED
    assert response.headers["www-authenticate"] == WWW_AUTHENTICATE


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def segment(value: dict[str, Any]) -> str:
    return b64(json.dumps(value).encode())


# -- accepted -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "alg"), [("RSA", "RS256"), ("RSA", "PS256"), ("EC", "ES256"), ("OKP", "Ed25519")])
def test_a_caller_jwt_gets_a_token_like_a_caller_key(
    jwt_client: TestClient, cluster: Signer, kind: str, alg: str
) -> None:
    key = next(k for k in cluster.keys if k.key_type == kind)
    response = jwt_client.get(TOKEN_URL, headers=bearer(cluster.token(SUBJECT, key=key, alg=alg)))
    assert response.status_code == 200, response.text
    assert response.json()["scope"] == READ


def test_eddsa_is_accepted_without_a_warning(jwt_client: TestClient, cluster: Signer) -> None:
    """joserfc warns that the name EdDSA is deprecated (RFC 9864): not once per request."""
    okp = next(k for k in cluster.keys if k.key_type == "OKP")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SecurityWarning)
        token = cluster.token(SUBJECT, key=okp, alg="EdDSA")
    assert jwt_client.get(TOKEN_URL, headers=bearer(token)).status_code == 200


def test_caller_keys_keep_working_beside_jwts(jwt_client: TestClient, cluster: Signer) -> None:
    assert jwt_client.get(TOKEN_URL, headers=bearer(cluster.token(SUBJECT))).status_code == 200
    assert jwt_client.get(TOKEN_URL, headers=auth("billing")).status_code == 200
    assert jwt_client.get(TOKEN_URL, headers=bearer(cluster.token(SUBJECT))).status_code == 200


def test_the_subject_names_the_caller_and_its_grants(jwt_client: TestClient, cluster: Signer) -> None:
    both = f"/v1/tokens/payments?scope={READ}%20{WRITE}"
    reporting = jwt_client.get(both, headers=bearer(cluster.token(REPORTING_SUBJECT)))
    assert reporting.status_code == 200, reporting.text
    billing = jwt_client.get(both, headers=bearer(cluster.token(SUBJECT)))
    assert billing.status_code == 403
    assert billing.json()["error"] == "insufficient_scope"


def test_a_subject_bound_to_one_issuer_is_refused_from_another(
    jwt_client: TestClient, cluster: Signer, other: Signer
) -> None:
    assert jwt_client.get(TOKEN_URL, headers=bearer(other.token(OTHER_ONLY_SUBJECT))).status_code == 200
    assert_refused(jwt_client.get(TOKEN_URL, headers=bearer(cluster.token(OTHER_ONLY_SUBJECT))))
    assert_refused(jwt_client.get(TOKEN_URL, headers=bearer(other.token(REPORTING_SUBJECT))))


def test_an_audience_list_naming_the_broker_is_accepted(jwt_client: TestClient, cluster: Signer) -> None:
    token = cluster.token(SUBJECT, aud=["https://kubernetes.default.svc", AUDIENCE])
    assert jwt_client.get(TOKEN_URL, headers=bearer(token)).status_code == 200


def test_clock_skew_within_the_leeway_is_accepted(jwt_client: TestClient, cluster: Signer) -> None:
    now = cluster.claims(SUBJECT)["iat"]
    token = cluster.token(SUBJECT, iat=now + 20, nbf=now + 20, exp=now - 10)
    assert jwt_client.get(TOKEN_URL, headers=bearer(token)).status_code == 200


def test_a_token_presented_again_costs_no_signature_check_and_l1_hits_take_the_fast_path(
    jwt_client: TestClient, cluster: Signer, issuers: CallerIssuerProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    checks: list[str] = []
    original_check = CallerJWTs._check_signature
    served: list[bool] = []
    original_hit = FastPath._hit

    def check_spy(*args: Any) -> None:
        checks.append(args[2])
        original_check(*args)

    def hit_spy(self: FastPath, scope: dict[str, Any]) -> Any:
        answer = original_hit(self, scope)
        served.append(answer is not None)
        return answer

    monkeypatch.setattr(CallerJWTs, "_check_signature", staticmethod(check_spy))
    monkeypatch.setattr(FastPath, "_hit", hit_spy)
    token = cluster.token(SUBJECT)
    for _ in range(20):
        assert jwt_client.get(TOKEN_URL, headers=bearer(token)).status_code == 200
    assert checks == ["RS256"]
    # The first request needed the key set (no I/O on the fast path) and the token (a miss);
    # every later one was an L1 hit answered by the fast path.
    assert served == [False, *[True] * 19]
    assert issuers.stats("cluster") == {"jwks": 1, "discovery": 1}


def test_new_tokens_from_a_known_issuer_need_no_new_key_set_fetch(
    jwt_client: TestClient, cluster: Signer, issuers: CallerIssuerProcess
) -> None:
    for key in cluster.keys * 3:
        assert jwt_client.get(TOKEN_URL, headers=bearer(cluster.token(SUBJECT, key=key))).status_code == 200
    assert issuers.stats("cluster") == {"jwks": 1, "discovery": 1}


def test_the_algorithm_allow_list_of_an_issuer_is_enforced(
    write_config: Callable[..., Path], cluster: Signer, other: Signer
) -> None:
    extra = f"""
        [caller_issuers.ec-only]
        issuer = "{cluster.issuer}-ec"
        jwks_uri = "{cluster.issuer}/jwks"
        audience = "{AUDIENCE}"
        algorithms = ["ES256"]
        """
    settings = load_settings(write_config(jwt_config(cluster, other, extra)))
    ec = next(k for k in cluster.keys if k.key_type == "EC")
    ec_issuer = Signer(f"{cluster.issuer}-ec", cluster.keys)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        assert client.get(TOKEN_URL, headers=bearer(ec_issuer.token(SUBJECT, key=ec))).status_code == 200
        assert_refused(client.get(TOKEN_URL, headers=bearer(ec_issuer.token(SUBJECT))))  # RS256


# -- the attacks: one answer for all --------------------------------------------------------------


def test_alg_none_is_refused(jwt_client: TestClient, cluster: Signer, reasons: list[str]) -> None:
    header = {"alg": "none", "kid": cluster.key.kid, "typ": "JWT"}
    token = f"{segment(header)}.{segment(cluster.claims(SUBJECT))}."
    assert_refused(jwt_client.get(TOKEN_URL, headers=bearer(token)))
    assert reasons == ["algorithm"]


def test_hs256_signed_with_the_issuers_rsa_public_key_is_refused(
    jwt_client: TestClient, cluster: Signer, reasons: list[str]
) -> None:
    assert isinstance(cluster.key, RSAKey)
    public_pem = cluster.key.as_pem(private=False)
    public_jwk = json.dumps(cluster.key.as_dict(private=False)).encode()
    der = cluster.key.public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.PKCS1)
    for secret in (public_pem, public_jwk, der):
        header = {"alg": "HS256", "kid": cluster.key.kid, "typ": "JWT"}
        signing_input = f"{segment(header)}.{segment(cluster.claims(SUBJECT))}"
        signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
        assert_refused(jwt_client.get(TOKEN_URL, headers=bearer(f"{signing_input}.{b64(signature)}")))
    assert reasons == ["algorithm"] * 3


def test_an_expired_token_is_refused(jwt_client: TestClient, cluster: Signer, reasons: list[str]) -> None:
    now = cluster.claims(SUBJECT)["iat"]
    token = cluster.token(SUBJECT, iat=now - 700, nbf=now - 700, exp=now - 31)
    assert_refused(jwt_client.get(TOKEN_URL, headers=bearer(token)))
    assert reasons == ["expired"]


def test_a_token_not_yet_valid_is_refused(jwt_client: TestClient, cluster: Signer, reasons: list[str]) -> None:
    now = cluster.claims(SUBJECT)["iat"]
    token = cluster.token(SUBJECT, nbf=now + 300, exp=now + 900)
    assert_refused(jwt_client.get(TOKEN_URL, headers=bearer(token)))
    assert reasons == ["not_yet_valid"]


def test_a_token_for_another_audience_is_refused(jwt_client: TestClient, cluster: Signer, reasons: list[str]) -> None:
    for audience in (["https://kubernetes.default.svc"], "token-broker-staging", [], None):
        assert_refused(jwt_client.get(TOKEN_URL, headers=bearer(cluster.token(SUBJECT, aud=audience))))
    assert reasons == ["audience", "audience", "audience", "missing_claim"]


def test_a_token_from_an_untrusted_issuer_is_refused(
    jwt_client: TestClient, cluster: Signer, reasons: list[str]
) -> None:
    """Signed with a trusted issuer's key, but naming an issuer that is not configured."""
    for iss in ("https://evil.example", f"{cluster.issuer}/", None):
        assert_refused(jwt_client.get(TOKEN_URL, headers=bearer(cluster.token(SUBJECT, iss=iss))))
    assert reasons == ["unknown_issuer"] * 3


def test_a_token_with_an_unknown_kid_is_refused(jwt_client: TestClient, cluster: Signer, reasons: list[str]) -> None:
    stranger = new_key("RSA")
    assert_refused(jwt_client.get(TOKEN_URL, headers=bearer(cluster.token(SUBJECT, key=stranger))))
    assert reasons == ["unknown_kid"]


def test_a_valid_token_for_a_subject_mapped_to_no_caller_is_refused(
    jwt_client: TestClient, cluster: Signer, reasons: list[str]
) -> None:
    token = cluster.token("system:serviceaccount:intruder:default")
    assert_refused(jwt_client.get(TOKEN_URL, headers=bearer(token)))
    assert reasons == ["unknown_subject"]


def test_a_payload_edited_after_signing_is_refused(jwt_client: TestClient, cluster: Signer, reasons: list[str]) -> None:
    header, _, signature = cluster.token("system:serviceaccount:intruder:default").split(".")
    edited = f"{header}.{segment(cluster.claims(SUBJECT))}.{signature}"
    assert_refused(jwt_client.get(TOKEN_URL, headers=bearer(edited)))
    assert reasons == ["signature"]


def test_a_token_for_another_issuers_key_set_is_refused(
    jwt_client: TestClient, cluster: Signer, other: Signer, reasons: list[str]
) -> None:
    """Names the issuer `other` but is signed with a key of `cluster` (both trusted)."""
    forged = Signer(other.issuer, cluster.keys).token(OTHER_ONLY_SUBJECT)
    assert_refused(jwt_client.get(TOKEN_URL, headers=bearer(forged)))
    # ... and with `other`'s kid on it, the signature does not verify
    header = {"alg": "RS256", "kid": other.key.kid}
    relabelled = jwt.encode(header, other.claims(OTHER_ONLY_SUBJECT), cluster.key)
    assert_refused(jwt_client.get(TOKEN_URL, headers=bearer(relabelled)))
    assert reasons == ["unknown_kid", "signature"]


def test_an_oversized_token_is_refused(jwt_client: TestClient, cluster: Signer, reasons: list[str]) -> None:
    token = cluster.token(SUBJECT, padding="x" * MAX_TOKEN_BYTES)
    assert MAX_TOKEN_BYTES < len(token) < 12_000  # below the header limit: the token's own check answers
    assert_refused(jwt_client.get(TOKEN_URL, headers=bearer(token)))
    assert reasons == ["too_large"]


def test_malformed_tokens_are_refused(jwt_client: TestClient, cluster: Signer, reasons: list[str]) -> None:
    good = cluster.token(SUBJECT)
    header, payload, signature = good.split(".")
    for token in (
        "a.b.c",
        "..",
        f"{header}.{payload}",
        f"{header}.{payload}.{signature}.x",
        f"{segment({'alg': 'RS256'})}.{b64(b'[1, 2]')}.{signature}",
        f"{segment({'alg': 'RS256', 'kid': cluster.key.kid})}.{b64(b'not json')}.{signature}",
        f"{segment({'alg': 'RS256', 'kid': 7})}.{payload}.{signature}",
        f"{segment({'alg': 'RS256', 'b64': False, 'crit': ['b64']})}.{payload}.{signature}",
    ):
        assert_refused(jwt_client.get(TOKEN_URL, headers=bearer(token)))
    assert reasons == ["malformed", "malformed", "malformed", "malformed", "malformed", "malformed", "header", "header"]


def test_refusals_are_logged_by_reason_at_most_once_a_minute(jwt_client: TestClient, cluster: Signer) -> None:
    now = cluster.claims(SUBJECT)["iat"]
    expired = cluster.token(SUBJECT, exp=now - 100)
    with capture_logs() as logs:
        for _ in range(30):
            assert_refused(jwt_client.get(TOKEN_URL, headers=bearer(expired)))
            assert_refused(jwt_client.get(TOKEN_URL, headers=bearer(cluster.token(SUBJECT, aud="x"))))
    refused = [e for e in logs if e["event"] == "caller_jwt.refused"]
    assert [(e["reason"], e["issuer"]) for e in refused] == [("expired", "cluster"), ("audience", "cluster")]
    assert all(expired not in json.dumps(e, default=str) for e in logs)


def test_a_jwt_never_works_on_the_admin_api(jwt_client: TestClient, cluster: Signer) -> None:
    response = jwt_client.get("/v1/admin/callers", headers=bearer(cluster.token(SUBJECT)))
    assert response.status_code == 401
    assert response.json()["error"] == "invalid_token"


def test_an_unreachable_issuer_is_a_refusal_not_an_error(
    write_config: Callable[..., Path], cluster: Signer, other: Signer
) -> None:
    gone = Signer(f"http://127.0.0.1:9/{uuid.uuid4().hex}")
    extra = f"""
        [caller_issuers.gone]
        issuer = "{gone.issuer}"
        audience = "{AUDIENCE}"

        [callers.gone-pods]
        jwt_subjects = [{{ issuer = "gone", subject = "{SUBJECT}-gone" }}]
        """
    settings = load_settings(write_config(jwt_config(cluster, other, extra)))
    with TestClient(create_app(settings), raise_server_exceptions=False) as client, capture_logs() as logs:
        assert_refused(client.get(TOKEN_URL, headers=bearer(gone.token(f"{SUBJECT}-gone"))))
    assert [e["issuer"] for e in logs if e["event"] == "caller_jwt.keys_unavailable"] == ["gone"]


# -- remembered tokens end with the token, or when the key is withdrawn --------------------------


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(time.time())


@pytest.fixture
def clocked_client(
    write_config: Callable[..., Path], cluster: Signer, other: Signer, clock: FakeClock
) -> Iterator[TestClient]:
    settings = load_settings(write_config(jwt_config(cluster, other)))
    with TestClient(create_app(settings, clock=clock), raise_server_exceptions=False) as client:
        yield client


def test_a_remembered_token_is_refused_once_it_expires(
    clocked_client: TestClient, cluster: Signer, clock: FakeClock, reasons: list[str]
) -> None:
    token = cluster.token(SUBJECT, exp=int(clock.now()) + 60)
    assert clocked_client.get(TOKEN_URL, headers=bearer(token)).status_code == 200
    clock.advance(60 + 25)  # within the leeway: still good
    assert clocked_client.get(TOKEN_URL, headers=bearer(token)).status_code == 200
    clock.advance(10)
    assert_refused(clocked_client.get(TOKEN_URL, headers=bearer(token)))
    assert reasons == ["expired"]


def test_a_key_withdrawn_by_the_issuer_stops_its_remembered_tokens_within_the_key_set_ttl(
    clocked_client: TestClient,
    cluster: Signer,
    issuers: CallerIssuerProcess,
    clock: FakeClock,
    reasons: list[str],
) -> None:
    token = cluster.token(SUBJECT, exp=int(clock.now()) + 3600)
    assert clocked_client.get(TOKEN_URL, headers=bearer(token)).status_code == 200
    issuers.publish("cluster", Signer(cluster.issuer, cluster.keys[1:]))  # the RSA key withdrawn
    clock.advance(KEYS_TTL_SECONDS - 1)
    assert clocked_client.get(TOKEN_URL, headers=bearer(token)).status_code == 200  # remembered
    clock.advance(2)
    assert_refused(clocked_client.get(TOKEN_URL, headers=bearer(token)))
    assert reasons == ["unknown_kid"]
    assert issuers.stats("cluster")["jwks"] == 2
