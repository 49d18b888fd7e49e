"""A rolling deploy from the last release to this version: an old and a new broker on one Redis
(issue 11, item 3).

Since the hardening release, every Redis key of a token carries a fingerprint of the credential's
token-shaping fields, so the old `v1|…` entries are unreachable by design (reading them would
bring that defect back) and the two generations never share an entry. What a rolling deploy must
keep: both serve without a single error while they run side by side, the old one from its own
cache, the new one after exactly one upstream fetch per (credential, scope set); and the old
code, which cannot change any more, must not break on what the new one publishes (invalidations,
vault changes) — if it did, the fix would belong on the new side.

The release is the tree at RELEASED (`git archive`), run with this venv and its own directory
first on the path. The commit is in every clone with history; a clone without it fails here.
"""

from __future__ import annotations

import asyncio
import io
import subprocess
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import redis

from tests.conftest import CALLER_KEYS, READ, WRITE, StartBrokers, admin_auth
from tests.support import CLIENT_ID, CLIENT_SECRET, REPO_ROOT, AuthServerProcess, BrokerProcess

pytestmark = pytest.mark.slow

RELEASED = "abfc80f"  # the last released code: before the hardening and the vault
LOAD_SECONDS = 4.0
BILLING = {"Authorization": f"Bearer {CALLER_KEYS['billing']}"}
KEYS = [("payments", READ), ("payments", WRITE), ("payments", f"{READ} {WRITE}"), ("ledger", READ)]


@pytest.fixture(scope="module")
def released_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    found = subprocess.run(
        ["git", "-C", str(REPO_ROOT), "cat-file", "-e", f"{RELEASED}^{{commit}}"], capture_output=True, check=False
    )
    if found.returncode != 0:
        pytest.fail(
            f"commit {RELEASED} (the last release) is not in this clone: fetch the history (git fetch --unshallow)"
        )
    archive = subprocess.run(["git", "-C", str(REPO_ROOT), "archive", RELEASED], capture_output=True, check=True)
    tree = tmp_path_factory.mktemp("released")
    with tarfile.open(fileobj=io.BytesIO(archive.stdout), mode="r:") as tar:
        tar.extractall(tree, filter="data")
    return tree


@dataclass
class Pod:
    name: str
    broker: BrokerProcess
    tokens: dict[tuple[str, str], list[str]] = field(default_factory=dict)  # in the order served
    failures: list[str] = field(default_factory=list)

    async def get(self, client: httpx.AsyncClient, credential: str, scope: str) -> str | None:
        response = await client.get(f"/v1/tokens/{credential}", params={"scope": scope}, headers=BILLING)
        if response.status_code != 200:
            self.failures.append(f"{self.name} GET {credential} {scope}: {response.status_code} {response.text}")
            return None
        token: str = response.json()["access_token"]
        seen = self.tokens.setdefault((credential, scope), [])
        if not seen or seen[-1] != token:
            seen.append(token)
        return token

    async def load(self, until: float) -> None:
        async with httpx.AsyncClient(base_url=self.broker.url, timeout=10, trust_env=False) as client:
            n = 0
            while asyncio.get_running_loop().time() < until:
                credential, scope = KEYS[n % len(KEYS)]
                n += 1
                await self.get(client, credential, scope)

    async def invalidate(self, credential: str, scope: str) -> None:
        async with httpx.AsyncClient(base_url=self.broker.url, timeout=10, trust_env=False) as client:
            reported = await self.get(client, credential, scope)
            body = {"access_token": reported, "scope": scope}
            response = await client.post(f"/v1/tokens/{credential}/invalidate", json=body, headers=BILLING)
            if response.status_code != 204:
                self.failures.append(f"{self.name} invalidate: {response.status_code} {response.text}")
            for _ in range(100):  # dropped, and refreshed once
                if await self.get(client, credential, scope) != reported:
                    return
                await asyncio.sleep(0.02)
            self.failures.append(f"{self.name}: the reported {credential} token was not dropped")


async def admin_changes(pod: Pod, authserver: AuthServerProcess) -> None:
    """A credential and a caller made, used, changed and removed through the new broker: every
    step publishes a vault event that the old broker receives too."""
    table = {
        "token_url": authserver.token_url,
        "client_id": CLIENT_ID,
        "client_secret": CLIENT_SECRET,
        "scopes": [READ, WRITE],
        "default_scopes": [READ],
    }
    async with httpx.AsyncClient(base_url=pod.broker.url, timeout=10, trust_env=False) as client:

        async def call(method: str, path: str, body: object = None) -> httpx.Response:
            response = await client.request(method, f"/v1/admin/{path}", json=body, headers=admin_auth())
            if response.status_code >= 300:
                pod.failures.append(f"admin {method} {path}: {response.status_code} {response.text}")
            await asyncio.sleep(0.3)
            return response

        await call("PUT", "credentials/orders", table)
        key = (await call("PUT", "callers/shipping", {"grants": {"orders": [READ]}})).json()["caller_key"]
        response = await client.get("/v1/tokens/orders", headers={"Authorization": f"Bearer {key}"})
        if response.status_code != 200:
            pod.failures.append(f"orders token: {response.status_code} {response.text}")
        await call("PUT", "callers/shipping", {"grants": {"orders": [READ, WRITE]}})
        await call("POST", "callers/shipping/key")
        await call("PUT", "credentials/orders", {**table, "default_scopes": [WRITE]})
        await call("DELETE", "callers/shipping")
        await call("DELETE", "credentials/orders")


async def test_an_old_and_a_new_broker_on_one_redis_both_serve_and_never_share_an_entry(
    released_tree: Path,
    write_config: Callable[..., Path],
    authserver: AuthServerProcess,
    start_brokers: StartBrokers,
    redis_url: str,
) -> None:
    config = write_config()
    # the release knows no [admins] table (nor the vault): the same config without it
    old_config = config.with_name("released.toml")
    old_config.write_text(config.read_text().split("[admins.ops]")[0])
    old = Pod("old", BrokerProcess(old_config, env={"PYTHONPATH": str(released_tree)}, cwd=released_tree))
    old.broker.start()
    try:
        async with httpx.AsyncClient(base_url=old.broker.url, timeout=10, trust_env=False) as client:
            # it is the release indeed: no admin API
            assert (await client.get("/v1/admin/credentials", headers=admin_auth())).status_code in (401, 404)
            for credential, scope in KEYS:
                assert await old.get(client, credential, scope) is not None
        assert authserver.token_requests() == len(KEYS)

        (new_broker,) = start_brokers(config, count=1, workers=2)
        new = Pod("new", new_broker)
        until = asyncio.get_running_loop().time() + LOAD_SECONDS
        await asyncio.gather(
            old.load(until),
            new.load(until),
            admin_changes(new, authserver),
            new.invalidate("payments", READ),  # its drop event reaches the old broker
            old.invalidate("ledger", READ),  # and the old broker's reaches the new one
        )
        await asyncio.sleep(0.5)  # the old broker's last events
        old.broker.stop()
        old_log = old.broker.output()
    finally:
        old.broker.stop()
        old.broker.discard_log()

    assert old.failures == []
    assert new.failures == []
    # the old broker served its own tokens throughout: one per key, a second after its invalidation
    assert {key: len(tokens) for key, tokens in old.tokens.items()} == {
        key: 2 if key == ("ledger", READ) else 1 for key in KEYS
    }
    assert {key: len(tokens) for key, tokens in new.tokens.items()} == {
        key: 2 if key == ("payments", READ) else 1 for key in KEYS
    }
    shared = {t for tokens in old.tokens.values() for t in tokens} & {
        t for tokens in new.tokens.values() for t in tokens
    }
    assert not shared, "an old and a new broker served the same token"
    # upstream: the old generation's fetches, one per key for the new one, one per invalidation,
    # and one for the credential made through the admin API
    assert authserver.token_requests() == len(KEYS) + len(KEYS) + 2 + 1
    # side by side in Redis: the release's plaintext v1 entries and this version's sealed ones
    with redis.Redis.from_url(redis_url) as direct:
        values = [direct.get(name) or b"" for name in direct.scan_iter(match="tb:{*}:tok:*")]
    generations = sorted(value.split(b"|", 1)[0].decode() for value in values)
    assert generations == ["v1"] * len(KEYS) + ["v3"] * len(KEYS), generations
    for sign in ("Traceback", '"level": "error"', "request.unhandled", "Exception in ASGI application"):
        assert sign not in old_log, f"the old broker logged {sign!r}:\n{old_log[-3000:]}"
        assert sign not in new.broker.output(), f"the new broker logged {sign!r}"
