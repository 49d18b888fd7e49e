"""Redis Cluster (spec §4.1, §4.3, §4.4, §7.4): a broker with two workers on a 3-master cluster.

- One credential's keys (token, lock, negative cache) share one hash slot: the Lua scripts,
  which each touch one key, run on the node that owns it.
- A cold stampede across both workers costs one upstream request (lock and value on the cluster).
- An invalidation runs on the node owning the credential's slot while the workers listen on
  `tb:events` at another node: the PUBLISH crosses the cluster bus, every worker drops its L1 copy.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

import pytest

from broker.store import Keys
from tests.conftest import READ, WRITE, StartBrokers, auth, config_text
from tests.support import AuthServerProcess, token_keys
from tests.topology.servers import RedisProcess, burst_through_small_pool, pin_every_worker, start_cluster

pytestmark = pytest.mark.slow

TOKENS = "/v1/tokens/payments"
INVALIDATE = "/v1/tokens/payments/invalidate"


def node_for_slot(nodes: list[RedisProcess], slot: int) -> RedisProcess:
    with nodes[0].client() as client:
        for first, last, primary, *_ in client.execute_command("CLUSTER SLOTS"):
            if first <= slot <= last:
                port = int(primary[1])
                return next(node for node in nodes if node.port == port)
    raise AssertionError(f"slot {slot} is not served")


async def test_cluster(
    tmp_path: Path,
    redis_processes: list[RedisProcess],
    authserver: AuthServerProcess,
    start_brokers: StartBrokers,
) -> None:
    started = time.monotonic()
    nodes = start_cluster(redis_processes, masters=3)
    cluster_up = time.monotonic() - started
    seeds = ",".join(f"127.0.0.1:{node.port}" for node in nodes[:2])  # the third is discovered
    config = tmp_path / "broker.toml"
    config.write_text(config_text(f"redis+cluster://{seeds}", authserver), encoding="utf-8")
    await burst_through_small_pool(f"redis+cluster://{seeds}")  # waits for a connection, never "Redis down"
    (broker,) = start_brokers(config, count=1, workers=2)

    # 1. Keys of one credential share a slot.
    read_keys = token_keys(config, "payments", READ)
    events_channel = Keys().events
    with nodes[0].client() as client:
        slots = {
            kind: int(client.execute_command("CLUSTER KEYSLOT", key))
            for kind, key in (
                ("tok", read_keys.token),
                ("lock", read_keys.lock),
                ("fence", read_keys.fence),
                ("neg", read_keys.refusal),
                ("inv", read_keys.invalidated),
                ("tok-other-scope", token_keys(config, "payments", WRITE).token),
            )
        }
        events_slot = int(client.execute_command("CLUSTER KEYSLOT", events_channel))
    assert len(set(slots.values())) == 1, slots
    owner = node_for_slot(nodes, slots["tok"])
    listener = node_for_slot(nodes, events_slot)
    assert owner is not listener, "test set-up: the credential's node should not be the one the workers listen on"

    async with contextlib.AsyncExitStack() as stack:
        pinned = await pin_every_worker(broker, per_worker=40, stack=stack)
        clients = [c for per_worker in pinned.values() for c in per_worker]

        # 2. A stampede of cold requests over both workers: one upstream request.
        authserver.configure(delay=0.5)
        responses = await asyncio.gather(*(c.get(TOKENS, params={"scope": READ}, headers=auth()) for c in clients))
        assert [r.status_code for r in responses] == [200] * len(clients)
        tokens = {r.json()["access_token"] for r in responses}
        assert len(tokens) == 1
        assert authserver.token_requests() == 1
        (old,) = tokens
        authserver.configure(delay=0.0)
        with owner.client() as direct:  # stored on the node that owns the slot, with a TTL
            assert direct.get(read_keys.token) is not None
            assert direct.pttl(read_keys.token) > 0

        # Every worker holds it in L1 now and is subscribed at the listener node.
        with listener.client() as direct:
            subscribers = direct.pubsub_numsub(events_channel)[0][1]
        assert int(subscribers) == 2, f"{subscribers} worker(s) subscribed at the listener node"
        one_per_worker = [per_worker[0] for per_worker in pinned.values()]
        for client in one_per_worker:
            assert (await client.get(TOKENS, params={"scope": READ}, headers=auth())).json()["access_token"] == old

        # 3. Invalidate through one worker: the other drops its L1 copy too.
        report = await one_per_worker[0].post(INVALIDATE, json={"access_token": old, "scope": READ}, headers=auth())
        assert report.status_code == 204
        deadline = time.monotonic() + 1.0
        while True:
            served = [
                (await c.get(TOKENS, params={"scope": READ}, headers=auth())).json()["access_token"]
                for c in one_per_worker
            ]
            if old not in served or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.02)
        assert old not in served, "a worker still serves the invalidated token"
        assert len(set(served)) == 1
        assert authserver.token_requests() == 2

    print(
        f"\ncluster: 3 masters up in {cluster_up:.1f} s; stampede of {len(clients)} requests over 2 workers"
        f" -> 1 upstream request; slot {slots['tok']} on :{owner.port}, workers listening on :{listener.port}"
    )
