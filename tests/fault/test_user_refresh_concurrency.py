"""Issue 14: a subject's refresh token spent by a fleet (spec §5.4), on real processes.

Two broker processes x two workers on one Redis, one user logged in, every worker asking for that
user's token at once with a `min_ttl` the cached token no longer meets: one refresh per round and
every caller answered, round after round; the authorization server (tests/authserver_code.py)
rotates refresh tokens and revokes the whole grant when a rotated one comes back (RFC 9700
§4.14), so any double spend shows there. Then the same with the lock holder SIGKILLed while its
refresh is out, and with the refresh answer lost (the server rotates, then drops the connection):
never a double spend; with `rotation_grace_seconds = 0` the subject ends in
`reauthorization_required`, not in a grant found revoked later.

Tokens live 2.4 s (`expires_in` as a float; cacheable, ≥ 2 s): `min_ttl` is capped at half a
token's lifetime and a token fetched less than a second ago satisfies any `min_ttl` (spec §3.1),
so a round can force a refresh 1.3 s after the last one: 200 rounds take about five minutes,
the floor the spec sets.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import READ, WRITE, StartBrokers, auth
from tests.fault.conftest import until
from tests.integration.workers import pin_workers
from tests.support import AuthServerProcess, BrokerProcess, kill_tree
from tests.users import grant_record, log_in, subject_keys, subject_path, write_portal_config

pytestmark = pytest.mark.slow

EXPIRES_IN = 2.4  # cached for 1.8 s (skew: a quarter); min_ttl asks for at most 1.2 s
AGE = EXPIRES_IN / 2 + 0.1  # from then on min_ttl=60 wants a fresher token
STALE = EXPIRES_IN * 0.75 + 0.2  # from then on no cached token is valid: nothing to fall back on
ROUNDS = 200
LOCK_TTL = 2.0
# refresh-ahead past 95 % of the window: a round's requests (min_ttl unmet) never start one
ENV = {"BROKER_CACHE_REFRESH_AT": "0.95,0.99", "BROKER_CACHE_LOCK_TTL_SECONDS": str(LOCK_TTL)}


@pytest.fixture
def short_tokens(authserver: AuthServerProcess) -> Iterator[AuthServerProcess]:
    authserver.configure(lifetime=3, expires_in=EXPIRES_IN)  # the JWT's exp a little later
    return authserver


class Fleet:
    """One pinned connection per worker of each broker."""

    def __init__(self, clients: dict[BrokerProcess, list[httpx.AsyncClient]]) -> None:
        self.by_broker = clients

    @classmethod
    async def pin(cls, brokers: list[BrokerProcess], stack: contextlib.AsyncExitStack) -> Fleet:
        pinned: dict[BrokerProcess, list[httpx.AsyncClient]] = {}
        for broker in brokers:
            for attempt in range(10):
                try:
                    pinned[broker] = list((await pin_workers(broker, stack)).values())
                    break
                except AssertionError:
                    if attempt == 9:
                        raise
                    await asyncio.sleep(0.2)  # a worker still starting accepts nothing yet
        return cls(pinned)

    @property
    def clients(self) -> list[httpx.AsyncClient]:
        return [client for clients in self.by_broker.values() for client in clients]


async def ask(client: httpx.AsyncClient, subject: str, **params: str) -> httpx.Response:
    return await client.get(subject_path(subject), params={"min_ttl": "60", **params}, headers=auth())


async def at_once(clients: list[httpx.AsyncClient], subject: str, **params: str) -> list[httpx.Response]:
    return list(await asyncio.gather(*(ask(client, subject, **params) for client in clients)))


def the_grant(authserver: AuthServerProcess) -> dict[str, Any]:
    (grant,) = authserver.grants().values()
    return grant


def no_double_spend(authserver: AuthServerProcess) -> dict[str, Any]:
    grant = the_grant(authserver)
    assert not grant["revoked"], f"the grant was revoked: {grant}"
    assert authserver.stats()["refresh_reuse_detections"] == 0
    return grant


async def start_fleet(
    tmp_path: Path,
    redis_url: str,
    authserver: AuthServerProcess,
    start_brokers: StartBrokers,
    grace: float = 0.0,
    scope: str | None = None,
) -> tuple[Path, list[BrokerProcess], str]:
    """2 brokers x 2 workers, the server's grace like the credential's; alice logged in through billing."""
    authserver.configure(rotation_grace_seconds=grace)
    config = write_portal_config(tmp_path / "users.toml", redis_url, authserver, rotation_grace_seconds=grace)
    brokers = start_brokers(config, count=2, workers=2, env=ENV)
    subject = log_in(brokers[0].url, authserver, scope=scope)
    return config, brokers, subject


@pytest.mark.timeout(600)  # 200 rounds, at least 1.3 s apart
async def test_two_brokers_refreshing_one_subject_at_once_spend_each_refresh_token_once(
    tmp_path: Path, redis_url: str, short_tokens: AuthServerProcess, start_brokers: StartBrokers
) -> None:
    """Each round all four workers ask at once with a min_ttl the cached token no longer meets:
    exactly one refresh (one lock holder; the others take its token from Redis), four answers
    with the same new token, never an earlier one; no grant revoked, no rotated token reused."""
    authserver = short_tokens
    config, brokers, subject = await start_fleet(tmp_path, redis_url, authserver, start_brokers)
    keys = subject_keys(config, subject)
    async with contextlib.AsyncExitStack() as stack:
        fleet = await Fleet.pin(brokers, stack)
        clients = fleet.clients
        assert len(clients) == 4
        first = await at_once(clients, subject, min_ttl="0")  # the login's token, or one refresh
        assert {r.status_code for r in first} == {200}, [r.text for r in first]
        seen = {r.json()["access_token"] for r in first}
        assert len(seen) == 1
        base = the_grant(authserver)["refreshes"]
        assert base <= 1
        last = time.monotonic()
        answered = 0
        for round_ in range(1, ROUNDS + 1):
            await asyncio.sleep(max(0.0, last + AGE - time.monotonic()))
            responses = await at_once(clients, subject)
            last = time.monotonic()
            answered += len(responses)
            assert [r.status_code for r in responses] == [200] * 4, f"round {round_}: {[r.text for r in responses]}"
            tokens = {r.json()["access_token"] for r in responses}
            assert len(tokens) == 1, f"round {round_}: {len(tokens)} different tokens"
            assert not tokens & seen, f"round {round_}: an earlier token came back"
            seen |= tokens
            refreshes = the_grant(authserver)["refreshes"]
            assert refreshes == base + round_, f"round {round_}: {refreshes - base} refreshes in {round_} rounds"
            # the rotated refresh token was in Redis before the access token went out
            version, record = grant_record(redis_url, keys)
            assert record is not None
            assert (version, record["status"]) == (1 + 2 * refreshes, "active"), f"round {round_}"
    grant = no_double_spend(authserver)
    assert grant["refreshes"] == base + ROUNDS
    assert grant["grace_reuses"] == 0
    assert answered == 4 * ROUNDS
    print(
        f"\n{ROUNDS} rounds x 4 callers: {grant['refreshes']} refreshes, revoked={grant['revoked']}, {answered} answers"
    )


async def test_a_grant_the_server_no_longer_accepts_needs_a_new_login_on_every_worker(
    tmp_path: Path, redis_url: str, short_tokens: AuthServerProcess, start_brokers: StartBrokers
) -> None:
    """`invalid_grant` (the user withdrew consent): one refresh tried, then 409
    `reauthorization_required` everywhere without asking again, until the user logs in again."""
    authserver = short_tokens
    _, brokers, subject = await start_fleet(tmp_path, redis_url, authserver, start_brokers)
    async with contextlib.AsyncExitStack() as stack:
        fleet = await Fleet.pin(brokers, stack)
        authserver.revoke_grants(sub=subject)
        await asyncio.sleep(STALE)
        for _ in range(3):
            dead = await at_once(fleet.clients, subject)
            assert [r.status_code for r in dead] == [409] * 4, [r.text for r in dead]
            assert {r.json()["error"] for r in dead} == {"reauthorization_required"}
        assert authserver.stats()["refresh_requests"] == 1
        assert log_in(brokers[1].url, authserver) == subject
        back = await at_once(fleet.clients, subject, min_ttl="0")
        assert [r.status_code for r in back] == [200] * 4, [r.text for r in back]
        assert authserver.stats()["refresh_requests"] == 1


async def hold_and_kill(fleet: Fleet, holder: BrokerProcess, authserver: AuthServerProcess, subject: str) -> list[Any]:
    """A worker of `holder` takes the fetch lock and sends the refresh, which the authorization
    server does at once and answers 3 s later; meanwhile every other worker asks too; then the
    holder's processes are SIGKILLed. → the other broker's answers."""
    held, *rest = fleet.by_broker[holder]
    others = [client for broker, clients in fleet.by_broker.items() if broker is not holder for client in clients]
    before = authserver.stats()["refresh_requests"]
    authserver.configure(refresh_delay=3)
    holding = asyncio.create_task(ask(held, subject))
    await until(lambda: authserver.stats()["refresh_requests"] == before + 1, 5, "the holder's refresh")
    authserver.configure(refresh_delay=0)  # read as the refresh is done: the one out keeps its delay
    waiting = [asyncio.create_task(ask(client, subject)) for client in [*rest, *others]]
    await asyncio.sleep(0.3)  # everybody waits for the holder's lock
    kill_tree(holder, signal.SIGKILL)
    results = await asyncio.gather(holding, *waiting, return_exceptions=True)
    killed = results[: 1 + len(rest)]
    assert all(isinstance(result, httpx.TransportError) for result in killed), killed
    answers = results[1 + len(rest) :]
    assert all(isinstance(answer, httpx.Response) for answer in answers), answers
    return answers


@pytest.mark.parametrize("grace", [0, 30])
async def test_a_lock_holder_killed_mid_refresh_never_leads_to_a_double_spend(
    grace: float, tmp_path: Path, redis_url: str, short_tokens: AuthServerProcess, start_brokers: StartBrokers
) -> None:
    """The holder's refresh was done upstream (the refresh token rotated) but its answer died
    with the holder. With no grace the refresh token may be spent: the subject needs a new login
    (409), and the grant upstream stays unrevoked. With a grace the other broker retries it once,
    within the server's grace, and goes on refreshing."""
    authserver = short_tokens
    config, (a, b), subject = await start_fleet(tmp_path, redis_url, authserver, start_brokers, grace=grace)
    async with contextlib.AsyncExitStack() as stack:
        fleet = await Fleet.pin([a, b], stack)
        await asyncio.sleep(STALE)  # the login's token is too old to fall back on
        answers = await hold_and_kill(fleet, a, authserver, subject)
        statuses = [answer.status_code for answer in answers]
        if grace == 0:
            assert statuses == [409, 409], [answer.text for answer in answers]
            assert {answer.json()["error"] for answer in answers} == {"reauthorization_required"}
            assert no_double_spend(authserver)["refreshes"] == 1
            _, record = grant_record(redis_url, subject_keys(config, subject))
            assert record is not None
            assert record["status"] == "reauth"
            assert record["refresh_token"] is None
            again = await at_once(fleet.by_broker[b], subject)  # and so it stays, without a request upstream
            assert [r.status_code for r in again] == [409, 409]
            assert no_double_spend(authserver)["refreshes"] == 1
            return
        assert statuses == [200, 200], [answer.text for answer in answers]
        assert len({answer.json()["access_token"] for answer in answers}) == 1
        grant = no_double_spend(authserver)
        assert (grant["refreshes"], grant["grace_reuses"]) == (2, 1)
        last = time.monotonic()
        for round_ in range(1, 11):  # the survivor goes on: one refresh a round
            await asyncio.sleep(max(0.0, last + AGE - time.monotonic()))
            responses = await at_once(fleet.by_broker[b], subject)
            last = time.monotonic()
            assert [r.status_code for r in responses] == [200, 200], [r.text for r in responses]
            assert the_grant(authserver)["refreshes"] == 2 + round_
        assert no_double_spend(authserver)["grace_reuses"] == 1


@pytest.mark.parametrize("grace", [0, 30])
async def test_a_lost_refresh_answer_is_never_spent_twice(
    grace: float, tmp_path: Path, redis_url: str, short_tokens: AuthServerProcess, start_brokers: StartBrokers
) -> None:
    """The server rotates the refresh token and drops the connection before answering (a timeout
    after sending): the holder's caller gets 503; with no grace everyone else 409 and the subject
    needs a new login, the grant upstream unrevoked; with a grace the next holder retries once,
    within the server's grace, and everyone gets the new token."""
    authserver = short_tokens
    config, brokers, subject = await start_fleet(tmp_path, redis_url, authserver, start_brokers, grace=grace)
    async with contextlib.AsyncExitStack() as stack:
        fleet = await Fleet.pin(brokers, stack)
        await asyncio.sleep(STALE)
        authserver.configure(refresh_fault="close_after", refresh_fault_count=1)
        responses = await at_once(fleet.clients, subject)
        statuses = sorted(r.status_code for r in responses)
        errors = {r.status_code: r.json().get("error") for r in responses if r.status_code != 200}
        assert errors[503] == "upstream_unavailable"
        if grace == 0:
            assert statuses == [409, 409, 409, 503], [r.text for r in responses]
            assert errors[409] == "reauthorization_required"
            assert no_double_spend(authserver)["refreshes"] == 1
            _, record = grant_record(redis_url, subject_keys(config, subject))
            assert record is not None
            assert (record["status"], record["reason"]) == ("reauth", "a refresh answer was lost")
            again = await at_once(fleet.clients, subject)
            assert [r.status_code for r in again] == [409] * 4
            assert no_double_spend(authserver)["refreshes"] == 1
            return
        assert statuses == [200, 200, 200, 503], [r.text for r in responses]
        assert len({r.json()["access_token"] for r in responses if r.status_code == 200}) == 1
        grant = no_double_spend(authserver)
        assert (grant["refreshes"], grant["grace_reuses"]) == (2, 1)


async def test_a_refresh_retried_after_two_lost_answers_keeps_the_first_sending_time(
    tmp_path: Path, redis_url: str, short_tokens: AuthServerProcess, start_brokers: StartBrokers
) -> None:
    """Defect: a retry within `rotation_grace_seconds` marked the grant "pending" again with a new
    time, so after a second lost answer the grace was counted from the retry, not from when the
    refresh token was first sent (which is when the server's grace starts): a third try sent the
    rotated refresh token after the server's grace and the server revoked the whole grant.
    Now the first sending time stays: past the grace, the subject needs a new login (409), and
    the grant upstream is not revoked."""
    authserver = short_tokens
    grace = 4
    config, brokers, subject = await start_fleet(tmp_path, redis_url, authserver, start_brokers, grace=grace)
    async with httpx.AsyncClient(base_url=brokers[1].url, timeout=15, trust_env=False) as client:
        await asyncio.sleep(STALE)
        authserver.configure(refresh_fault="close_after", refresh_fault_count=2)
        sent = time.monotonic()
        lost = await ask(client, subject)  # rotated upstream, answer lost
        assert lost.status_code == 503, lost.text
        await asyncio.sleep(max(0.0, sent + grace * 0.6 - time.monotonic()))
        retried = await ask(client, subject)  # within the grace: sent again, lost again
        assert retried.status_code == 503, retried.text
        assert the_grant(authserver)["grace_reuses"] == 1
        await asyncio.sleep(max(0.0, sent + grace * 1.25 - time.monotonic()))
        third = await ask(client, subject)  # past the grace counted from the first sending
        assert third.status_code == 409, third.text
        assert third.json()["error"] == "reauthorization_required"
    grant = no_double_spend(authserver)
    assert grant["refreshes"] == 2
    _, record = grant_record(redis_url, subject_keys(config, subject))
    assert record is not None
    assert record["status"] == "reauth"


async def test_two_scope_sets_of_one_subject_refreshing_at_once_both_get_a_token(
    tmp_path: Path, redis_url: str, short_tokens: AuthServerProcess, start_brokers: StartBrokers
) -> None:
    """Defect: the fetch lock is per scope set, the grant per subject. A refresh of one scope set
    found the grant "pending" because another scope set's refresh was out at that moment, took
    that for a lost answer and marked the grant dead (or, within a grace, sent the same refresh
    token a second time): the user had to log in again for nothing. Now a refresh whose holder is
    still at work is waited for, and the next one spends the rotated refresh token."""
    authserver = short_tokens
    both = f"{READ} {WRITE}"
    config, (a, b), subject = await start_fleet(tmp_path, redis_url, authserver, start_brokers, scope=both)
    authserver.configure(refresh_delay=1.0)
    async with (
        httpx.AsyncClient(base_url=a.url, timeout=15, trust_env=False) as to_a,
        httpx.AsyncClient(base_url=b.url, timeout=15, trust_env=False) as to_b,
    ):
        await asyncio.sleep(STALE)
        first = asyncio.create_task(ask(to_a, subject, scope=READ))
        await until(lambda: authserver.stats()["refresh_requests"] >= 1, 5, "the first refresh")
        second = await ask(to_b, subject, scope=both)
        answers = [await first, second]
    assert [r.status_code for r in answers] == [200, 200], [r.text for r in answers]
    assert [r.json()["scope"] for r in answers] == [READ, both]
    grant = no_double_spend(authserver)
    assert (grant["refreshes"], grant["grace_reuses"]) == (2, 0)
    _, record = grant_record(redis_url, subject_keys(config, subject, both))
    assert record is not None
    assert record["status"] == "active"
