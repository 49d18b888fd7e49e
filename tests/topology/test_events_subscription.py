"""The events subscription on every topology the broker connects to (spec §4.3, §7.4).

An EventSubscriber on the client `broker.redis_client.connect` builds for a standalone server, a
Sentinel-managed master and a Cluster, each real and started here:

- an idle subscription stays live past the heartbeat bound: the PINGs are answered on it;
- every connection it holds has TCP keepalive at KEEPALIVE_IDLE (read from /proc/net/tcp);
- after the server closes it (CLIENT KILL), the subscriber reports a new
  subscription (its owner starts L1 afresh) and events reach it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from broker import redis_client
from broker.events import HEARTBEAT_TIMEOUT, Event, EventSubscriber
from broker.redis_client import KEEPALIVE_IDLE
from broker.store import Keys
from tests.fault.conftest import until
from tests.topology.servers import RedisProcess, servers, start_cluster, start_sentinel_group

pytestmark = pytest.mark.slow

EVENTS_CHANNEL = Keys().events

_USER_HZ = 100  # /proc/net/tcp gives timers in clock ticks


@dataclass
class Topology:
    url: str
    data_nodes: list[RedisProcess]  # where a subscription can live
    other_ports: tuple[int, ...] = ()  # sentinels


@pytest.fixture(params=["standalone", "sentinel", "cluster"])
def topology(request: pytest.FixtureRequest) -> Iterator[Topology]:
    with servers() as started:
        if request.param == "standalone":
            server = RedisProcess([])
            started.append(server)
            server.start()
            yield Topology(f"redis://127.0.0.1:{server.port}/0", [server])
        elif request.param == "sentinel":
            master, replica, sentinel = start_sentinel_group(started)
            yield Topology(f"redis+sentinel://127.0.0.1:{sentinel.port}/mymaster", [master, replica], (sentinel.port,))
        else:
            nodes = start_cluster(started, masters=3)
            yield Topology("redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in nodes), nodes)


def _my_sockets() -> set[str]:
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
    return inodes


def keepalive_timers(ports: set[int], inodes: set[str]) -> list[tuple[int, float]]:
    """(remote port, seconds until the keepalive timer fires) of the established TCP sockets in
    `inodes` connected to `ports`; -1 for a socket with no keepalive timer armed."""
    timers = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table, encoding="ascii") as rows:
            for row in list(rows)[1:]:
                fields = row.split()
                remote_port = int(fields[2].rsplit(":", 1)[1], 16)
                if fields[3] != "01" or remote_port not in ports or fields[9] not in inodes:
                    continue
                timer, when = fields[5].split(":")
                timers.append((remote_port, int(when, 16) / _USER_HZ if int(timer, 16) == 2 else -1.0))
    return timers


async def test_the_subscription_stays_live_keeps_alive_and_resubscribes_after_a_kill(topology: Topology) -> None:
    before = _my_sockets()
    client = redis_client.connect(topology.url)
    events: list[Event] = []
    states: list[bool] = []
    subscriber = EventSubscriber(client, EVENTS_CHANNEL, events.append, states.append)
    subscriber.start()
    try:
        assert await subscriber.wait_live(10)
        await asyncio.sleep(HEARTBEAT_TIMEOUT + 1.5)  # nothing published meanwhile
        assert states == [True], "an idle subscription is answered by its heartbeat and stays live"

        ports = {node.port for node in topology.data_nodes} | set(topology.other_ports)
        timers = keepalive_timers(ports, _my_sockets() - before)
        assert timers, "the client's connections were found"
        assert all(0 < seconds <= KEEPALIVE_IDLE for _, seconds in timers), timers

        killed = 0
        for node in topology.data_nodes:
            with node.client() as direct:
                for pubsub in direct.client_list(_type="pubsub"):
                    if not pubsub["name"].startswith("sentinel-"):  # sentinels listen on their masters too
                        killed += int(direct.client_kill_filter(_id=pubsub["id"]))
        assert killed == 1
        await until(lambda: states[1:] == [False, True], 10, "a new subscription reported after the kill")

        with topology.data_nodes[0].client() as direct:
            direct.publish(EVENTS_CHANNEL, "drop|0123456789abcdef|tb:{payments}:tok:x")  # any node: the bus
        await until(lambda: events, 5, "an event through the new subscription")
        assert events == [Event(op="drop", key="tb:{payments}:tok:x", fingerprint="0123456789abcdef")]
    finally:
        await subscriber.stop()
        await client.aclose()
