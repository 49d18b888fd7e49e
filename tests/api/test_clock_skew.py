"""Replicas whose wall clocks disagree judge a shared token alike (spec §4.3).

Two brokers in-process on one real Redis and the real test authorization server, one of them
with a wall clock 5 s off (the monotonic clock is the host's own, as on a real replica). A copy
of a token is bounded by the Redis key's own PTTL on the reader's monotonic clock, whatever the
writer's wall clock said; the wall clock only shapes what callers are told (`expires_at`).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from starlette.testclient import TestClient

from broker.api import create_app
from broker.settings import load_settings
from tests.conftest import READ, auth
from tests.support import AuthServerProcess

TOKENS = "/v1/tokens/payments"
SKEW = 5.0


class SkewedClock:
    """A host whose wall clock is `offset` seconds off; its monotonic clock is its own."""

    def __init__(self, offset: float) -> None:
        self.offset = offset

    def now(self) -> float:
        return time.time() + self.offset

    def monotonic(self) -> float:
        return time.monotonic()


Replicas = Callable[..., tuple[TestClient, TestClient]]


@pytest.fixture
def replicas(write_config: Callable[..., Path]) -> Iterator[Replicas]:
    """replicas(offset, **env) → (writer, reader): the reader's wall clock is `offset` s off."""
    with contextlib.ExitStack() as stack:

        def start(offset: float, **env: str) -> tuple[TestClient, TestClient]:
            settings = load_settings(write_config(), env={**os.environ, **env})
            writer = TestClient(create_app(settings), raise_server_exceptions=False)
            reader = TestClient(create_app(settings, clock=SkewedClock(offset)), raise_server_exceptions=False)
            return stack.enter_context(writer), stack.enter_context(reader)

        yield start


def get(client: TestClient, **params: Any) -> dict[str, Any]:
    """The token response, its access_token shortened to a fingerprint (readable failures)."""
    response = client.get(TOKENS, params={"scope": READ, **params}, headers=auth())
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    body["access_token"] = hashlib.sha256(body["access_token"].encode()).hexdigest()[:16]
    return body


def stored_tokens(redis_url: str) -> list[bytes]:
    with redis.Redis.from_url(redis_url) as client:
        return list(client.scan_iter(match="*:tok:*"))


def wait_until_gone(redis_url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while stored_tokens(redis_url):
        assert time.monotonic() < deadline, "the token's Redis key did not expire"
        time.sleep(0.05)


def test_a_replica_behind_does_not_serve_its_copy_after_the_shared_token_expired(
    replicas: Replicas, authserver: AuthServerProcess, redis_url: str
) -> None:
    """Defect (hardening item 6): `fresh_until` was the writing replica's wall clock and each
    reader judged it by its own, and an L1 copy had no TTL of its own: a replica 5 s behind kept
    serving its L1 copy after the Redis key was gone, with an `expires_in` well past the token's
    real life."""
    writer, reader = replicas(-SKEW)
    authserver.configure(lifetime=4)  # effective skew 1 s: the key lives 3 s
    token = get(writer)["access_token"]
    assert get(reader)["access_token"] == token  # read from Redis: now in the reader's L1
    assert get(reader)["access_token"] == token
    assert authserver.token_requests() == 1

    wait_until_gone(redis_url, timeout=5)
    body = get(reader)
    assert body["access_token"] != token, "the reader served its copy after the shared token expired"
    assert authserver.token_requests() == 2
    assert body["expires_in"] <= 4


def test_a_replica_ahead_keeps_a_shared_token_that_is_still_fresh(
    replicas: Replicas, authserver: AuthServerProcess
) -> None:
    """Defect (hardening item 6), the other way round: a replica 5 s ahead judged a token with
    4.5 s of cached life left as stale by its own wall clock and threw it away (and fetched)."""
    writer, reader = replicas(+SKEW)
    authserver.configure(lifetime=6)  # effective skew 1.5 s: cached for 4.5 s
    written = get(writer)
    read = get(reader)
    assert read["access_token"] == written["access_token"]
    assert authserver.token_requests() == 1
    assert read["expires_at"] == written["expires_at"]  # what callers are told: the same everywhere
    assert 4 <= read["expires_in"] <= 6  # its real life, not the skewed clock's idea of it


def test_recent_fetch_is_judged_by_the_readers_own_clock(replicas: Replicas, authserver: AuthServerProcess) -> None:
    """Defect (hardening item 6), the one-second RECENT_FETCH rule (a token fetched < 1 s ago
    satisfies any min_ttl): it compared the writer's wall-clock `fetched_at` with the reader's
    clock, so on a replica 5 s behind a token looked "just fetched" for 6 s and `min_ttl` was
    ignored for that long."""
    writer, reader = replicas(-SKEW, BROKER_CACHE_REFRESH_AT="0.95,0.99")  # no refresh-ahead meanwhile
    authserver.configure(lifetime=8)  # cached for 6 s; min_ttl asks for at most half its life (4 s)
    token = get(writer)["access_token"]
    issued = time.monotonic()  # the token is at least this old from here on
    assert get(reader)["access_token"] == token
    time.sleep(max(0.0, issued + 4.3 - time.monotonic()))  # 3.7 s left: less than min_ttl asks
    body = get(reader, min_ttl=3600)
    assert body["access_token"] != token, "min_ttl was ignored: the token looked just fetched"
    assert authserver.token_requests() == 2
