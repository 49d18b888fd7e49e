"""Encryption at rest (spec §6.1), seen from Redis: after brokers handed out tokens for several
credentials and scope sets, remembered refusals, invalidated a token and took credentials and
callers through the admin API, no key and no value of the database, and no event published on
the channel, holds an access token, a client secret, a caller or admin key, a key hash or the
encryption key, in clear or base64-encoded, nor a bare (unkeyed) hash of a token."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from broker.callers import hash_key, new_caller_key
from broker.store import Keys
from tests.conftest import ADMIN, ADMIN_KEY, CALLER_KEYS, READ, WRITE, StartBrokers, admin_auth
from tests.leakwatch import add_secret
from tests.security.secrets_in import bare_fingerprint, find_secrets, redis_contents
from tests.support import CLIENT_ID, CLIENT_SECRET, WEIRD_CLIENT_ID, WEIRD_CLIENT_SECRET, AuthServerProcess

pytestmark = pytest.mark.slow

KEYS = Keys()  # the default prefix, as the test configs have it

AUDITOR_KEY = new_caller_key()
add_secret("caller key", AUDITOR_KEY)
WEIRD_ENV = "TB_TEST_WEIRD_SECRET"


def extra_config(authserver: AuthServerProcess) -> str:
    return f"""
[credentials.weird]
token_url = "{authserver.token_url}"
client_id = {json.dumps(WEIRD_CLIENT_ID)}
client_secret = {{ env = "{WEIRD_ENV}" }}
scopes = ["{READ}", "{WRITE}"]

[callers.auditor]
key_sha256 = "{hash_key(AUDITOR_KEY)}"
[callers.auditor.grants]
payments = ["{READ}", "{WRITE}", "{ADMIN}"]
ledger = ["{READ}"]
weird = ["{READ}", "{WRITE}"]
"""


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


class Run:
    """What the brokers handed out, for the search afterwards."""

    def __init__(self) -> None:
        self.tokens: list[str] = []
        self.caller_keys: list[str] = [*CALLER_KEYS.values(), AUDITOR_KEY]

    async def token(self, client: httpx.AsyncClient, credential: str, key: str, scope: str | None = None) -> str:
        params = {"scope": scope} if scope else {}
        response = await client.get(f"/v1/tokens/{credential}", params=params, headers=bearer(key))
        assert response.status_code == 200, response.text
        token: str = response.json()["access_token"]
        self.tokens.append(token)
        return token

    async def refused(self, client: httpx.AsyncClient, credential: str, key: str, scope: str | None = None) -> None:
        params = {"scope": scope} if scope else {}
        response = await client.get(f"/v1/tokens/{credential}", params=params, headers=bearer(key))
        assert response.status_code == 502, response.text
        assert response.json()["error"] == "upstream_rejected"


async def listen(url: str, seen: list[bytes], ready: asyncio.Event) -> None:
    client = aioredis.Redis.from_url(url)
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    try:
        await pubsub.subscribe(KEYS.events)
        ready.set()
        while True:
            message = await pubsub.get_message(timeout=0.2)
            if message is not None and isinstance(message.get("data"), bytes):
                seen.append(message["data"])
    finally:
        await pubsub.aclose()
        await client.aclose()


async def test_nothing_secret_is_in_redis_or_on_the_events_channel_in_clear(
    write_config: Callable[..., Path],
    authserver: AuthServerProcess,
    start_brokers: StartBrokers,
    redis_url: str,
) -> None:
    a, b = start_brokers(
        write_config(extra_config(authserver)), count=2, workers=1, env={WEIRD_ENV: WEIRD_CLIENT_SECRET}
    )
    run = Run()
    api_secret = f"api-only-{secrets.token_hex(12)}"  # the authorization server does not know it
    add_secret("client secret", api_secret)
    events: list[bytes] = []
    ready = asyncio.Event()
    listener = asyncio.create_task(listen(redis_url, events, ready))
    await asyncio.wait_for(ready.wait(), 5)
    billing, reporting = CALLER_KEYS["billing"], CALLER_KEYS["reporting"]
    async with (
        httpx.AsyncClient(base_url=a.url, timeout=10, trust_env=False) as on_a,
        httpx.AsyncClient(base_url=b.url, timeout=10, trust_env=False) as on_b,
    ):
        for client in (on_a, on_b):
            for scope in (READ, WRITE, f"{READ} {WRITE}"):
                await run.token(client, "payments", billing, scope)
            await run.token(client, "ledger", billing)
            await run.token(client, "ledger", reporting)
            await run.token(client, "payments", AUDITOR_KEY, ADMIN)
            await run.token(client, "payments", AUDITOR_KEY, f"{READ} {WRITE} {ADMIN}")
            await run.token(client, "weird", AUDITOR_KEY, READ)
            await run.token(client, "weird", AUDITOR_KEY, f"{READ} {WRITE}")

        # a refusal, remembered in Redis for every broker
        authserver.configure(fault="invalid_scope", fault_count=1)
        await run.refused(on_a, "payments", AUDITOR_KEY, f"{WRITE} {ADMIN}")
        await run.refused(on_b, "payments", AUDITOR_KEY, f"{WRITE} {ADMIN}")

        # an invalidation leaves a tombstone; the refresh stores the next token
        reported = await run.token(on_a, "payments", billing, READ)
        response = await on_a.post(
            "/v1/tokens/payments/invalidate", json={"access_token": reported, "scope": READ}, headers=bearer(billing)
        )
        assert response.status_code == 204
        for _ in range(100):
            if await run.token(on_b, "payments", billing, READ) != reported:
                break
            await asyncio.sleep(0.05)

        # credentials with literal secrets and a caller, through the admin API; its key rotated
        tables: dict[str, dict[str, Any]] = {
            "orders": {"client_id": CLIENT_ID, "client_secret": CLIENT_SECRET},
            "weirdorders": {"client_id": WEIRD_CLIENT_ID, "client_secret": WEIRD_CLIENT_SECRET},
            "broken": {"client_id": CLIENT_ID, "client_secret": api_secret},
        }
        for name, table in tables.items():
            body = {**table, "token_url": authserver.token_url, "scopes": [READ], "default_scopes": [READ]}
            created = await on_a.put(f"/v1/admin/credentials/{name}", json=body, headers=admin_auth())
            assert created.status_code == 201, created.text
        grants = {"grants": {name: [READ] for name in tables}}
        caller = await on_a.put("/v1/admin/callers/shipping", json=grants, headers=admin_auth())
        assert caller.status_code == 201, caller.text
        first_key = caller.json()["caller_key"]
        rotated = await on_a.post("/v1/admin/callers/shipping/key", headers=admin_auth())
        assert rotated.status_code == 200, rotated.text
        second_key = rotated.json()["caller_key"]
        run.caller_keys += [first_key, second_key]
        for client in (on_a, on_b):
            for _ in range(100):  # b applies the change within a second
                if (await client.get("/v1/tokens/orders", headers=bearer(second_key))).status_code == 200:
                    break
                await asyncio.sleep(0.05)
            await run.token(client, "orders", second_key)
            await run.token(client, "weirdorders", second_key)
            await run.refused(client, "broken", second_key)  # invalid_client: the secret is wrong
    await asyncio.sleep(0.3)  # the last events arrive
    listener.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await listener

    stored = redis_contents(redis_url)
    # the run left what it should have: sealed tokens, refusals, a tombstone and the vault document
    names = list(stored)
    assert sum(":tok:" in name for name in names) >= 10, names
    assert sum(":neg:" in name for name in names) >= 2, names
    assert KEYS.vault_document in stored
    for name, blob in stored.items():
        value = blob.split(b"\n", 1)[1]
        if ":tok:" in name:
            assert value.startswith(b"v3|") or value.endswith(b"|-|0|0|"), (name, value[:40])
        elif ":neg:" in name or name == KEYS.vault_document:
            assert value.startswith(b"v3|"), (name, value[:40])
    assert len(set(run.tokens)) >= 11

    encryption_keys = [item.split(":", 1)[1] for item in os.environ["BROKER_ENCRYPTION_KEYS"].split(",")]
    all_keys = [*run.caller_keys, ADMIN_KEY]
    known: dict[str, list[str | bytes]] = {
        "access token": list(set(run.tokens)),
        "client secret": [CLIENT_SECRET, WEIRD_CLIENT_SECRET, api_secret],
        "caller key": list(run.caller_keys),
        "admin key": [ADMIN_KEY],
        "caller key hash": [hash_key(key) for key in all_keys],
        "encryption key": [*encryption_keys, *(base64.b64decode(key) for key in encryption_keys)],
        "unkeyed fingerprint": [bare_fingerprint(v) for v in [*run.tokens, CLIENT_SECRET, api_secret]],
    }
    blobs = {f"Redis key {name}": blob for name, blob in stored.items()}
    blobs.update({f"event {event[:60]!r}": event for event in events})
    assert events, "no event was seen: the channel was not watched"
    assert find_secrets(blobs, known) == []


@pytest.mark.parametrize("prefix", [b"", b"x", b"xy", b"test-client:"])
def test_the_search_finds_a_secret_inside_any_base64_text(prefix: bytes) -> None:
    """The search above is only as good as its forms: a secret base64-encoded at any offset, in
    either alphabet, is found; random base64 of the same length is not."""
    planted = {
        "standard": base64.b64encode(prefix + CLIENT_SECRET.encode() + b"tail"),
        "url-safe": base64.urlsafe_b64encode(prefix + b"\xfb\xff" + CLIENT_SECRET.encode()),
        "clear": b"v2|" + prefix + CLIENT_SECRET.encode(),
    }
    found = find_secrets(planted, {"client secret": [CLIENT_SECRET]})
    assert len(found) == 3, found
    assert (
        find_secrets({"noise": base64.b64encode(secrets.token_bytes(4096))}, {"client secret": [CLIENT_SECRET]}) == []
    )
