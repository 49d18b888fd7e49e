"""Secrets never shown (spec §6.1): Secret masking, settings reprs, log redaction."""

from __future__ import annotations

import json
import logging
import pickle
from collections.abc import Iterator, MutableMapping
from typing import Any

import pytest
import structlog
from structlog.testing import capture_logs

from broker.logs import REDACTED, configure_logging, redact
from broker.secret import Secret
from broker.settings import RedisSettings, Settings, parse_settings
from broker.vault.models import CredentialSettings

VALUE = "hunter2-client-secret"
JWT = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzdmMiLCJleHAiOjE4MDAwMDAwMDB9.c2lnbmF0dXJlLWJ5dGVz"
CALLER_KEY = "tbk_" + "Zx9_" * 11


# -- Secret -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "render",
    [repr, str, format, "{}".format, "{!r}".format, lambda s: f"{s}", lambda s: f"{s!r}", lambda s: "%s" % s],  # noqa: UP031
    ids=["repr", "str", "format", "str.format", "str.format-r", "fstring", "fstring-r", "percent"],
)
def test_secret_rendering_never_contains_the_value(render: Any) -> None:
    assert VALUE not in render(Secret(VALUE, "env:PAY"))


def test_secret_inside_containers_is_masked() -> None:
    secret = Secret(VALUE)
    assert VALUE not in repr([secret]) + repr({"s": secret}) + str((secret,))


def test_secret_reveal_and_source() -> None:
    secret = Secret(VALUE, "env:PAY")
    assert secret.reveal() == VALUE
    assert "env:PAY" in repr(secret)


def test_secret_is_not_picklable() -> None:
    with pytest.raises(TypeError):
        pickle.dumps(Secret(VALUE))


def test_secret_equality_compares_values() -> None:
    assert Secret(VALUE, "a") == Secret(VALUE, "b")
    assert Secret(VALUE) != Secret(VALUE + "x")


def test_credential_settings_repr_hides_the_secret() -> None:
    cred = CredentialSettings(
        name="payments", client_id="my-client", client_secrets=(Secret(VALUE),), token_url="https://a/token"
    )
    assert VALUE not in repr(cred)
    assert "my-client" in repr(cred)


@pytest.mark.parametrize(
    "url",
    ["redis://:hunter2@redis:6379/0", "rediss://default:hunter2@redis:6380/1", "redis://u:hun%40ter2@redis/0"],
)
def test_redis_settings_repr_hides_password(url: str) -> None:
    text = repr(RedisSettings(url=url))
    assert "hunter2" not in text
    assert "hun%40ter2" not in text
    assert "@redis" in text


def test_redis_settings_without_password_shown_as_is() -> None:
    assert "redis://redis:6379/0" in repr(RedisSettings(url="redis://redis:6379/0"))


def test_redis_settings_repr_hides_password_in_query() -> None:
    assert "hunter2" not in repr(RedisSettings(url="redis://redis:6379/0?password=hunter2"))


def test_whole_settings_repr_hides_secrets() -> None:
    data = {
        "redis": {"url": "redis://:redispass@redis:6379/0"},
        "credentials": {
            "payments": {
                "token_url": "https://auth.example.com/token",
                "client_id": "my-client",
                "client_secret": {"env": "PAY"},
            }
        },
    }
    settings = parse_settings(data, {"PAY": VALUE})
    assert isinstance(settings, Settings)
    text = repr(settings)
    assert VALUE not in text
    assert "redispass" not in text


# -- log redaction ----------------------------------------------------------------------------------


def logged(event: str, **fields: Any) -> MutableMapping[str, Any]:
    with capture_logs(processors=[redact]) as logs:
        structlog.get_logger("test").info(event, **fields)
    [entry] = logs
    return entry


@pytest.mark.parametrize(
    "field",
    ["client_secret", "access_token", "refresh_token", "id_token", "password", "caller_key", "Authorization", "secret"],
)
def test_sensitive_fields_are_redacted(field: str) -> None:
    assert logged("upstream.token_request", **{field: "plain-value-123"})[field] == REDACTED


def test_authorization_header_value_is_redacted() -> None:
    entry = logged("request", authorization="Bearer x")
    assert entry["authorization"] == REDACTED


def test_harmless_fields_are_kept() -> None:
    entry = logged(
        "upstream.token_request",
        credential="payments",
        status=200,
        token_type="Bearer",
        token_url="https://auth.example.com/oauth/token",
        scope="urn:axa.claims.read",
        attempt=1,
    )
    assert entry["credential"] == "payments"
    assert entry["status"] == 200
    assert entry["token_type"] == "Bearer"
    assert entry["token_url"] == "https://auth.example.com/oauth/token"
    assert entry["scope"] == "urn:axa.claims.read"
    assert entry["attempt"] == 1


def test_jwt_in_free_text_is_replaced() -> None:
    entry = logged("upstream.odd_answer", detail=f"server said: token {JWT} was issued")
    assert JWT not in entry["detail"]
    assert entry["detail"] == f"server said: token {REDACTED} was issued"


def test_caller_key_in_event_string_is_replaced() -> None:
    entry = logged(f"unknown caller key {CALLER_KEY} presented")
    assert CALLER_KEY not in entry["event"]
    assert entry["event"] == f"unknown caller key {REDACTED} presented"


@pytest.mark.parametrize("header", ["Bearer abc.def-ghi", "Basic YTpi", "bearer abc123"])
def test_credential_headers_in_free_text_are_replaced(header: str) -> None:
    entry = logged("request.headers", detail=f"got Authorization: {header} from client")
    assert header.split()[1] not in entry["detail"]


def test_nested_structures_are_redacted() -> None:
    entry = logged(
        "upstream.request",
        request={
            "headers": {"Authorization": "Basic YTpi", "Accept": "application/json"},
            "form": {"grant_type": "client_credentials", "client_secret": VALUE, "scope": "a b"},
            "notes": [f"prefix {JWT}", "fine"],
        },
    )
    request = entry["request"]
    assert request["headers"] == {"Authorization": REDACTED, "Accept": "application/json"}
    assert request["form"] == {"grant_type": "client_credentials", "client_secret": REDACTED, "scope": "a b"}
    assert request["notes"] == [f"prefix {REDACTED}", "fine"]


@pytest.fixture
def restore_stdlib_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    noisy = {name: logging.getLogger(name).level for name in ("httpx", "httpcore", "uvicorn.access")}
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, lvl in noisy.items():
        logging.getLogger(name).setLevel(lvl)


@pytest.mark.usefixtures("restore_stdlib_logging")
def test_json_log_line_contains_no_secret(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging(json=True)
    structlog.get_logger("broker.test").info(
        f"fetched for {CALLER_KEY}",
        credential="payments",
        client_secret=VALUE,
        access_token=JWT,
        authorization="Bearer plain-bearer-value",
        secret_obj=Secret(VALUE),
        detail=f"token {JWT}",
    )
    err = capsys.readouterr().err
    for leaked in (VALUE, JWT, CALLER_KEY, "plain-bearer-value"):
        assert leaked not in err
    [line] = err.strip().splitlines()
    entry = json.loads(line)
    assert entry["credential"] == "payments"
    assert entry["level"] == "info"
    assert entry["client_secret"] == REDACTED


@pytest.mark.usefixtures("restore_stdlib_logging")
def test_stdlib_logs_go_through_redaction(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging(json=True)
    logging.getLogger("some.library").warning("retrying with Authorization: Bearer %s", "abcdef123456")
    err = capsys.readouterr().err
    assert "abcdef123456" not in err
    assert json.loads(err.strip().splitlines()[-1])["level"] == "warning"
