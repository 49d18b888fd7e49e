"""`token-broker token CREDENTIAL` (issue 12) as scripts run it: `python -m broker token …` in a
subprocess against a real broker process. Exit codes: 0 ok, 1 the broker refused (or could not be
reached), 2 usage or config; the caller key comes only from an environment variable."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.conftest import ADMIN, CALLER_KEYS, READ, WRITE, StartBrokers
from tests.support import REPO_ROOT, BrokerProcess, free_port

pytestmark = pytest.mark.slow


def token_command(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("TOKEN_BROKER_", "BROKER_"))}
    return subprocess.run(
        [sys.executable, "-m", "broker", "token", *args],
        cwd=REPO_ROOT,
        env={**clean, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def billing(**more: str) -> dict[str, str]:
    return {"TOKEN_BROKER_CALLER_KEY": CALLER_KEYS["billing"], **more}


def assert_clean(result: subprocess.CompletedProcess[str]) -> None:
    output = result.stdout + result.stderr
    assert "Traceback" not in output
    for key in CALLER_KEYS.values():
        assert key not in output


@pytest.fixture
def broker(start_brokers: StartBrokers, write_config: Callable[..., Path]) -> BrokerProcess:
    return start_brokers(write_config(), workers=1)[0]


def direct(broker: BrokerProcess, caller: str = "billing", **params: str) -> httpx.Response:
    headers = {"Authorization": f"Bearer {CALLER_KEYS[caller]}"}
    return httpx.get(f"{broker.url}/v1/tokens/payments", params=params, headers=headers, timeout=15)


def test_prints_the_token_or_the_json_answer(broker: BrokerProcess) -> None:
    expected = direct(broker, scope=WRITE).json()["access_token"]

    plain = token_command("payments", "--scope", WRITE, "--url", broker.url, env=billing())
    assert (plain.returncode, plain.stderr) == (0, "")
    assert plain.stdout == expected + "\n"

    answer = token_command(
        "payments", "--scope", WRITE, "--json", "--min-ttl", "60", env=billing(TOKEN_BROKER_URL=broker.url)
    )
    assert answer.returncode == 0, answer.stderr
    body = json.loads(answer.stdout)
    assert set(body) == {"access_token", "token_type", "expires_in", "expires_at", "scope"}
    assert (body["access_token"], body["scope"], body["token_type"]) == (expected, WRITE, "Bearer")

    # no --scope: the credential's default scopes; the key from another variable
    other = token_command(
        "payments",
        "--url",
        broker.url,
        "--caller-key-env",
        "PAYMENTS_KEY",
        env={"PAYMENTS_KEY": CALLER_KEYS["billing"]},
    )
    assert other.returncode == 0, other.stderr
    assert other.stdout.strip() == direct(broker).json()["access_token"]
    assert direct(broker).json()["scope"] == READ


@pytest.mark.parametrize(
    ("args", "caller_key", "error"),
    [
        (["payments"], "tbk_" + "x" * 43, "invalid_token"),
        (["payments"], CALLER_KEYS["reporting"], "access_denied"),
        (["no-such-credential"], CALLER_KEYS["billing"], "access_denied"),
        (["payments", "--scope", ADMIN], CALLER_KEYS["billing"], "insufficient_scope"),
        (["payments", "--scope", 'urn:"quoted"'], CALLER_KEYS["billing"], "invalid_request"),
    ],
)
def test_a_refusal_exits_1_with_the_brokers_sentence(
    broker: BrokerProcess, args: list[str], caller_key: str, error: str
) -> None:
    result = token_command(*args, "--url", broker.url, env={"TOKEN_BROKER_CALLER_KEY": caller_key})
    params = {"scope": args[2]} if len(args) > 1 else {}
    said = httpx.get(
        f"{broker.url}/v1/tokens/{args[0]}", params=params, headers={"Authorization": f"Bearer {caller_key}"}
    ).json()
    assert said["error"] == error
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr == f"error: {said['error_description']} ({error})\n"
    assert_clean(result)


def test_an_unreachable_broker_exits_1() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    result = token_command("payments", "--url", url, env=billing())
    assert result.returncode == 1
    assert result.stderr.startswith(f"error: The broker at {url} could not be reached: ")
    assert result.stderr.endswith(" (broker_unreachable)\n")
    assert_clean(result)


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["payments"], {}, "error: no caller key: set the environment variable TOKEN_BROKER_CALLER_KEY"),
        (
            ["payments", "--caller-key-env", "MY_KEY"],
            billing(),
            "error: no caller key: set the environment variable MY_KEY",
        ),
        (["payments", "--url", "ftp://broker"], billing(), "error: The broker URL must be http:// or https://"),
        (["payments"], billing(TOKEN_BROKER_URL="not a url"), "error: The broker URL must be http:// or https://"),
        (["payments", "--min-ttl", "-5"], billing(), "argument --min-ttl: must be a non-negative integer"),
        (
            ["payments", "--caller-key", CALLER_KEYS["billing"]],
            {},
            "error: the caller key is never taken from an argument",
        ),
        (
            [f"--caller-key={CALLER_KEYS['billing']}", "payments"],
            {},
            "error: the caller key is never taken from an argument",
        ),
        (["payments", "--caller-key-env", CALLER_KEYS["billing"]], {}, "error: --caller-key-env takes the name of an"),
        ([], billing(), "the following arguments are required: credential"),
    ],
)
def test_usage_and_config_errors_exit_2(args: list[str], env: dict[str, str], message: str) -> None:
    result = token_command(*args, env=env)
    assert result.returncode == 2
    assert message in result.stderr
    assert result.stdout == ""
    assert_clean(result)
