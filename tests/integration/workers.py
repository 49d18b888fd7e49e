"""Which uvicorn worker process holds which TCP connection, read from /proc (Linux only).

A keep-alive connection stays with the worker that accepted it, so one `httpx.AsyncClient` with a
single connection per worker lets a test address each worker of a `BrokerProcess` on purpose.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
import time
from collections.abc import Iterable
from pathlib import Path

import httpx

from tests.support import BrokerProcess, descendants

__all__ = ["SSL_CONTEXT", "client_port", "descendants", "pin_connections", "pin_workers", "workers_of"]

_PROC = Path("/proc")
# httpx builds a fresh SSL context per client (~20 ms) unless given one; plain HTTP never uses it.
SSL_CONTEXT = ssl.create_default_context()


def _server_side_inodes(server_port: int) -> dict[int, str]:
    """client port → socket inode of the server's end of that loopback connection."""
    inodes: dict[int, str] = {}
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(OSError):
            for line in (_PROC / "net" / table).read_text().splitlines()[1:]:
                fields = line.split()
                local_port = int(fields[1].rsplit(":", 1)[1], 16)
                remote_port = int(fields[2].rsplit(":", 1)[1], 16)
                if local_port == server_port:
                    inodes[remote_port] = fields[9]
    return inodes


def _socket_owners(pids: Iterable[int]) -> dict[str, int]:
    """socket inode → pid, for the sockets these processes hold."""
    owners: dict[str, int] = {}
    for pid in pids:
        fd_dir = _PROC / str(pid) / "fd"
        try:
            fds = list(fd_dir.iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                owners[target[len("socket:[") : -1]] = pid
    return owners


def workers_of(broker: BrokerProcess, client_ports: Iterable[int | None]) -> dict[int, int]:
    """client port → pid of the broker worker serving that (still open) connection."""
    assert broker.proc is not None, "broker not started"
    inodes = _server_side_inodes(broker.port)
    owners = _socket_owners(descendants(broker.proc.pid))
    result: dict[int, int] = {}
    for port in client_ports:
        inode = None if port is None else inodes.get(port)
        if port is not None and inode is not None and inode in owners:
            result[port] = owners[inode]
    return result


def client_port(response: httpx.Response) -> int | None:
    """Local port of the connection that carried `response`, None if that connection is closed."""
    try:
        _host, port = response.extensions["network_stream"].get_extra_info("client_addr")
    except OSError:
        return None
    return int(port)


def _single_connection_client(broker: BrokerProcess) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=broker.url,
        limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
        timeout=30.0,
        trust_env=False,
        verify=SSL_CONTEXT,
    )


async def pin_connections(
    broker: BrokerProcess, per_worker: int, stack: contextlib.AsyncExitStack, seconds: float = 20.0
) -> dict[int, list[httpx.AsyncClient]]:
    """Exactly `per_worker` single-connection clients on every worker of `broker`: {pid: clients}.

    Which worker accepts a connection is up to the kernel, so connections are opened in rounds and
    kept only while their worker still needs some; on a busy machine a worker can stay out of
    accept() for a while after the broker first answers, so rounds go on for up to `seconds`.
    Callers must keep using the clients (uvicorn closes keep-alive connections idle for 5 s, and
    httpx would then reconnect to any worker).
    """
    pinned: dict[int, list[httpx.AsyncClient]] = {}
    deadline = time.monotonic() + seconds
    while True:
        missing = broker.workers * per_worker - sum(len(clients) for clients in pinned.values())
        if missing == 0:
            return pinned
        if time.monotonic() > deadline:
            break
        if pinned:
            await asyncio.sleep(0.1)
        batch = [_single_connection_client(broker) for _ in range(2 * missing + 4)]
        ports = [client_port(response) for response in await asyncio.gather(*(c.get("/healthz") for c in batch))]
        owners = workers_of(broker, ports)
        for client, port in zip(batch, ports, strict=True):
            pid = owners.get(port) if port is not None else None
            if pid is not None and len(pinned.setdefault(pid, [])) < per_worker:
                pinned[pid].append(client)
                stack.push_async_callback(client.aclose)
            else:
                await client.aclose()
    counts = {pid: len(clients) for pid, clients in pinned.items()}
    raise AssertionError(f"could not pin {per_worker} connections on each of {broker.workers} workers: {counts}")


async def pin_workers(broker: BrokerProcess, stack: contextlib.AsyncExitStack) -> dict[int, httpx.AsyncClient]:
    """One single-connection client per worker of `broker`: {worker pid: client}."""
    return {pid: clients[0] for pid, clients in (await pin_connections(broker, 1, stack)).items()}
