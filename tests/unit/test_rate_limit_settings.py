"""Rate limit keys of a caller (spec §6.6): both optional, a burst needs a rate and defaults to one
second's worth, positive numbers within bounds, one problem line per bad key. The admin API reads
them through the same function (tests/api/test_rate_limits.py checks its words)."""

from __future__ import annotations

from typing import Any

import pytest

from broker.settings import parse_settings
from broker.vault.models import RateLimit
from tests.unit.test_settings import ENV, config, only_problem, problems

PER_SECOND = "callers.billing.rate_limit_per_second"
BURST = "callers.billing.rate_limit_burst"


def with_limits(**limits: Any) -> dict[str, Any]:
    data = config()
    data["callers"]["billing"].update(limits)
    return data


def test_a_caller_without_rate_limit_keys_is_unlimited() -> None:
    assert parse_settings(config(), ENV).callers["billing"].rate_limit is None


@pytest.mark.parametrize(
    ("limits", "expected"),
    [
        ({"rate_limit_per_second": 10, "rate_limit_burst": 20}, RateLimit(10.0, 20)),
        ({"rate_limit_per_second": 10}, RateLimit(10.0, 10)),  # one second's worth
        ({"rate_limit_per_second": 2.5}, RateLimit(2.5, 3)),
        ({"rate_limit_per_second": 0.5}, RateLimit(0.5, 1)),  # at least one request
        ({"rate_limit_per_second": 0.001, "rate_limit_burst": 1}, RateLimit(0.001, 1)),
        ({"rate_limit_per_second": 1_000_000}, RateLimit(1e6, 1_000_000)),
        ({"rate_limit_per_second": "5", "rate_limit_burst": "7"}, RateLimit(5.0, 7)),
    ],
)
def test_rate_and_burst(limits: dict[str, Any], expected: RateLimit) -> None:
    assert parse_settings(with_limits(**limits), ENV).callers["billing"].rate_limit == expected


def test_a_burst_alone_is_refused() -> None:
    line = only_problem(with_limits(rate_limit_burst=10), BURST)
    assert line == f"{BURST}: needs rate_limit_per_second: a burst alone limits nothing"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (0, "must be 0.001 to 1000000 token requests per second, got 0"),
        (-1, "must be 0.001 to 1000000 token requests per second, got -1"),
        (0.0001, "must be 0.001 to 1000000 token requests per second, got 0.0001"),
        (2_000_000, "must be 0.001 to 1000000 token requests per second, got 2000000"),
        ("fast", "must be a number (0.001 to 1000000), got 'fast'"),
        (True, "must be a number (0.001 to 1000000), got True"),
        (float("nan"), "must be a number (0.001 to 1000000), got nan"),
        (float("inf"), "must be a number (0.001 to 1000000), got inf"),
        ([10], "must be a number (0.001 to 1000000), got [10]"),
    ],
)
def test_bad_rate(value: Any, message: str) -> None:
    assert only_problem(with_limits(rate_limit_per_second=value, rate_limit_burst=5), PER_SECOND) == (
        f"{PER_SECOND}: {message}"
    )


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (0, "must be 1 to 1000000 requests, got 0"),
        (-3, "must be 1 to 1000000 requests, got -3"),
        (10_000_000, "must be 1 to 1000000 requests, got 10000000"),
        (2.5, "must be a whole number of requests, got 2.5"),
        ("ten", "must be a whole number of requests, got 'ten'"),
        (False, "must be a whole number of requests, got False"),
    ],
)
def test_bad_burst(value: Any, message: str) -> None:
    assert only_problem(with_limits(rate_limit_per_second=10, rate_limit_burst=value), BURST) == f"{BURST}: {message}"


def test_both_bad_are_two_lines() -> None:
    found = problems(with_limits(rate_limit_per_second=0, rate_limit_burst=0))
    assert [line.split(": ")[0] for line in found] == [PER_SECOND, BURST]
