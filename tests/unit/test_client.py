"""broker.client on its own: what it imports, its surface, its checks of its arguments, and how it
reads the broker's answers (httpx MockTransport stands in for the broker only in these parser
tests; the behaviour is tested against a real broker in tests/integration/test_client_sdk.py)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import httpx
import pytest

import broker.client
from broker.client import BrokerAuth, BrokerClientError, BrokerRefused, BrokerUnavailable

KEY = "tbk_" + "k" * 43


def test_the_sdk_imports_nothing_of_the_server_side() -> None:
    """A caller installs the distribution and uses only the client: no Redis, Starlette, settings."""
    code = (
        "import sys, broker.client; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "{'redis', 'starlette', 'uvicorn', 'structlog', 'prometheus_client', 'joserfc'} "
        "or m in {'broker.settings', 'broker.api', 'broker.tokens', 'broker.store'}))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_all_is_sorted_and_complete() -> None:
    # sorted the way ruff's RUF022 keeps it: constants first, then classes
    assert broker.client.__all__ == sorted(broker.client.__all__, key=lambda name: (not name.isupper(), name))
    public = {name for name in vars(broker.client) if not name.startswith("_")}
    assert set(broker.client.__all__) == public
    for name in broker.client.__all__:
        assert getattr(broker.client, name) is not None


def test_url_and_key_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOKEN_BROKER_URL", "https://broker.internal/")
    monkeypatch.setenv("TOKEN_BROKER_CALLER_KEY", KEY)
    auth = BrokerAuth("payments", ["b", "a"])
    assert auth.url == "https://broker.internal"
    assert auth.scope == "b a"
    monkeypatch.delenv("TOKEN_BROKER_URL")
    assert BrokerAuth("payments").url == "http://127.0.0.1:8080"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"url": "ftp://broker"}, "The broker URL must be http:// or https:// with a host"),
        ({"url": "http://"}, "The broker URL must be http:// or https:// with a host"),
        ({"caller_key": "tbk_ has spaces"}, "The caller key must be printable ASCII without spaces."),
        ({"caller_key_env": "NOT_SET_ANYWHERE"}, "No caller key: set the environment variable NOT_SET_ANYWHERE."),
        ({"min_ttl": -1}, "min_ttl must be ≥ 0"),
    ],
)
def test_bad_arguments_are_refused_with_a_sentence(
    monkeypatch: pytest.MonkeyPatch, options: dict[str, object], message: str
) -> None:
    monkeypatch.delenv("NOT_SET_ANYWHERE", raising=False)
    arguments: dict[str, object] = {"caller_key": KEY, **options}
    if "caller_key_env" in options:
        del arguments["caller_key"]
    with pytest.raises(ValueError, match="^" + message.replace("(", r"\(").replace(".", r"\.")) as caught:
        BrokerAuth("payments", **arguments)  # type: ignore[arg-type]
    assert "has spaces" not in str(caught.value)


def test_the_caller_key_is_in_no_repr(monkeypatch: pytest.MonkeyPatch) -> None:
    auth = BrokerAuth("payments", "urn:x", caller_key=KEY)
    assert KEY not in repr(auth)
    assert KEY not in str(vars(auth))
    assert repr(auth) == "BrokerAuth('payments', scope='urn:x', url='http://127.0.0.1:8080')"


def against(handler: Callable[[httpx.Request], httpx.Response], **options: object) -> BrokerAuth:
    """A BrokerAuth whose broker is `handler` (parser tests only)."""
    client = httpx.Client(transport=httpx.MockTransport(handler))
    return BrokerAuth("payments", caller_key=KEY, client=client, **options)  # type: ignore[arg-type]


def answer(
    status: int, body: object = None, headers: dict[str, str] | None = None, text: str | None = None
) -> Callable[[httpx.Request], httpx.Response]:
    def handler(request: httpx.Request) -> httpx.Response:
        if text is not None:
            return httpx.Response(status, text=text, headers=headers)
        return httpx.Response(status, json=body, headers=headers)

    return handler


@pytest.mark.parametrize(
    ("handler", "kind", "status", "error", "retry_after"),
    [
        (
            answer(429, {"error": "rate_limited", "error_description": "Slow down."}, {"Retry-After": "3"}),
            BrokerRefused,
            429,
            "rate_limited",
            3.0,
        ),
        (
            answer(503, {"error": "temporarily_unavailable", "error_description": "Busy."}, {"Retry-After": "1"}),
            BrokerUnavailable,
            503,
            "temporarily_unavailable",
            1.0,
        ),
        (answer(502, text="<html>bad gateway</html>"), BrokerUnavailable, 502, "http_502", None),
        (answer(404, {"detail": "nope"}), BrokerRefused, 404, "http_404", None),
        (answer(200, text="not json"), BrokerClientError, 200, "invalid_response", None),
        (answer(200, {"access_token": "t", "expires_in": "60"}), BrokerClientError, 200, "invalid_response", None),
        (answer(200, {"access_token": "", "expires_in": 60}), BrokerClientError, 200, "invalid_response", None),
        (answer(302, text=""), BrokerClientError, 302, "http_302", None),
    ],
)
def test_answers_other_than_a_token_become_the_exception_of_their_family(
    handler: Callable[[httpx.Request], httpx.Response],
    kind: type[BrokerClientError],
    status: int,
    error: str,
    retry_after: float | None,
) -> None:
    with against(handler) as auth, pytest.raises(BrokerClientError) as caught:
        auth.token()
    exc = caught.value
    assert type(exc) is kind
    assert (exc.status, exc.error, exc.retry_after) == (status, error, retry_after)
    assert str(exc).endswith(f" ({error})")
    assert KEY not in str(exc)


def test_retry_after_as_an_http_date() -> None:
    when = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    handler = answer(503, {"error": "upstream_unavailable", "error_description": "Down."}, {"Retry-After": when})
    with against(handler) as auth, pytest.raises(BrokerUnavailable) as caught:
        auth.token()
    assert caught.value.retry_after is not None
    assert 25 <= caught.value.retry_after <= 30


def test_an_unreachable_broker_is_unavailable_and_the_message_has_no_key() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("[Errno 111] Connection refused", request=request)

    with against(refuse) as auth, pytest.raises(BrokerUnavailable) as caught:
        auth.token()
    assert (caught.value.status, caught.value.error) == (None, "broker_unreachable")
    assert str(caught.value) == (
        "The broker at http://127.0.0.1:8080 could not be reached: [Errno 111] Connection refused. (broker_unreachable)"
    )


def test_a_short_lived_token_is_used_for_half_of_its_time_left() -> None:
    """The margin (30 s by default) is capped at half the time left, or a 20 s token would be
    fetched again on every request."""
    asked: list[httpx.Request] = []
    now = [0.0]

    def handler(request: httpx.Request) -> httpx.Response:
        asked.append(request)
        return httpx.Response(200, json={"access_token": f"t{len(asked)}", "token_type": "Bearer", "expires_in": 20})

    with against(handler, clock=lambda: now[0]) as auth:
        assert auth.token().access_token == "t1"
        now[0] = 9.9
        assert auth.token().access_token == "t1"
        now[0] = 10.0
        assert auth.token().access_token == "t2"
    assert [r.url.params.get("min_ttl") for r in asked] == ["30", "30"]
    assert asked[0].headers["authorization"] == f"Bearer {KEY}"
