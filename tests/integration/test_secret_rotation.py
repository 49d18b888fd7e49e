"""Client secret rotation across a fleet (spec §6.5, issue 11 item 5): real `token-broker serve`
processes, the real test authorization server, one real Redis.

`client_secrets = [NEW, OLD]`: the first is used, the next only after `invalid_client`, never
after a timeout or a server error. The one that works is remembered for the whole fleet, so the
authorization server sees one refused request per credential until the secret that works
changes. A fallback in use shows in a metric and in one log line. `{ file = … }` secrets follow
a Kubernetes secret mount's symlink swap without a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import textwrap
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from broker.callers import hash_key
from tests.conftest import CALLER_KEYS, StartBrokers
from tests.fault.conftest import log_events
from tests.integration.test_metrics import _sample
from tests.integration.workers import pin_workers
from tests.support import CLIENT_ID, AuthServerProcess, BrokerProcess
from tests.unit.test_secret_file import KubeSecretMount

pytestmark = pytest.mark.slow

NEW, OLD = "new-rotated-secret-value", "old-secret-value"
SCOPES = [f"urn:rot:s{i}" for i in range(10)]
ENV = {"TB_ROTATION_NEW": NEW, "TB_ROTATION_OLD": OLD}
FALLBACK = "token_broker_client_secret_fallback"
AUTH = {"Authorization": f"Bearer {CALLER_KEYS['billing']}"}


@pytest.fixture
def rotation_config(tmp_path: Path, redis_url: str, authserver: AuthServerProcess) -> Callable[..., Path]:
    """rotation_config(secrets_toml, extra="") → a config whose credential `rotating` has these
    secrets (a TOML value: `client_secret = …` or `client_secrets = […]`)."""

    def write(secrets: str, extra: str = "") -> Path:
        scopes = ", ".join(f'"{s}"' for s in SCOPES)
        text = textwrap.dedent(
            f"""
            [redis]
            url = "{redis_url}"

            [credentials.rotating]
            token_url = "{authserver.token_url}"
            client_id = "{CLIENT_ID}"
            {secrets}
            scopes = [{scopes}]

            [callers.billing]
            key_sha256 = "{hash_key(CALLER_KEYS["billing"])}"
            [callers.billing.grants]
            rotating = [{scopes}]
            """
        ) + textwrap.dedent(extra)
        path = tmp_path / "rotation.toml"
        path.write_text(text, encoding="utf-8")
        return path

    return write


async def get(client: httpx.AsyncClient, scope: str) -> httpx.Response:
    return await client.get("/v1/tokens/rotating", params={"scope": scope}, headers=AUTH)


def refused(authserver: AuthServerProcess) -> list[str | None]:
    return [secret for secret, status in authserver.requests_by_secret() if status == 401]


def fallback_gauge(broker: BrokerProcess) -> float | None:
    page = httpx.get(f"{broker.url}/metrics", timeout=10).text
    if f'{FALLBACK}{{credential="rotating"}}' not in page:
        return None
    return _sample(page, FALLBACK, credential="rotating")


def events(brokers: list[BrokerProcess], name: str) -> list[dict[str, object]]:
    return [event for broker in brokers for event in log_events(broker.output(), name)]


async def test_one_refused_secret_for_the_whole_fleet_then_the_remembered_one(
    rotation_config: Callable[..., Path], authserver: AuthServerProcess, start_brokers: StartBrokers
) -> None:
    authserver.accept_secrets(OLD)  # NEW is not known to the authorization server yet
    config = rotation_config('client_secrets = [{ env = "TB_ROTATION_NEW" }, { env = "TB_ROTATION_OLD" }]')
    brokers = start_brokers(config, count=2, workers=2, env=ENV)
    async with contextlib.AsyncExitStack() as stack:
        workers = [client for broker in brokers for client in (await pin_workers(broker, stack)).values()]
        assert len(workers) == 4

        # 40 concurrent cold requests over 2 brokers x 2 workers: one 401 in all, every one served
        burst = await asyncio.gather(*(get(workers[i % 4], SCOPES[0]) for i in range(40)))
        assert [r.status_code for r in burst] == [200] * 40, [r.text for r in burst if r.status_code != 200][:3]
        assert refused(authserver) == [NEW]

        # every worker fetches a scope set of its own, all at once: each goes straight to OLD
        own = await asyncio.gather(*(get(client, SCOPES[1 + i]) for i, client in enumerate(workers)))
        assert [r.status_code for r in own] == [200] * 4
        assert refused(authserver) == [NEW]
        assert [secret for secret, status in authserver.requests_by_secret() if status == 200] == [OLD] * 5

        # the metric on every replica, and one warning line for the whole fleet
        assert [fallback_gauge(broker) for broker in brokers] == [1, 1]
        [warning] = events(brokers, "upstream.client_secret_fallback")
        assert warning["level"] == "warning"
        assert (warning["credential"], warning["using"], warning["using_from"]) == (
            "rotating",
            "client_secrets[1]",
            "env:TB_ROTATION_OLD",
        )
        assert warning["refused"] == ["client_secrets[0]"]

        # The authorization server learns NEW and keeps OLD: the broker keeps what works.
        authserver.accept_secrets(NEW, OLD)
        assert (await get(workers[0], SCOPES[5])).status_code == 200
        assert authserver.requests_by_secret()[-1] == (OLD, 200)

        # OLD is revoked: one refusal, back to the first, for everyone from then on
        authserver.accept_secrets(NEW)
        assert (await get(workers[0], SCOPES[6])).status_code == 200
        assert authserver.requests_by_secret()[-2:] == [(OLD, 401), (NEW, 200)]
        again = await asyncio.gather(*(get(client, SCOPES[7 + i]) for i, client in enumerate(workers[1:])))
        assert [r.status_code for r in again] == [200] * 3
        assert refused(authserver) == [NEW, OLD]
        assert authserver.requests_by_secret()[-3:] == [(NEW, 200)] * 3
        assert [fallback_gauge(broker) for broker in brokers] == [0, 0]
        [ended] = events(brokers, "upstream.client_secret_fallback_ended")
        assert ended["using"] == "client_secrets[0]"
        assert len(events(brokers, "upstream.client_secret_fallback")) == 1

    for broker in brokers:
        assert NEW not in broker.output()
        assert OLD not in broker.output()


async def test_a_timeout_or_a_server_error_never_tries_the_next_secret(
    rotation_config: Callable[..., Path], authserver: AuthServerProcess, start_brokers: StartBrokers
) -> None:
    authserver.accept_secrets(OLD)
    config = rotation_config(
        'client_secrets = [{ env = "TB_ROTATION_NEW" }, { env = "TB_ROTATION_OLD" }]',
        extra="""
        [upstream]
        timeout_seconds = 0.5
        max_attempts = 2
        breaker_failures = 100
        """,
    )
    (broker,) = start_brokers(config, count=1, workers=1, env=ENV)
    async with httpx.AsyncClient(base_url=broker.url, timeout=30, trust_env=False) as client:
        authserver.configure(fault="503")
        answer = await get(client, SCOPES[0])
        assert (answer.status_code, answer.json()["error"]) == (503, "upstream_unavailable")
        authserver.configure(fault="none", delay=1.0)  # beyond timeout_seconds
        answer = await get(client, SCOPES[1])
        assert (answer.status_code, answer.json()["error"]) == (503, "upstream_unavailable")
        assert [secret for secret, _ in authserver.requests_by_secret()] == [NEW] * 4  # 2 attempts each

        # the same credential, once the server answers: the refusal of NEW is what moves it on
        authserver.configure(delay=0)
        assert (await get(client, SCOPES[2])).status_code == 200
        assert authserver.requests_by_secret()[-2:] == [(NEW, 401), (OLD, 200)]


async def test_a_file_secret_follows_a_kubernetes_secret_mount_without_a_restart(
    rotation_config: Callable[..., Path], authserver: AuthServerProcess, start_brokers: StartBrokers, tmp_path: Path
) -> None:
    mounted = tmp_path / "mount"
    mounted.mkdir()
    mount = KubeSecretMount(mounted, "client-secret", f"{OLD}\n")
    authserver.accept_secrets(OLD)
    (broker,) = start_brokers(rotation_config(f'client_secret = {{ file = "{mount.path}" }}'), count=1, workers=2)
    async with contextlib.AsyncExitStack() as stack:
        workers = list((await pin_workers(broker, stack)).values())
        assert [(await get(client, SCOPES[i])).status_code for i, client in enumerate(workers)] == [200, 200]

        # the secret is rotated: a new file behind the swapped ..data link, and the server with it
        mount.update(f"{NEW}\n")
        authserver.accept_secrets(NEW)
        await asyncio.sleep(1.1)  # a worker looks at the file at most once a second
        assert [(await get(client, SCOPES[2 + i])).status_code for i, client in enumerate(workers)] == [200, 200]
        assert authserver.requests_by_secret() == [(OLD, 200), (OLD, 200), (NEW, 200), (NEW, 200)]

        # a broken update (an empty file) keeps the value that works, and says so once per worker
        mount.update("")
        await asyncio.sleep(1.1)
        for i, client in enumerate(workers):
            assert (await get(client, SCOPES[4 + i])).status_code == 200
            assert (await get(client, SCOPES[6 + i])).status_code == 200
        assert authserver.requests_by_secret()[4:] == [(NEW, 200)] * 4
    assert len(log_events(broker.output(), "secret.file_changed")) == 2
    unusable = log_events(broker.output(), "secret.file_unusable")
    assert [event["reason"] for event in unusable] == ["the file is empty"] * 2
    assert NEW not in broker.output()
    assert OLD not in broker.output()
