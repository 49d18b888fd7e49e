"""What the broker sends to the authorization server (spec §1, §4.6): RFC 6749 §4.4 client
credentials with the configured client authentication, the canonical scope set, and OIDC
discovery fetched once."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from starlette.testclient import TestClient

from tests.api.helpers import broker_client, ops_auth, ops_config
from tests.conftest import ADMIN, READ, WRITE, auth, token_body
from tests.support import CLIENT_ID, AuthServerProcess


def _claims(token: str) -> dict[str, Any]:
    payload = token.split(".")[1]
    claims: dict[str, Any] = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    return claims


def test_client_secret_basic_with_token_url(client: TestClient, authserver: AuthServerProcess) -> None:
    token_body(client.get("/v1/tokens/payments", params={"scope": f"{WRITE}  {READ} {WRITE}"}, headers=auth()))
    stats = authserver.stats()
    assert stats["token_requests"] == 1
    assert stats["discovery_requests"] == 0  # token_url given: no discovery
    [request] = stats["requests"]
    assert request["auth"] == "basic"
    assert request["client_id"] == CLIENT_ID
    # Only the grant and the canonical scope set in the form: the client is authenticated by Basic.
    assert request["form"] == {"grant_type": "client_credentials", "scope": f"{READ} {WRITE}"}


def test_client_secret_post_with_discovery(client: TestClient, authserver: AuthServerProcess) -> None:
    old = token_body(client.get("/v1/tokens/ledger", headers=auth()))["access_token"]
    client.post("/v1/tokens/ledger/invalidate", json={"access_token": old}, headers=auth())
    assert token_body(client.get("/v1/tokens/ledger", headers=auth()))["access_token"] != old
    stats = authserver.stats()
    assert stats["token_requests"] == 2
    assert stats["discovery_requests"] == 1
    for request in stats["requests"]:
        assert request["auth"] == "post"
        assert request["client_id"] == CLIENT_ID
        assert request["form"] == {"grant_type": "client_credentials", "scope": READ, "client_id": CLIENT_ID}


def test_discovery_is_fetched_once_across_scope_sets(
    write_config: Callable[..., Path], authserver: AuthServerProcess
) -> None:
    scope_sets = [READ, WRITE, f"{READ} {WRITE}", f"{ADMIN} {READ} {WRITE}"]
    with broker_client(write_config, ops_config(authserver)) as client:
        for scope in scope_sets:
            body = token_body(client.get("/v1/tokens/journal", params={"scope": scope}, headers=ops_auth()))
            assert _claims(body["access_token"])["aud"] == "https://api.test"
    stats = authserver.stats()
    assert stats["token_requests"] == len(scope_sets)
    assert stats["discovery_requests"] == 1
    assert [r["scope"] for r in stats["requests"]] == scope_sets
    for request, scope in zip(stats["requests"], scope_sets, strict=True):
        assert request["auth"] == "post"
        assert request["form"] == {
            "grant_type": "client_credentials",
            "scope": scope,
            "client_id": CLIENT_ID,
            "audience": "https://api.test",
            "tenant": "t-1",
        }
