"""Keyless credentials through the admin API (spec §3.6, §6.7): a private key given as a literal
is stored sealed with the vault document and never shown; a certificate is shown by its files
and what it says (subject, expiry); validation reads like the config file's."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from starlette.testclient import TestClient
from structlog.testing import capture_logs

from broker.api import create_app
from broker.settings import Settings
from tests.conftest import READ, admin_auth
from tests.support import AuthServerProcess
from tests.support_keyless import Pki, rsa_key

ADMIN = "/v1/admin"
KEY = rsa_key()


@pytest.fixture
def admin_client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        yield client


def signed_table(authserver: AuthServerProcess, **changes: Any) -> dict[str, Any]:
    return {
        "token_url": authserver.token_url,
        "client_id": "jwt-admin",
        "auth_method": "private_key_jwt",
        "private_key": KEY.private_pem,
        "key_id": "admin-1",
        "scopes": [READ],
        "default_scopes": [READ],
        **changes,
    }


def test_a_literal_private_key_is_sealed_never_shown_and_signs(
    admin_client: TestClient, authserver: AuthServerProcess, redis_url: str
) -> None:
    authserver.register_keyless("jwt-admin", jwks=KEY.jwks(kid="admin-1"))
    with capture_logs() as logs:
        created = admin_client.put(f"{ADMIN}/credentials/signed", headers=admin_auth(), json=signed_table(authserver))
    assert created.status_code == 201, created.text
    view = created.json()
    assert view["auth_method"] == "private_key_jwt"
    assert view["private_key"]["set"] is True
    assert len(view["private_key"]["fingerprint"]) == 16
    assert (view["signing_alg"], view["key_id"]) == ("RS256", "admin-1")
    assert "client_secret" not in view
    [event] = [e for e in logs if e["event"] == "audit.admin_change"]
    assert event["secret_fp"] == view["private_key"]["fingerprint"]
    assert "PRIVATE KEY" not in created.text + json.dumps(logs, default=str)

    caller = admin_client.put(f"{ADMIN}/callers/signer", headers=admin_auth(), json={"grants": {"signed": [READ]}})
    key = caller.json()["caller_key"]
    token = admin_client.get("/v1/tokens/signed", headers={"Authorization": f"Bearer {key}"})
    assert token.status_code == 200, token.text
    [record] = authserver.stats()["requests"]
    assert record["auth"] == "private_key_jwt"

    with redis.Redis.from_url(redis_url) as direct:
        stored = direct.get("tb:{:vault}:document")
    assert stored is not None
    assert b"PRIVATE KEY" not in stored
    assert b"jwt-admin" not in stored  # the whole document is sealed


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"private_key": "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----"}, "private_key: is not a"),
        ({"signing_alg": "ES256"}, "signing_alg: ES256 needs an EC P-256 key"),
        ({"client_secret": "s3cret"}, 'client_secret: is not used with auth_method = "private_key_jwt"'),
    ],
    ids=["malformed", "algorithm", "secret"],
)
def test_a_bad_keyless_credential_is_400_in_the_config_files_words(
    admin_client: TestClient, authserver: AuthServerProcess, changes: dict[str, Any], words: str
) -> None:
    response = admin_client.put(
        f"{ADMIN}/credentials/signed", headers=admin_auth(), json=signed_table(authserver, **changes)
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"] == "invalid_request"
    assert f"credentials.signed.{words}" in response.json()["error_description"]
    assert "AAAA" not in response.text


def test_a_tls_credential_is_shown_by_its_files_and_certificate(admin_client: TestClient, tmp_path: Path) -> None:
    pki = Pki(tmp_path / "pki")
    cert = pki.client_cert("admin-mtls")
    table = {
        "token_url": "https://mtls.auth.example.com/oauth/token",
        "client_id": "admin-mtls",
        "auth_method": "tls_client_auth",
        "tls_client_cert": cert.cert_file,
        "tls_client_key": cert.key_file,
        "tls_ca_file": pki.tls.server_ca_file,
        "scopes": [READ],
    }
    created = admin_client.put(f"{ADMIN}/credentials/mtls", headers=admin_auth(), json=table)
    assert created.status_code == 201, created.text
    view = created.json()
    assert view["tls_client_cert"]["from"] == f"file:{cert.cert_file}"
    assert view["tls_client_cert"]["subject"] == cert.subject
    assert view["tls_client_cert"]["not_after"].endswith("Z")
    assert view["tls_client_key"] == {"from": f"file:{cert.key_file}"}
    assert view["tls_ca_file"] == {"from": f"file:{pki.tls.server_ca_file}"}
    assert cert.key_pem.decode() not in created.text
