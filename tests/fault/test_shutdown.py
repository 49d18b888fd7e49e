"""Issue 4, point 6: SIGTERM while a request is in flight.

`token-broker serve` with two workers and no [redis] url (so it runs its own embedded
redis-server): the in-flight request still gets its token, the process exits promptly and
quietly, and the embedded redis-server goes with it.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.conftest import StartBrokers
from tests.fault.conftest import get_token, log_events, until
from tests.integration.workers import descendants
from tests.support import AuthServerProcess

pytestmark = pytest.mark.slow


def redis_servers(root: int) -> list[int]:
    found = []
    for pid in descendants(root):
        try:
            name = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            continue
        if name.startswith("redis-server"):
            found.append(pid)
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


async def test_sigterm_finishes_in_flight_requests_and_stops_the_embedded_redis(
    write_fault_config: Callable[..., Path], authserver: AuthServerProcess, start_brokers: StartBrokers
) -> None:
    (broker,) = start_brokers(write_fault_config(None), workers=2)
    assert broker.proc is not None
    (redis_pid,) = redis_servers(broker.proc.pid)
    (started,) = log_events(broker.output(), "redis.embedded_started")
    redis_port = int(started["url"].rsplit(":", 1)[1].split("/")[0])
    assert answers(redis_port)

    authserver.configure(delay=2)
    async with httpx.AsyncClient(base_url=broker.url, timeout=15, trust_env=False) as client:
        in_flight = asyncio.create_task(get_token(client))
        await until(lambda: authserver.token_requests() == 1, 5, "the upstream request")
        broker.proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        response = await in_flight
    assert response.status_code == 200, response.text
    assert response.json()["token_type"] == "Bearer"

    exit_code = await asyncio.to_thread(broker.proc.wait, 15)
    took = time.monotonic() - signalled
    assert exit_code == 0
    assert took < 15
    await until(lambda: not alive(redis_pid), 5, "the embedded redis-server to exit")
    assert not answers(redis_port)

    output = broker.output()
    for noise in ("Task was destroyed but it is pending", "Traceback", "Exception in ", "ERROR"):
        assert noise not in output, f"{noise!r} in the broker's output:\n{output[-3000:]}"
    assert log_events(output, "redis.embedded_stopped")
    assert len(log_events(output, "Application shutdown complete.")) == 2
