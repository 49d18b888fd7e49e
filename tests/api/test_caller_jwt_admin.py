"""Caller JWTs through the admin API (spec §3.6, §6.3): caller issuers and callers known by their
JWT subjects, created at run time, validated like the config file."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from broker.api import create_app
from broker.settings import load_settings
from tests.api.test_caller_jwt import REFUSED, TOKEN_URL, assert_refused, bearer
from tests.callerissuer import AUDIENCE, CallerIssuerProcess, Signer
from tests.conftest import READ, admin_auth

ADMIN = "/v1/admin"
SUBJECT = "system:serviceaccount:ci:runner"


@pytest.fixture(scope="module")
def issuers() -> Iterator[CallerIssuerProcess]:
    with CallerIssuerProcess() as process:
        yield process


@pytest.fixture
def ci(issuers: CallerIssuerProcess) -> Signer:
    issuers.reset()
    signer = Signer(issuers.issuer("ci"))
    issuers.publish("ci", signer)
    return signer


@pytest.fixture
def client(write_config: Callable[..., Path], issuers: CallerIssuerProcess) -> Iterator[TestClient]:
    """A broker whose config trusts one issuer (`cluster`, read-only here)."""
    config = write_config(
        f"""
        [caller_issuers.cluster]
        issuer = "{issuers.issuer("cluster")}"
        audience = "{AUDIENCE}"

        [callers.cluster-pods]
        jwt_subjects = ["system:serviceaccount:billing:api"]
        """
    )
    with TestClient(create_app(load_settings(config)), raise_server_exceptions=False) as test_client:
        yield test_client


def put_issuer(client: TestClient, ci: Signer) -> None:
    response = client.put(
        f"{ADMIN}/caller_issuers/ci", json={"issuer": ci.issuer, "audience": AUDIENCE}, headers=admin_auth()
    )
    assert response.status_code == 201, response.text


def test_an_issuer_and_a_jwt_caller_made_through_the_api_work_at_once(client: TestClient, ci: Signer) -> None:
    put_issuer(client, ci)
    body = {"grants": {"payments": [READ]}, "jwt_subjects": [{"issuer": "ci", "subject": SUBJECT}]}
    created = client.put(f"{ADMIN}/callers/ci-runner", json=body, headers=admin_auth())
    assert created.status_code == 201, created.text
    assert "caller_key" not in created.json()  # known by its JWTs: no key made
    assert created.json()["jwt_subjects"] == [{"issuer": "ci", "subject": SUBJECT}]
    assert created.json()["has_key"] is False
    assert client.get(TOKEN_URL, headers=bearer(ci.token(SUBJECT))).status_code == 200

    # a key can still be added; both work
    key = client.post(f"{ADMIN}/callers/ci-runner/key", headers=admin_auth()).json()["caller_key"]
    assert client.get(TOKEN_URL, headers=bearer(key)).status_code == 200
    assert client.get(TOKEN_URL, headers=bearer(ci.token(SUBJECT))).status_code == 200
    assert client.get(f"{ADMIN}/callers/ci-runner", headers=admin_auth()).json()["has_key"] is True


def test_caller_issuers_are_listed_with_their_source(client: TestClient, ci: Signer) -> None:
    put_issuer(client, ci)
    listing = client.get(f"{ADMIN}/caller_issuers", headers=admin_auth()).json()["caller_issuers"]
    assert [(i["name"], i["source"]) for i in listing] == [("ci", "api"), ("cluster", "config")]
    one = client.get(f"{ADMIN}/caller_issuers/ci", headers=admin_auth()).json()
    assert one["issuer"] == ci.issuer
    assert one["audience"] == AUDIENCE
    assert "RS256" in one["algorithms"]
    assert client.get(f"{ADMIN}/caller_issuers/nope", headers=admin_auth()).status_code == 404


def test_a_config_issuer_is_read_only(client: TestClient) -> None:
    for method in ("PUT", "DELETE"):
        response = client.request(
            method,
            f"{ADMIN}/caller_issuers/cluster",
            json={"issuer": "https://x", "audience": "y"},
            headers=admin_auth(),
        )
        assert response.status_code == 409, response.text
        assert response.json()["error"] == "read_only"


def test_an_issuer_is_validated_in_the_config_files_words(client: TestClient, ci: Signer) -> None:
    response = client.put(
        f"{ADMIN}/caller_issuers/ci",
        json={"issuer": ci.issuer, "audience": AUDIENCE, "algorithms": ["HS256"]},
        headers=admin_auth(),
    )
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_request"
    assert response.json()["error_description"].startswith("caller_issuers.ci.algorithms: 'HS256' not allowed")


def test_a_subject_a_config_caller_has_is_refused(client: TestClient) -> None:
    body = {"jwt_subjects": ["system:serviceaccount:billing:api"]}
    response = client.put(f"{ADMIN}/callers/thief", json=body, headers=admin_auth())
    assert response.status_code == 400
    assert "is also callers.cluster-pods's" in response.json()["error_description"]


def test_an_issuer_named_by_a_caller_cannot_be_deleted_until_the_caller_is(client: TestClient, ci: Signer) -> None:
    put_issuer(client, ci)
    body = {"grants": {"payments": [READ]}, "jwt_subjects": [{"issuer": "ci", "subject": SUBJECT}]}
    assert client.put(f"{ADMIN}/callers/ci-runner", json=body, headers=admin_auth()).status_code == 201
    refused = client.delete(f"{ADMIN}/caller_issuers/ci", headers=admin_auth())
    assert refused.status_code == 400
    assert "unknown caller issuer 'ci'" in refused.json()["error_description"]

    # replacing the issuer with another audience: the token verified before is refused at once
    token = ci.token(SUBJECT)
    assert client.get(TOKEN_URL, headers=bearer(token)).status_code == 200
    changed = client.put(
        f"{ADMIN}/caller_issuers/ci", json={"issuer": ci.issuer, "audience": "elsewhere"}, headers=admin_auth()
    )
    assert changed.status_code == 200
    assert_refused(client.get(TOKEN_URL, headers=bearer(token)))

    assert client.delete(f"{ADMIN}/callers/ci-runner", headers=admin_auth()).status_code == 204
    assert client.delete(f"{ADMIN}/caller_issuers/ci", headers=admin_auth()).status_code == 204
    response = client.get(TOKEN_URL, headers=bearer(ci.token(SUBJECT)))
    assert response.json() == REFUSED
