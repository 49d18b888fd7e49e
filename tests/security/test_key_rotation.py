"""Rotating the encryption key under load (spec §6.1, README "Rotating the key"), with two broker
processes on one Redis: add the new key second and restart one instance at a time; move it first
and restart one at a time; run `rotate-key`; drop the old key and restart one at a time. No
request fails at any step, every stored value ends up sealed under the new key, the admin API's
entries (made before and during the rotation) still serve, and the rotation costs no upstream
fetch: every broker can read what every other one writes.

A restart is what a rolling deploy does: the instance leaves the load balancer (no new requests,
the ones under way finish), stops, starts with the new keys, and takes requests again once ready.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from broker.store import Keys
from broker.vault.keyring import new_key
from tests.conftest import CALLER_KEYS, READ, WRITE, StartBrokers, admin_auth
from tests.leakwatch import add_secret
from tests.security.secrets_in import redis_contents
from tests.support import CLIENT_ID, CLIENT_SECRET, REPO_ROOT, AuthServerProcess, BrokerProcess

pytestmark = pytest.mark.slow

KEYS = Keys()  # the default prefix, as the test configs have it

K1 = f"k1:{new_key()}"
K2 = f"k2:{new_key()}"
add_secret("encryption key", K1.partition(":")[2], K2.partition(":")[2])
LOOPS = 4


@dataclass
class Target:
    """One broker behind the test's load balancer."""

    broker: BrokerProcess
    up: bool = True
    in_flight: int = 0
    client: httpx.AsyncClient = field(init=False)

    def __post_init__(self) -> None:
        self.connect()

    def connect(self) -> None:
        self.client = httpx.AsyncClient(base_url=self.broker.url, timeout=10, trust_env=False)


@dataclass
class Load:
    targets: list[Target]
    requests: list[tuple[str, dict[str, str], dict[str, str]]]  # (credential, params, headers)
    served: int = 0
    failures: list[str] = field(default_factory=list)
    _turn: int = 0

    def pick(self) -> Target:
        ups = [target for target in self.targets if target.up]
        self._turn += 1
        return ups[self._turn % len(ups)]

    async def loop(self, offset: int, stop: asyncio.Event) -> None:
        n = offset
        while not stop.is_set():
            target = self.pick()
            credential, params, headers = self.requests[n % len(self.requests)]
            n += 1
            target.in_flight += 1
            try:
                response = await target.client.get(f"/v1/tokens/{credential}", params=params, headers=headers)
            except httpx.HTTPError as exc:
                self.failures.append(f"{target.broker.port} {credential} {params}: {exc!r}")
                continue
            finally:
                target.in_flight -= 1
            if response.status_code != 200:
                self.failures.append(
                    f"{target.broker.port} {credential} {params}: {response.status_code} {response.text}"
                )
            else:
                self.served += 1

    async def restart(self, target: Target, keys: str) -> None:
        """Out of the balancer, drained, restarted with `keys`, back in once ready."""
        target.up = False
        while target.in_flight:
            await asyncio.sleep(0.01)
        await target.client.aclose()
        target.broker.env = {**target.broker.env, "BROKER_ENCRYPTION_KEYS": keys}
        await asyncio.to_thread(target.broker.stop)
        await asyncio.to_thread(target.broker.start)
        target.connect()
        target.up = True
        await asyncio.sleep(0.5)  # it takes its share of the load before the next one goes


def rotate_key(config: Path, keys: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "broker", "rotate-key", "--config", str(config)],
        cwd=REPO_ROOT,
        env={**os.environ, "BROKER_ENCRYPTION_KEYS": keys},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


async def test_rotating_the_key_under_load_fails_no_request_and_costs_no_fetch(
    write_config: Callable[..., Path],
    authserver: AuthServerProcess,
    start_brokers: StartBrokers,
    redis_url: str,
) -> None:
    config = write_config()
    brokers = start_brokers(config, count=2, workers=1, env={"BROKER_ENCRYPTION_KEYS": K1})
    targets = [Target(broker) for broker in brokers]
    billing = {"Authorization": f"Bearer {CALLER_KEYS['billing']}"}
    reporting = {"Authorization": f"Bearer {CALLER_KEYS['reporting']}"}
    requests = [
        ("payments", {"scope": READ}, billing),
        ("payments", {"scope": WRITE}, billing),
        ("payments", {"scope": f"{READ} {WRITE}"}, billing),
        ("ledger", {}, billing),
        ("ledger", {}, reporting),
    ]
    table = {
        "token_url": authserver.token_url,
        "client_id": CLIENT_ID,
        "client_secret": CLIENT_SECRET,  # a literal: sealed in the vault document
        "scopes": [READ],
        "default_scopes": [READ],
    }

    async def add_credential(name: str, via: httpx.AsyncClient) -> None:
        """A credential and a caller through the admin API, then in the load."""
        created = await via.put(f"/v1/admin/credentials/{name}", json=table, headers=admin_auth())
        assert created.status_code == 201, created.text
        caller = await via.put(
            f"/v1/admin/callers/{name}-caller", json={"grants": {name: [READ]}}, headers=admin_auth()
        )
        assert caller.status_code == 201, caller.text
        headers = {"Authorization": f"Bearer {caller.json()['caller_key']}"}
        for target in targets:  # every broker applied it (within a second) before the load uses it
            for _ in range(100):
                if (await target.client.get(f"/v1/tokens/{name}", headers=headers)).status_code == 200:
                    break
                await asyncio.sleep(0.02)
        requests.append((name, {}, headers))

    async def replaced_after_invalidation(via: Target, credential: str, headers: dict[str, str]) -> None:
        """Report the stored token through `via`: dropped (its fingerprint, made under whichever key
        the writer held first, is recognised), refreshed once, and the new one served by both."""
        reported = (await via.client.get(f"/v1/tokens/{credential}", headers=headers)).json()["access_token"]
        body = {"access_token": reported, "scope": READ}
        response = await via.client.post(f"/v1/tokens/{credential}/invalidate", json=body, headers=headers)
        assert response.status_code == 204, response.text
        for target in targets:
            for _ in range(150):
                response = await target.client.get(f"/v1/tokens/{credential}", headers=headers)
                if response.json()["access_token"] != reported:
                    break
                await asyncio.sleep(0.02)
            else:
                raise AssertionError(f"{credential}: the reported token was not dropped")

    await add_credential("orders", targets[0].client)
    load = Load(targets, requests)
    for n in range(len(requests) * 2):  # warm: one fetch per (credential, scope set)
        credential, params, headers = requests[n % len(requests)]
        response = await targets[n % 2].client.get(f"/v1/tokens/{credential}", params=params, headers=headers)
        assert response.status_code == 200, response.text
    fetches_before = authserver.token_requests()
    expected_fetches = 0
    stop = asyncio.Event()
    loops = [asyncio.create_task(load.loop(n, stop)) for n in range(LOOPS)]
    steps: dict[str, float] = {}
    started = time.monotonic()
    try:
        await asyncio.sleep(1)
        # 1. the new key second: k2 decrypts everywhere before anyone encrypts with it
        for target in targets:
            await load.restart(target, f"{K1},{K2}")
        steps["k2 second"] = time.monotonic() - started
        # 2. the new key first: for a while one broker seals under k2 and the other under k1
        await load.restart(targets[0], f"{K2},{K1}")
        await add_credential("parcels", targets[0].client)  # sealed under k2, read by a k1-first broker
        expected_fetches += 1
        # invalidation across the two: a k1 fingerprint reported to the k2-first broker, and back
        await replaced_after_invalidation(targets[0], "ledger", reporting)
        await replaced_after_invalidation(targets[1], "parcels", requests[-1][2])
        expected_fetches += 2
        await load.restart(targets[1], f"{K2},{K1}")
        steps["k2 first"] = time.monotonic() - started
        # 3. re-seal what is stored, under load
        under_k1 = sum(
            re.match(rb"v3\|(\d+\|[0-9a-f]+\|\d+\|\d+\|)?k1\.", blob.split(b"\n", 1)[1]) is not None
            for blob in redis_contents(redis_url).values()
        )
        output = await asyncio.to_thread(rotate_key, config, f"{K2},{K1}")
        match = re.search(r"rotate-key: (\d+) of (\d+) stored value\(s\) re-sealed under key 'k2'", output)
        assert match is not None, output
        steps["rotate-key"] = time.monotonic() - started
        await asyncio.sleep(1)
        # 4. the old key dropped
        for target in targets:
            await load.restart(target, K2)
        steps["k1 dropped"] = time.monotonic() - started
        await add_credential("crates", targets[1].client)
        expected_fetches += 1
        await asyncio.sleep(1)
    finally:
        stop.set()
        await asyncio.gather(*loops)
        for target in targets:
            await target.client.aclose()

    extra_fetches = authserver.token_requests() - fetches_before - expected_fetches
    print(
        f"\nkey rotation under load: {load.served} requests served, {len(load.failures)} failed,"
        f" rotate-key re-sealed {match.group(1)} of {match.group(2)} values,"
        f" {extra_fetches} extra upstream fetch(es); steps done at { ({k: round(v, 1) for k, v in steps.items()}) } s"
    )
    assert load.failures == []
    assert load.served > 100
    assert int(match.group(1)) == under_k1 >= 4, output  # the tokens fetched before k2 came first
    assert extra_fetches == 0

    # Everything stored is sealed under k2 now, and nothing of k1 is left to read.
    stored = redis_contents(redis_url)
    sealed = {name: blob.split(b"\n", 1)[1] for name, blob in stored.items()}
    for name, value in sealed.items():
        if ":tok:" in name:
            assert value.endswith(b"|-|0|0|") or re.match(rb"v3\|\d+\|[0-9a-f]{16}\|\d+\|\d+\|k2\.", value), (
                name,
                value[:60],
            )
        elif ":neg:" in name:
            assert re.match(rb"v3\|\d+\|k2\.", value), (name, value[:60])
        elif name == KEYS.vault_document:
            assert value.startswith(b"v3|k2."), (name, value[:60])
    assert KEYS.vault_document in sealed
    for broker in brokers:
        log = broker.output()
        assert "vault.undecryptable_value" not in log
        assert "vault.document_unreadable" not in log
        assert not [line for line in log.splitlines() if '"status": 500' in line]
