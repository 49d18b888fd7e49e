"""The admin API (spec §3.6): admin keys only, config entries read-only, secrets write-only, a
caller's key shown once, validation in the config loader's words, encrypted storage in Redis."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from starlette.testclient import TestClient
from structlog.testing import capture_logs

from broker.api import create_app
from broker.logs import redact
from broker.settings import Settings
from tests.conftest import ADMIN_KEY, CALLER_KEYS, READ, SECRET_ENV, WRITE, admin_auth, auth
from tests.support import CLIENT_ID, CLIENT_SECRET, AuthServerProcess

ADMIN = "/v1/admin"


def credential_table(authserver: AuthServerProcess, **changes: Any) -> dict[str, Any]:
    return {
        "token_url": authserver.token_url,
        "client_id": CLIENT_ID,
        "client_secret": CLIENT_SECRET,
        "scopes": [READ, WRITE],
        "default_scopes": [READ],
        **changes,
    }


@pytest.fixture
def admin_client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        yield client


def test_admin_routes_take_admin_keys_only(admin_client: TestClient) -> None:
    assert admin_client.get(f"{ADMIN}/credentials", headers=admin_auth()).status_code == 200
    for headers in ({}, auth("billing"), {"Authorization": "Bearer tbk_not-a-key-at-all-0000"}):
        response = admin_client.get(f"{ADMIN}/credentials", headers=headers)
        assert response.status_code == 401, response.text
        assert response.json()["error"] == "invalid_token"
        assert "admin key" in response.json()["error_description"]
    # and an admin key never gets a token
    response = admin_client.get("/v1/tokens/payments", params={"scope": READ}, headers=admin_auth())
    assert response.status_code == 401
    assert response.json()["error"] == "invalid_token"


def test_config_entries_are_listed_read_only_and_secrets_never_shown(admin_client: TestClient) -> None:
    listing = admin_client.get(f"{ADMIN}/credentials", headers=admin_auth()).json()["credentials"]
    payments = next(c for c in listing if c["name"] == "payments")
    assert payments["source"] == "config"
    assert payments["client_secret"]["set"] is True
    assert payments["client_secret"]["from"] == f"env:{SECRET_ENV}"
    assert len(payments["client_secret"]["fingerprint"]) == 16
    assert CLIENT_SECRET not in json.dumps(listing)

    for method, path in [
        ("PUT", f"{ADMIN}/credentials/payments"),
        ("DELETE", f"{ADMIN}/credentials/payments"),
        ("PUT", f"{ADMIN}/callers/billing"),
        ("DELETE", f"{ADMIN}/callers/billing"),
        ("POST", f"{ADMIN}/callers/billing/key"),
    ]:
        response = admin_client.request(method, path, headers=admin_auth(), json={"grants": {}})
        assert response.status_code == 409, (method, path, response.text)
        assert response.json()["error"] == "read_only"
    callers = admin_client.get(f"{ADMIN}/callers", headers=admin_auth()).json()["callers"]
    assert {c["name"]: c["source"] for c in callers} == {"billing": "config", "reporting": "config"}
    text = json.dumps(callers)
    assert "key_sha256" not in text
    assert all(key not in text for key in CALLER_KEYS.values())


def test_a_credential_and_a_caller_made_through_the_api_serve_tokens(
    admin_client: TestClient, authserver: AuthServerProcess, redis_url: str
) -> None:
    created = admin_client.put(f"{ADMIN}/credentials/orders", headers=admin_auth(), json=credential_table(authserver))
    assert created.status_code == 201, created.text
    body = created.json()
    assert body["source"] == "api"
    assert body["client_secret"]["set"] is True
    assert "from" not in body["client_secret"]
    assert CLIENT_SECRET not in created.text

    caller = admin_client.put(f"{ADMIN}/callers/shipping", headers=admin_auth(), json={"grants": {"orders": [READ]}})
    assert caller.status_code == 201, caller.text
    key = caller.json()["caller_key"]
    assert key.startswith("tbk_")
    assert caller.json()["grants"] == {"orders": [READ]}

    token = admin_client.get("/v1/tokens/orders", headers={"Authorization": f"Bearer {key}"})
    assert token.status_code == 200, token.text
    assert authserver.token_requests() == 1
    # the grant is the caller's: WRITE is not in it
    refused = admin_client.get("/v1/tokens/orders", params={"scope": WRITE}, headers={"Authorization": f"Bearer {key}"})
    assert refused.status_code == 403
    assert refused.json()["error"] == "insufficient_scope"

    # replacing the caller keeps its key and is 200 without one
    replaced = admin_client.put(
        f"{ADMIN}/callers/shipping", headers=admin_auth(), json={"grants": {"orders": [READ, WRITE]}}
    )
    assert replaced.status_code == 200
    assert "caller_key" not in replaced.json()
    assert (
        admin_client.get(
            "/v1/tokens/orders", params={"scope": WRITE}, headers={"Authorization": f"Bearer {key}"}
        ).status_code
        == 200
    )

    # stored sealed: neither the secret nor anything readable of the document is in Redis
    with redis.Redis.from_url(redis_url) as direct:
        stored = direct.get("tb:{:vault}:document")
        assert stored is not None
        assert stored.startswith(b"v3|")
        assert CLIENT_SECRET.encode() not in stored
        assert b"shipping" not in stored
        assert b"orders" not in stored


def test_a_new_caller_key_works_at_once_and_the_old_one_stops(admin_client: TestClient) -> None:
    old = admin_client.put(f"{ADMIN}/callers/shipping", headers=admin_auth(), json={"grants": {"payments": [READ]}})
    old_key = old.json()["caller_key"]
    assert admin_client.get("/v1/tokens/payments", headers={"Authorization": f"Bearer {old_key}"}).status_code == 200
    rotated = admin_client.post(f"{ADMIN}/callers/shipping/key", headers=admin_auth())
    assert rotated.status_code == 200
    new_key = rotated.json()["caller_key"]
    assert new_key != old_key
    assert admin_client.get("/v1/tokens/payments", headers={"Authorization": f"Bearer {new_key}"}).status_code == 200
    gone = admin_client.get("/v1/tokens/payments", headers={"Authorization": f"Bearer {old_key}"})
    assert gone.status_code == 401


def test_a_credential_with_client_secrets_shows_each_secret_in_order_never_a_value(
    admin_client: TestClient, authserver: AuthServerProcess
) -> None:
    """Rotation through the admin API (spec §6.5): the list is validated like the config file's,
    shown as fingerprints in the order tried, and the fallback serves tokens."""
    rotated = "a-new-secret-not-yet-accepted"
    table = credential_table(authserver, client_secrets=[rotated, {"env": SECRET_ENV}])
    del table["client_secret"]
    created = admin_client.put(f"{ADMIN}/credentials/orders", headers=admin_auth(), json=table)
    assert created.status_code == 201, created.text
    views = created.json()["client_secrets"]
    assert "client_secret" not in created.json()
    assert [v["set"] for v in views] == [True, True]
    assert "from" not in views[0]
    assert views[1]["from"] == f"env:{SECRET_ENV}"
    assert views[0]["fingerprint"] != views[1]["fingerprint"]
    assert rotated not in created.text
    assert CLIENT_SECRET not in created.text
    shown = admin_client.get(f"{ADMIN}/credentials/orders", headers=admin_auth()).json()
    assert shown["client_secrets"] == views

    caller = admin_client.put(f"{ADMIN}/callers/shipping", headers=admin_auth(), json={"grants": {"orders": [READ]}})
    token = admin_client.get("/v1/tokens/orders", headers={"Authorization": f"Bearer {caller.json()['caller_key']}"})
    assert token.status_code == 200, token.text
    assert authserver.requests_by_secret() == [(rotated, 401), (CLIENT_SECRET, 200)]

    both = admin_client.put(
        f"{ADMIN}/credentials/orders", headers=admin_auth(), json={**table, "client_secret": CLIENT_SECRET}
    )
    assert both.status_code == 400
    assert (
        "credentials.orders: needs exactly one of client_secret or client_secrets" in both.json()["error_description"]
    )
    twice = admin_client.put(
        f"{ADMIN}/credentials/orders", headers=admin_auth(), json={**table, "client_secrets": [rotated, rotated]}
    )
    assert twice.status_code == 400
    assert "credentials.orders.client_secrets[1]: is the same secret as client_secrets[0]" in twice.text


def test_validation_errors_name_the_field_in_the_config_loaders_words(
    admin_client: TestClient, authserver: AuthServerProcess
) -> None:
    cases = [
        ({"client_id": ""}, "credentials.orders.client_id: is required"),
        ({"auth_method": "magic"}, "credentials.orders.auth_method: must be one of client_secret_basic"),
        ({"default_scopes": ["urn:nope"]}, "credentials.orders.default_scopes: scope 'urn:nope' is not in"),
        ({"colour": "blue"}, "credentials.orders.colour: unknown key"),
        ({"client_secret": {"env": "TB_NOT_SET_ANYWHERE"}}, "environment variable TB_NOT_SET_ANYWHERE is not set"),
        ({"token_url": "ftp://x"}, "credentials.orders.token_url: must be an http(s) URL"),
    ]
    for change, words in cases:
        response = admin_client.put(
            f"{ADMIN}/credentials/orders", headers=admin_auth(), json=credential_table(authserver, **change)
        )
        assert response.status_code == 400, (change, response.text)
        assert response.json()["error"] == "invalid_request"
        assert words in response.json()["error_description"], response.text
    bad_grant = admin_client.put(f"{ADMIN}/callers/shipping", headers=admin_auth(), json={"grants": {"nope": [READ]}})
    assert bad_grant.status_code == 400
    assert "callers.shipping.grants.nope: unknown credential 'nope'" in bad_grant.json()["error_description"]
    own_hash = admin_client.put(f"{ADMIN}/callers/shipping", headers=admin_auth(), json={"key_sha256": "0" * 64})
    assert own_hash.status_code == 400
    for body in (b"[]", b"{", b"x" * 20000):
        response = admin_client.put(f"{ADMIN}/credentials/orders", headers=admin_auth(), content=body)
        assert response.status_code == 400, body[:10]
    bad_name = admin_client.put(
        f"{ADMIN}/credentials/pay{{x}}", headers=admin_auth(), json=credential_table(authserver)
    )
    assert bad_name.status_code == 400
    # nothing was created by any of these
    names = [c["name"] for c in admin_client.get(f"{ADMIN}/credentials", headers=admin_auth()).json()["credentials"]]
    assert names == ["ledger", "payments"]


def test_deleting_a_credential_answers_403_and_removes_what_was_cached(
    admin_client: TestClient, authserver: AuthServerProcess, redis_url: str
) -> None:
    admin_client.put(f"{ADMIN}/credentials/orders", headers=admin_auth(), json=credential_table(authserver))
    key = admin_client.put(
        f"{ADMIN}/callers/shipping", headers=admin_auth(), json={"grants": {"orders": [READ]}}
    ).json()["caller_key"]
    caller = {"Authorization": f"Bearer {key}"}
    assert admin_client.get("/v1/tokens/orders", headers=caller).status_code == 200
    with redis.Redis.from_url(redis_url) as direct:
        assert list(direct.scan_iter(match="tb:{orders}:*"))
        assert admin_client.delete(f"{ADMIN}/credentials/orders", headers=admin_auth()).status_code == 204
        assert list(direct.scan_iter(match="tb:{orders}:*")) == []
    # the grant went with it: the answer is the one for no grant at all
    gone = admin_client.get("/v1/tokens/orders", headers=caller)
    assert gone.status_code == 403
    assert gone.json()["error"] == "access_denied"
    assert admin_client.get(f"{ADMIN}/callers/shipping", headers=admin_auth()).json()["grants"] == {}
    assert admin_client.delete(f"{ADMIN}/credentials/orders", headers=admin_auth()).status_code == 404
    assert admin_client.get(f"{ADMIN}/credentials/orders", headers=admin_auth()).status_code == 404


def test_admin_changes_are_audited_without_secrets(admin_client: TestClient, authserver: AuthServerProcess) -> None:
    with capture_logs() as logs:
        admin_client.put(f"{ADMIN}/credentials/orders", headers=admin_auth(), json=credential_table(authserver))
        key = admin_client.put(f"{ADMIN}/callers/shipping", headers=admin_auth(), json={"grants": {}}).json()[
            "caller_key"
        ]
        admin_client.post(f"{ADMIN}/callers/shipping/key", headers=admin_auth())
        admin_client.delete(f"{ADMIN}/callers/shipping", headers=admin_auth())
    changes = [e for e in logs if e["event"] == "audit.admin_change"]
    assert [(e["admin"], e["action"], e["kind"], e["name"]) for e in changes] == [
        ("ops", "create", "credential", "orders"),
        ("ops", "create", "caller", "shipping"),
        ("ops", "new_key", "caller", "shipping"),
        ("ops", "delete", "caller", "shipping"),
    ]
    assert all(e["logger"] == "broker.audit" for e in changes)
    text = json.dumps(logs, default=str)
    for secret in (CLIENT_SECRET, key, ADMIN_KEY):
        assert secret not in text


def test_a_credential_named_vault_or_login_cannot_touch_the_vaults_own_keys(
    admin_client: TestClient, authserver: AuthServerProcess
) -> None:
    """Defect: the vault document's keys were hash-tagged `{vault}`, the tag a credential named
    `vault` has too, so deleting such a credential (SCAN tb:{:vault}:*) deleted every API-managed
    credential and caller with it. The vault's own tags now start with ':', which no name can."""
    shipping = admin_client.put(f"{ADMIN}/callers/shipping", headers=admin_auth(), json={"grants": {}})
    assert shipping.status_code == 201
    for name in ("vault", "login"):
        table = credential_table(authserver)
        assert admin_client.put(f"{ADMIN}/credentials/{name}", headers=admin_auth(), json=table).status_code == 201
        assert admin_client.delete(f"{ADMIN}/credentials/{name}", headers=admin_auth()).status_code == 204
    callers = [c["name"] for c in admin_client.get(f"{ADMIN}/callers", headers=admin_auth()).json()["callers"]]
    assert "shipping" in callers


def test_the_audit_event_of_a_credential_change_keeps_the_secrets_fingerprint(
    admin_client: TestClient, authserver: AuthServerProcess
) -> None:
    """Defect: the log redactor masked every field whose name contains "secret", so the audit
    event's `secret_fp` (an HMAC, the one way to tell which secret a change set) was always
    "[redacted]" in the log."""
    with capture_logs(processors=[redact]) as logs:
        created = admin_client.put(
            f"{ADMIN}/credentials/orders", headers=admin_auth(), json=credential_table(authserver)
        )
    (change,) = [e for e in logs if e["event"] == "audit.admin_change"]
    assert change["secret_fp"] == created.json()["client_secret"]["fingerprint"]
    assert CLIENT_SECRET not in json.dumps(logs, default=str)
