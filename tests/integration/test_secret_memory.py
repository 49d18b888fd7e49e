"""Which client secret works, remembered through Redis (spec §6.5): the upstream client of two
"workers" on one real Redis against the real test authorization server.

The fleet as real processes is tests/integration/test_secret_rotation.py; this is the memory's
own rules, quicker to state in one process.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable

import pytest
import redis
import redis.asyncio as aioredis

from broker.entries import Codec
from broker.errors import UpstreamError, UpstreamRejected
from broker.secret import Secret
from broker.settings import UpstreamSettings
from broker.store import Store
from broker.upstream.client import UpstreamClient
from broker.upstream.exchange import new_http_client
from broker.upstream.rotation import SecretRotation
from broker.vault.keyring import KeyRing
from broker.vault.models import CredentialSettings
from tests.conftest import ENCRYPTION_KEYS, READ, WRITE
from tests.support import CLIENT_ID, AuthServerProcess, free_port

SETTINGS = UpstreamSettings(max_attempts=1)
NEW, OLD, THIRD = "new-rotated-secret", "old-secret-still-valid", "a-third-secret"

Worker = Callable[[], UpstreamClient]


def credential(authserver: AuthServerProcess, *secrets: str) -> CredentialSettings:
    return CredentialSettings(
        name="payments",
        client_id=CLIENT_ID,
        client_secrets=tuple(Secret(s, f"env:S{i}") for i, s in enumerate(secrets)),
        token_url=authserver.token_url,
    )


@pytest.fixture
async def workers(redis_url: str) -> AsyncIterator[Worker]:
    """workers() → a new upstream client with its own memory, sharing the Redis of the others."""
    connections: list[aioredis.Redis] = []
    async with new_http_client(SETTINGS) as http:

        def worker(url: str = redis_url) -> UpstreamClient:
            connection = aioredis.Redis.from_url(url, socket_connect_timeout=1)
            connections.append(connection)
            store = Store(connection, codec=Codec(KeyRing.parse(ENCRYPTION_KEYS)))
            return UpstreamClient(
                http, SETTINGS, default_expires_in=300, rotation=SecretRotation(store, store.codec.fingerprint)
            )

        yield worker
    for connection in connections:
        await connection.aclose()


def deadline() -> float:
    return time.monotonic() + 5


def sent(authserver: AuthServerProcess, since: int = 0) -> list[tuple[str | None, int | None]]:
    return authserver.requests_by_secret()[since:]


async def test_one_refusal_tells_every_worker(authserver: AuthServerProcess, workers: Worker, redis_url: str) -> None:
    authserver.accept_secrets(OLD)
    cred = credential(authserver, NEW, OLD)
    first, second = workers(), workers()
    await first.fetch(cred, READ, deadline())
    assert sent(authserver) == [(NEW, 401), (OLD, 200)]
    await second.fetch(cred, WRITE, deadline())  # another worker, another scope set
    await first.fetch(cred, f"{READ} {WRITE}", deadline())
    assert sent(authserver, 2) == [(OLD, 200), (OLD, 200)]
    # What Redis holds: one key of the credential, a fingerprint (never a secret), for a day.
    with redis.Redis.from_url(redis_url) as direct:
        [key] = direct.keys("tb:{payments}:secret:*")
        value = direct.get(key)
        assert value is not None
        assert NEW.encode() not in value
        assert OLD.encode() not in value
        assert 0 < direct.ttl(key) <= 24 * 3600


async def test_when_the_remembered_secret_is_refused_the_first_is_tried_again(
    authserver: AuthServerProcess, workers: Worker
) -> None:
    authserver.accept_secrets(OLD)
    cred = credential(authserver, NEW, OLD, THIRD)
    await workers().fetch(cred, READ, deadline())
    authserver.accept_secrets(NEW, OLD)  # the server knows NEW now: OLD is still the one in use
    await workers().fetch(cred, WRITE, deadline())
    assert sent(authserver) == [(NEW, 401), (OLD, 200), (OLD, 200)]
    authserver.accept_secrets(NEW)  # OLD revoked: one refusal, then back to the first
    await workers().fetch(cred, READ, deadline())
    await workers().fetch(cred, WRITE, deadline())
    assert sent(authserver, 3) == [(OLD, 401), (NEW, 200), (NEW, 200)]


async def test_a_changed_list_of_secrets_starts_from_its_first(authserver: AuthServerProcess, workers: Worker) -> None:
    """The memory belongs to the list as it is: reordered or changed, the first is first again."""
    authserver.accept_secrets(OLD)
    await workers().fetch(credential(authserver, NEW, OLD), READ, deadline())
    await workers().fetch(credential(authserver, NEW, OLD, THIRD), READ, deadline())
    await workers().fetch(credential(authserver, OLD, NEW), READ, deadline())
    assert sent(authserver) == [(NEW, 401), (OLD, 200), (NEW, 401), (OLD, 200), (OLD, 200)]


async def test_every_secret_refused_is_the_last_refusal(authserver: AuthServerProcess, workers: Worker) -> None:
    authserver.accept_secrets(THIRD)
    with pytest.raises(UpstreamRejected) as caught:
        await workers().fetch(credential(authserver, NEW, OLD), READ, deadline())
    assert (caught.value.upstream_error, caught.value.upstream_status) == ("invalid_client", 401)
    assert sent(authserver) == [(NEW, 401), (OLD, 401)]


@pytest.mark.parametrize("fault", ["unauthorized_client", "401_empty", "503"])
async def test_no_other_failure_tries_the_next_secret(
    authserver: AuthServerProcess, workers: Worker, fault: str
) -> None:
    """Only invalid_client says the secret is wrong (spec §6.5): another refusal, a 401 without
    an OAuth error, or a server error is the caller's answer, with no second secret tried."""
    authserver.configure(fault=fault)
    with pytest.raises(UpstreamError):
        await workers().fetch(credential(authserver, NEW, OLD), READ, deadline())
    assert [secret for secret, _ in sent(authserver)] == [NEW]


async def test_without_redis_each_worker_remembers_for_itself(authserver: AuthServerProcess, workers: Worker) -> None:
    authserver.accept_secrets(OLD)
    cred = credential(authserver, NEW, OLD)
    alone = workers(f"redis://127.0.0.1:{free_port()}/0")  # nothing listens there
    await alone.fetch(cred, READ, deadline())
    await alone.fetch(cred, WRITE, deadline())
    assert sent(authserver) == [(NEW, 401), (OLD, 200), (OLD, 200)]


async def test_one_secret_needs_no_memory(authserver: AuthServerProcess, workers: Worker, redis_url: str) -> None:
    authserver.accept_secrets(OLD)
    await workers().fetch(credential(authserver, OLD), READ, deadline())
    with redis.Redis.from_url(redis_url) as direct:
        assert direct.keys("tb:{payments}:secret:*") == []
