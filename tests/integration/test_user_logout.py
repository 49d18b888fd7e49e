"""Issue 14: logout (spec §5.5) on a fleet — the refresh token revoked upstream (RFC 7009), and
the subject forgotten on every replica: each worker's L1 copy goes with the drop events, nothing
stays in Redis, and no worker tries a refresh for it afterwards. A new login starts afresh."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import httpx
import pytest
import redis

from tests.conftest import StartBrokers, auth
from tests.fault.conftest import until
from tests.integration.workers import pin_workers
from tests.support import AuthServerProcess, BrokerProcess
from tests.users import PORTAL, audit, log_in, subject_path, write_portal_config

pytestmark = pytest.mark.slow


def subject_keys_in(redis_url: str) -> list[str]:
    with redis.Redis.from_url(redis_url) as client:
        return sorted(key.decode() for key in client.scan_iter(match=f"tb:{{{PORTAL}/*"))


async def pinned(brokers: list[BrokerProcess], stack: contextlib.AsyncExitStack) -> list[httpx.AsyncClient]:
    clients: list[httpx.AsyncClient] = []
    for broker in brokers:
        for attempt in range(10):
            try:
                clients.extend((await pin_workers(broker, stack)).values())
                break
            except AssertionError:
                if attempt == 9:
                    raise
                await asyncio.sleep(0.2)
    return clients


async def test_logout_revokes_upstream_and_forgets_the_subject_on_every_replica(
    tmp_path: Path, redis_url: str, authserver: AuthServerProcess, start_brokers: StartBrokers
) -> None:
    config = write_portal_config(tmp_path / "users.toml", redis_url, authserver)
    brokers = start_brokers(config, count=2, workers=2)
    async with contextlib.AsyncExitStack() as stack:
        workers = await pinned(brokers, stack)
        assert len(workers) == 4
        subject = log_in(brokers[0].url, authserver)
        path = subject_path(subject)

        async def everywhere() -> list[httpx.Response]:
            return list(await asyncio.gather(*(w.get(path, headers=auth()) for w in workers)))

        for _ in range(2):  # into every worker's L1, then served from there (the fast path)
            held = await everywhere()
            assert [r.status_code for r in held] == [200] * 4, [r.text for r in held]
        (token,) = {r.json()["access_token"] for r in held}
        assert subject_keys_in(redis_url)

        gone = await workers[3].delete(path, headers=auth())  # on the other replica than the login
        assert gone.status_code == 204, gone.text
        assert gone.content == b""
        assert subject_keys_in(redis_url) == []  # grant, tokens, lock and fence: all gone

        (revocation,) = authserver.stats()["revocations"]
        assert (revocation["token_type"], revocation["token_type_hint"]) == ("refresh_token", "refresh_token")
        (grant,) = authserver.grants().values()
        assert (grant["revoked"], grant["revoked_reason"]) == (True, "revoked")

        async def forgotten_everywhere() -> bool:
            return all(r.status_code != 200 for r in await everywhere())

        await until(forgotten_everywhere, 3, "every worker to drop its copy")
        # billing reads the users who logged in through it: this one is now unknown, like any
        # other (403); `reporting` (subjects = "any") is told the user must log in again
        after = await everywhere()
        assert [r.status_code for r in after] == [403] * 4, [r.text for r in after]
        assert {r.json()["error"] for r in after} == {"access_denied"}
        anyone = await asyncio.gather(*(w.get(path, headers=auth("reporting")) for w in workers))
        assert [r.status_code for r in anyone] == [409] * 4, [r.text for r in anyone]
        assert {r.json()["error"] for r in anyone} == {"reauthorization_required"}
        # what asking again leaves: the fetch lock's fence counter (a number, expiring), no data
        assert all(":fence:" in key for key in subject_keys_in(redis_url))
        assert authserver.stats()["refresh_requests"] == 0  # nobody spent anything for it

        # the user logs in again: a new grant, a new token, served everywhere
        assert log_in(brokers[1].url, authserver) == subject
        again = await everywhere()
        assert [r.status_code for r in again] == [200] * 4, [r.text for r in again]
        assert {r.json()["access_token"] for r in again} != {token}


async def test_after_a_logout_no_replica_lets_a_caller_read_what_the_user_gave_another_caller(
    tmp_path: Path, redis_url: str, authserver: AuthServerProcess, start_brokers: StartBrokers
) -> None:
    """Defect: each worker remembered for a minute which subjects a caller may read (the fast path
    reads no grant), and a logout did not make them forget: a user who logged out and in again
    through another caller had the new login's token read by the first caller on every worker
    that remembered it. Now a logout's drop event makes every worker check again."""
    config = write_portal_config(tmp_path / "users.toml", redis_url, authserver)
    brokers = start_brokers(config, count=2, workers=2)
    async with contextlib.AsyncExitStack() as stack:
        workers = await pinned(brokers, stack)
        subject = log_in(brokers[0].url, authserver)  # through billing
        path = subject_path(subject)
        held = await asyncio.gather(*(w.get(path, headers=auth()) for w in workers))
        assert [r.status_code for r in held] == [200] * 4  # every worker remembers: billing may
        assert (await workers[0].delete(path, headers=auth())).status_code == 204
        assert log_in(brokers[1].url, authserver, caller="audit") == subject
        assert (await workers[1].get(path, headers=audit())).status_code == 200
        after = await asyncio.gather(*(w.get(path, headers=auth()) for w in workers))
        assert [r.status_code for r in after] == [403] * 4, [r.text for r in after]
        assert {r.json()["error"] for r in after} == {"access_denied"}


@pytest.mark.parametrize("upstream", ["no revocation endpoint", "revocation fails"])
async def test_logout_forgets_the_subject_even_when_upstream_cannot_revoke(
    upstream: str, tmp_path: Path, redis_url: str, authserver: AuthServerProcess, start_brokers: StartBrokers
) -> None:
    if upstream == "no revocation endpoint":
        authserver.configure(advertise_revocation=False)  # before the broker reads discovery
    else:
        authserver.configure(revocation_fault="503")
    config = write_portal_config(tmp_path / "users.toml", redis_url, authserver)
    (broker,) = start_brokers(config, workers=1)
    subject = log_in(broker.url, authserver)
    async with httpx.AsyncClient(base_url=broker.url, timeout=15, trust_env=False) as client:
        assert (await client.get(subject_path(subject), headers=auth())).status_code == 200
        gone = await client.delete(subject_path(subject), headers=auth())
        assert gone.status_code == 204, gone.text
        assert subject_keys_in(redis_url) == []
        after = await client.get(subject_path(subject), headers=auth("reporting"))
        assert after.status_code == 409, after.text
    assert authserver.stats()["revocations"] == []
    assert not next(iter(authserver.grants().values()))["revoked"]
