"""Issue 4, point 3: the authorization server answers something that is not a token response.

Each malformed answer is classified in tests/api/test_errors.py, and the parser is fuzzed in
tests/unit; this adds what only real processes show: after malformed answers nothing is cached
in the shared Redis, and nothing secret reached the broker's log output.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import CALLER_KEYS, READ, WRITE, StartBrokers
from tests.fault.conftest import get_token, keys, log_events
from tests.support import CLIENT_ID, CLIENT_SECRET, AuthServerProcess, token_keys

pytestmark = pytest.mark.slow

MALFORMED: list[dict[str, Any]] = [
    {"fault": "bad_json"},
    {"fault": "html"},
    {"fault": "array"},
    {"fault": "missing_token"},
    {"fault": "empty_token"},
    {"fault": "huge"},
    {"fault": "redirect"},
    # a real signed JWT in an answer that is wrong around it: the token must not leak either
    {"token_type": "mac"},
    {"expires_in": 0},
    {"expires_in": -5},
    {"expires_in": "soon"},
    {"expires_in": 10**9},
]


def assert_invalid(response: httpx.Response) -> None:
    assert response.status_code == 502, response.text
    assert response.json()["error"] == "upstream_invalid_response", response.text


async def test_malformed_answers_cache_nothing_and_leak_nothing_into_the_log(
    write_config: Callable[..., Path], redis_url: str, authserver: AuthServerProcess, start_brokers: StartBrokers
) -> None:
    # a breaker that does not open here: which error code a run of malformed answers ends in is
    # the next test's subject
    config = write_config()
    (broker,) = start_brokers(config, env={"BROKER_UPSTREAM_BREAKER_FAILURES": "100"})
    async with httpx.AsyncClient(base_url=broker.url, timeout=15, trust_env=False) as client:
        valid = await get_token(client, WRITE)
        assert valid.status_code == 200
        valid_token = valid.json()["access_token"]
        cached = [token_keys(config, "payments", WRITE).token]
        assert keys(redis_url, "tb:*:tok:*") == cached

        for case in MALFORMED:
            authserver.reset()
            authserver.configure(**case)
            for _ in range(2):  # the first answer is not remembered: the second asks again
                assert_invalid(await get_token(client, READ))
            assert authserver.token_requests() == 2, case
            assert authserver.stats()["elsewhere_requests"] == 0  # the redirect was not followed
            assert keys(redis_url, "tb:*:tok:*") == cached, f"something was cached after {case}"
    broker.stop()  # every line written, shutdown included

    output = broker.output()
    failures = [event for event in log_events(output, "request") if event["error"] == "upstream_invalid_response"]
    assert len(failures) == 2 * len(MALFORMED)
    assert len(log_events(output, "upstream.token_request")) == 1 + 2 * len(MALFORMED)
    basic = base64.b64encode(f"{CLIENT_ID}:{CLIENT_SECRET}".encode()).decode()
    for secret, what in [
        (CLIENT_SECRET, "the client secret"),
        (basic, "the Basic credentials"),
        (CALLER_KEYS["billing"], "the caller key"),
        (valid_token, "an access token"),
        ("eyJ", "something JWT-shaped"),
    ]:
        assert secret not in output, f"{what} is in the broker's log output"


BREAKER_COUNTS_MALFORMED = (
    "broker/upstream/client.py UpstreamClient.fetch: `except UpstreamInvalidResponse: "
    "breaker.record_failure()` counts malformed answers as transient failures (breaker.py documents "
    "record_failure as 'connect error, timeout, 429 or 5xx'; spec §4.7 opens the breaker on repeated "
    "transient failures), so after breaker_failures malformed answers callers get 503 "
    "upstream_unavailable 'circuit open' with Retry-After instead of 502 upstream_invalid_response."
)


async def test_a_run_of_malformed_answers_stays_upstream_invalid_response(
    write_config: Callable[..., Path], authserver: AuthServerProcess, start_brokers: StartBrokers
) -> None:
    (broker,) = start_brokers(write_config(), workers=1, env={"BROKER_UPSTREAM_BREAKER_FAILURES": "3"})
    authserver.configure(fault="html")  # forever: a token_url that serves a web page
    async with httpx.AsyncClient(base_url=broker.url, timeout=15, trust_env=False) as client:
        responses = [await get_token(client) for _ in range(6)]
    errors = [response.json()["error"] for response in responses]
    assert errors == ["upstream_invalid_response"] * 6, errors
