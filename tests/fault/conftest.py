"""Shared pieces of the fault layer: broker processes we can kill, configs, log and Redis probes.

Every test in tests/fault runs real processes: `token-broker serve` (uvicorn workers), the test
authorization server with its fault switches, and a real redis-server (the session's, or one a
test starts, stops and restarts itself).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from collections.abc import Callable, Generator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from tests.conftest import READ, WRITE, auth, config_text
from tests.integration.workers import descendants
from tests.support import AuthServerProcess, BrokerProcess

__all__ = [
    "BOTH",
    "TOKENS",
    "Spawn",
    "get_token",
    "keys",
    "kill_tree",
    "log_events",
    "until",
]

TOKENS = "/v1/tokens/payments"
BOTH = f"{READ} {WRITE}"  # the third scope set the `billing` caller may ask for

Spawn = Callable[..., list[BrokerProcess]]
_FAILED = pytest.StashKey[bool]()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Remember whether the test itself failed, so `spawn` can show the brokers' logs."""
    report = yield
    if report.when == "call":
        item.stash[_FAILED] = report.failed
    return report


@pytest.fixture
def spawn(request: pytest.FixtureRequest) -> Iterator[Spawn]:
    """spawn(config, count=1, workers=2, env=None) → started brokers (in parallel), stopped afterwards.

    Brokers a test has already stopped or killed are left alone; a stopped (SIGSTOP) one is
    continued first so that it can shut down.
    """
    started: list[BrokerProcess] = []

    def start(config: Path, count: int = 1, workers: int = 2, env: dict[str, str] | None = None) -> list[BrokerProcess]:
        brokers = [BrokerProcess(config, workers=workers, env=env) for _ in range(count)]
        started.extend(brokers)
        with ThreadPoolExecutor(max_workers=count) as pool:
            list(pool.map(lambda broker: broker.start(), brokers))
        return brokers

    yield start
    failed = request.node.stash.get(_FAILED, False)
    for broker in started:
        if broker.proc is not None and broker.proc.poll() is None:
            kill_tree(broker, signal.SIGCONT)
        broker.stop()
        if failed:
            lines = [line for line in broker.output().splitlines() if '"event": "request"' not in line]
            tail = "\n".join(lines[-40:])
            print(f"\n--- broker on port {broker.port}, last log lines (request lines left out) ---\n{tail}")
        broker.log_path.unlink(missing_ok=True)


@pytest.fixture
def write_fault_config(tmp_path: Path, authserver: AuthServerProcess) -> Callable[..., Path]:
    """write_fault_config(redis_url) → the standard test config on that Redis; None → no [redis]
    section at all, so `token-broker serve` starts (and must stop) an embedded redis-server."""

    def write(redis_url: str | None, extra: str = "", name: str = "fault.toml") -> Path:
        placeholder = "redis://placeholder.invalid:6379/0"
        text = config_text(redis_url or placeholder, authserver, extra)
        if redis_url is None:
            section = f'[redis]\nurl = "{placeholder}"\n'
            assert section in text, "config_text changed shape: update write_fault_config"
            text = text.replace(section, "")
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        return path

    return write


def kill_tree(broker: BrokerProcess, sig: signal.Signals) -> list[int]:
    """Send `sig` to a broker's uvicorn process and every process below it (its workers).

    BrokerProcess does not start a session of its own, so its process group is the test
    runner's: a killpg would hit pytest. Returns the pids signalled.
    """
    assert broker.proc is not None, "broker not started"
    pids = [*descendants(broker.proc.pid), broker.proc.pid]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
    return pids


async def get_token(client: httpx.AsyncClient, scope: str = READ, **params: Any) -> httpx.Response:
    return await client.get(TOKENS, params={"scope": scope, **params}, headers=auth())


def keys(redis_url: str, pattern: str) -> list[str]:
    with redis.Redis.from_url(redis_url) as client:
        return sorted(key.decode() for key in client.scan_iter(match=pattern))


def log_events(output: str, event: str | None = None) -> list[dict[str, Any]]:
    """The JSON log events in a broker's output (optionally only those named `event`)."""
    events: list[dict[str, Any]] = []
    for line in output.splitlines():
        if not line.startswith("{"):
            continue
        try:
            parsed = json.loads(line)
        except ValueError:
            continue
        if isinstance(parsed, dict) and (event is None or parsed.get("event") == event):
            events.append(parsed)
    return events


async def until(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> float:
    """Poll `condition` (a function, sync or async) until true; returns the time it took.
    Fails the test after `timeout`."""
    started = time.monotonic()
    while True:
        result = condition()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(interval)
