"""Shared pieces of the fault layer: broker processes we can kill, configs, log and Redis probes.

Every test in tests/fault runs real processes: `token-broker serve` (uvicorn workers), the test
authorization server with its fault switches, and a real redis-server (the session's, or one a
test starts, stops and restarts itself).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from tests.conftest import READ, WRITE, auth, config_text
from tests.support import AuthServerProcess

__all__ = [
    "BOTH",
    "TOKENS",
    "get_token",
    "keys",
    "log_events",
    "until",
]

TOKENS = "/v1/tokens/payments"
BOTH = f"{READ} {WRITE}"  # the third scope set the `billing` caller may ask for


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
