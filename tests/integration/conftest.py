"""Fixtures for the multi-process tests: real `token-broker serve` processes, stopped afterwards."""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.support import BrokerProcess

StartBrokers = Callable[..., list[BrokerProcess]]
_FAILED = pytest.StashKey[bool]()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Remember whether the test itself failed, so fixtures can show the brokers' logs."""
    report = yield
    if report.when == "call":
        item.stash[_FAILED] = report.failed
    return report


@pytest.fixture
def start_brokers(request: pytest.FixtureRequest) -> Iterator[StartBrokers]:
    """start_brokers(config, count=1, workers=2, env=None) → started BrokerProcess list (in parallel)."""
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
        broker.stop()
        if failed:
            lines = [line for line in broker.output().splitlines() if '"event": "request"' not in line]
            tail = "\n".join(lines[-40:])
            print(f"\n--- broker on port {broker.port}, last log lines (request lines left out) ---\n{tail}")
        broker.log_path.unlink(missing_ok=True)
