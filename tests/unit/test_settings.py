"""Config validation (spec §2): one problem line per bad key, env overrides, secrets by reference."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from broker.callers import hash_key
from broker.errors import ConfigError
from broker.settings import Settings, load_settings, parse_settings

SECRET = "s3cr3t-payments-value"
ENV = {"PAY_SECRET": SECRET}
HASH_A = hash_key("tbk_" + "a" * 43)
HASH_B = hash_key("tbk_" + "b" * 43)
READ, WRITE = "urn:axa.claims.read", "urn:axa.claims.write"

BASE: dict[str, Any] = {
    "credentials": {
        "payments": {
            "token_url": "https://auth.example.com/oauth/token",
            "client_id": "my-client",
            "client_secret": {"env": "PAY_SECRET"},
            "scopes": [READ, WRITE],
            "default_scopes": [READ],
        },
        "ledger": {
            "issuer": "https://auth.example.com",
            "client_id": "ledger-client",
            "client_secret": {"env": "PAY_SECRET"},
            "auth_method": "client_secret_post",
            "scopes": [READ],
        },
    },
    "callers": {"billing": {"key_sha256": HASH_A, "grants": {"payments": [READ]}}},
}


def config(**sections: Any) -> dict[str, Any]:
    data = copy.deepcopy(BASE)
    data.update(copy.deepcopy(sections))
    return data


def problems(data: dict[str, Any], env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_settings(data, ENV if env is None else env)
    assert str(info.value) == "\n".join(info.value.problems)
    return info.value.problems


def only_problem(data: dict[str, Any], key: str, env: dict[str, str] | None = None) -> str:
    found = problems(data, env)
    assert len(found) == 1, found
    assert found[0].startswith(f"{key}: "), found
    return found[0]


def test_valid_config() -> None:
    settings = parse_settings(config(), ENV)
    payments = settings.credentials["payments"]
    assert payments.client_secret.reveal() == SECRET
    assert payments.scopes == (READ, WRITE)
    assert payments.default_scopes == (READ,)
    assert settings.credentials["ledger"].auth_method == "client_secret_post"
    assert settings.callers["billing"].grants == {"payments": frozenset({READ})}
    assert settings.warnings == ()


def test_unknown_credential_in_grant() -> None:
    data = config()
    data["callers"]["billing"]["grants"]["nope"] = [READ]
    assert "nope" in only_problem(data, "callers.billing.grants.nope")


@pytest.mark.parametrize("url", ["ftp://auth.example.com/token", "auth.example.com/token", "https://"])
def test_bad_token_url(url: str) -> None:
    data = config()
    data["credentials"]["payments"]["token_url"] = url
    only_problem(data, "credentials.payments.token_url")


def test_bad_issuer_url() -> None:
    data = config()
    data["credentials"]["ledger"]["issuer"] = "not a url"
    only_problem(data, "credentials.ledger.issuer")


def test_bad_redis_url() -> None:
    only_problem(config(redis={"url": "http://redis:6379"}), "redis.url")


def test_bad_public_url() -> None:
    only_problem(config(server={"public_url": "token-broker.internal"}), "server.public_url")


@pytest.mark.parametrize("env", [{}, {"PAY_SECRET": ""}], ids=["unset", "empty"])
def test_missing_secret_env_var(env: dict[str, str]) -> None:
    data = config()
    del data["credentials"]["ledger"]
    assert "PAY_SECRET" in only_problem(data, "credentials.payments.client_secret", env)


def test_grant_scope_not_allowed_by_credential() -> None:
    data = config()
    data["callers"]["billing"]["grants"]["ledger"] = [READ, WRITE]
    assert WRITE in only_problem(data, "callers.billing.grants.ledger")


def test_default_scopes_outside_scopes() -> None:
    data = config()
    data["credentials"]["ledger"]["default_scopes"] = [WRITE]
    assert WRITE in only_problem(data, "credentials.ledger.default_scopes")


@pytest.mark.parametrize("case", ["both", "neither"])
def test_exactly_one_of_issuer_and_token_url(case: str) -> None:
    data = config()
    cred = data["credentials"]["payments"]
    if case == "both":
        cred["issuer"] = "https://auth.example.com"
    else:
        del cred["token_url"]
    line = only_problem(data, "credentials.payments")
    assert "issuer" in line
    assert "token_url" in line


def test_unknown_auth_method() -> None:
    data = config()
    data["credentials"]["payments"]["auth_method"] = "client_secret_jwt"
    assert "client_secret_jwt" in only_problem(data, "credentials.payments.auth_method")


@pytest.mark.parametrize(
    ("method", "needs"), [("private_key_jwt", "private_key"), ("tls_client_auth", "tls_client_cert")]
)
def test_a_keyless_auth_method_takes_no_client_secret(method: str, needs: str) -> None:
    """tests/unit/test_keyless_settings.py has the rest: the key and certificate files."""
    data = config()
    data["credentials"]["payments"]["auth_method"] = method
    found = problems(data)
    assert found == [
        f'credentials.payments.client_secret: is not used with auth_method = "{method}": it uses '
        + ("a private key" if method == "private_key_jwt" else "a TLS client certificate"),
        f'credentials.payments.{needs}: is required for auth_method = "{method}"',
    ]


@pytest.mark.parametrize(
    ("where", "key"),
    [
        ((), "bogus"),
        (("server",), "server.bogus"),
        (("redis",), "redis.bogus"),
        (("cache",), "cache.bogus"),
        (("upstream",), "upstream.bogus"),
        (("credentials", "payments"), "credentials.payments.bogus"),
        (("callers", "billing"), "callers.billing.bogus"),
    ],
)
def test_unknown_key(where: tuple[str, ...], key: str) -> None:
    data = config()
    table = data
    for name in where:
        table = table.setdefault(name, {})
    table["bogus"] = 1
    [line] = problems(data)
    assert line.split(": ", 1)[0] in (key, f"config.{key}")
    assert "unknown" in line


@pytest.mark.parametrize("digest", ["abc123", HASH_A[:-1], "z" * 64, HASH_A + "0", "", 12])
def test_bad_key_sha256(digest: Any) -> None:
    data = config()
    data["callers"]["billing"]["key_sha256"] = digest
    found = problems(data)
    assert found
    assert all(line.startswith("callers.billing.key_sha256: ") for line in found)


def test_uppercase_key_sha256_is_accepted_and_normalised() -> None:
    data = config()
    data["callers"]["billing"]["key_sha256"] = HASH_A.upper()
    assert parse_settings(data, ENV).callers["billing"].key_sha256 == HASH_A


def test_duplicate_caller_key_hash() -> None:
    data = config()
    data["callers"]["reporting"] = {"key_sha256": HASH_A, "grants": {}}
    line = only_problem(data, "callers.reporting.key_sha256")
    assert "billing" in line


@pytest.mark.parametrize("refresh_at", [[0.9, 0.5], [0, 0.5], [0.5, 1], [0.5], [0.1, 0.2, 0.3], "soon", ["a", "b"]])
def test_bad_refresh_at(refresh_at: Any) -> None:
    only_problem(config(cache={"refresh_at": refresh_at}), "cache.refresh_at")


def test_several_problems_are_all_reported_one_line_each() -> None:
    data = config(server={"port": "eighty"}, cache={"refresh_at": [0.9, 0.1]})
    data["credentials"]["payments"]["auth_method"] = "magic"
    data["callers"]["billing"]["key_sha256"] = "nothex"
    data["callers"]["billing"]["grants"]["nope"] = [READ]
    found = problems(data)
    keys = sorted(line.split(": ", 1)[0] for line in found)
    assert keys == [
        "cache.refresh_at",
        "callers.billing.grants.nope",
        "callers.billing.key_sha256",
        "credentials.payments.auth_method",
        "server.port",
    ]
    assert all("\n" not in line for line in found)


def test_literal_secret_is_a_warning_not_an_error() -> None:
    data = config()
    data["credentials"]["payments"]["client_secret"] = "literal-hunter2"
    settings = parse_settings(data, ENV)
    assert settings.credentials["payments"].client_secret.reveal() == "literal-hunter2"
    [warning] = settings.warnings
    assert warning.startswith("credentials.payments.client_secret: ")
    assert "literal-hunter2" not in warning


def test_secret_from_file_is_read_and_stripped(tmp_path: Path) -> None:
    path = tmp_path / "payments.secret"
    path.write_text("  file-secret-value\n\n", encoding="utf-8")
    data = config()
    data["credentials"]["payments"]["client_secret"] = {"file": str(path)}
    secret = parse_settings(data, ENV).credentials["payments"].client_secret
    assert secret.reveal() == "file-secret-value"
    assert secret.source == f"file:{path}"


@pytest.mark.parametrize("content", [None, "  \n"], ids=["missing", "blank"])
def test_secret_file_missing_or_blank(tmp_path: Path, content: str | None) -> None:
    path = tmp_path / "payments.secret"
    if content is not None:
        path.write_text(content, encoding="utf-8")
    data = config()
    data["credentials"]["payments"]["client_secret"] = {"file": str(path)}
    assert str(path) in only_problem(data, "credentials.payments.client_secret")


@pytest.mark.parametrize("ref", [{"vault": "x"}, {"env": "A", "file": "/b"}, {"env": ""}, 42])
def test_malformed_secret_reference(ref: Any) -> None:
    data = config()
    data["credentials"]["payments"]["client_secret"] = ref
    only_problem(data, "credentials.payments.client_secret")


def test_env_overrides_are_applied_and_typed() -> None:
    data = config(server={"port": 8080}, redis={"url": "redis://file:6379/0"}, cache={"skew_seconds": 30})
    env = {
        **ENV,
        "BROKER_SERVER_PORT": "9090",
        "BROKER_REDIS_URL": "redis://override:6380/1",
        "BROKER_CACHE_SKEW_SECONDS": "12.5",
        "BROKER_CACHE_REFRESH_AT": "0.5,0.7",
    }
    settings = parse_settings(data, env)
    assert settings.server.port == 9090
    assert settings.redis.url == "redis://override:6380/1"
    assert settings.cache.skew_seconds == 12.5
    assert settings.cache.refresh_at == (0.5, 0.7)


@pytest.mark.parametrize(
    ("name", "value", "key"),
    [
        ("BROKER_SERVER_PORT", "eighty", "server.port"),
        ("BROKER_SERVER_PORT", "70000", "server.port"),
        ("BROKER_SERVER_PORT", "80.5", "server.port"),
        ("BROKER_CACHE_SKEW_SECONDS", "abc", "cache.skew_seconds"),
        ("BROKER_CACHE_SKEW_SECONDS", "-1", "cache.skew_seconds"),
        ("BROKER_CACHE_REFRESH_AT", "0.7", "cache.refresh_at"),
        ("BROKER_CACHE_REFRESH_AT", "0.8,0.2", "cache.refresh_at"),
        ("BROKER_REDIS_URL", "memcached://x", "redis.url"),
    ],
)
def test_bad_env_override_names_the_key(name: str, value: str, key: str) -> None:
    only_problem(config(), key, {**ENV, name: value})


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


VALID_TOML = f"""
[credentials.payments]
token_url = "https://auth.example.com/oauth/token"
client_id = "my-client"
client_secret = {{ env = "PAY_SECRET" }}
scopes = ["{READ}"]

[callers.billing]
key_sha256 = "{HASH_A}"
[callers.billing.grants]
payments = ["{READ}"]
"""


def test_load_settings_reads_file_and_applies_env(tmp_path: Path) -> None:
    path = write(tmp_path / "broker.toml", VALID_TOML)
    settings = load_settings(path, {**ENV, "BROKER_SERVER_PORT": "9191"})
    assert isinstance(settings, Settings)
    assert settings.server.port == 9191
    assert settings.credentials["payments"].client_secret.reveal() == SECRET


def test_load_settings_uses_broker_config_env(tmp_path: Path) -> None:
    path = write(tmp_path / "broker.toml", VALID_TOML)
    assert "payments" in load_settings(None, {**ENV, "BROKER_CONFIG": str(path)}).credentials


def test_invalid_toml(tmp_path: Path) -> None:
    path = write(tmp_path / "broker.toml", "[server\nport = ")
    with pytest.raises(ConfigError) as info:
        load_settings(path, ENV)
    [line] = info.value.problems
    assert line.startswith("config: ")
    assert str(path) in line


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    with pytest.raises(ConfigError) as info:
        load_settings(path, ENV)
    [line] = info.value.problems
    assert line.startswith("config: ")
    assert str(path) in line


def test_no_config_given() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(None, ENV)
    assert len(info.value.problems) == 1


def test_non_utf8_config_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "broker.toml"
    path.write_bytes(b'[server]\nhost = "caf\xe9"\n')
    with pytest.raises(ConfigError):
        load_settings(path, ENV)


def test_huge_integer_is_a_config_problem() -> None:
    only_problem(config(cache={"skew_seconds": 10**400}), "cache.skew_seconds")


def test_the_embedded_redis_binary_variable_is_not_a_config_override() -> None:
    """Defect: BROKER_REDIS_SERVER, which the README gives for choosing the embedded redis-server
    binary, was read as an override of a [redis] key `server` and stopped `serve` and `dev` with
    "redis.server: unknown key"."""
    settings = parse_settings(config(), {**ENV, "BROKER_REDIS_SERVER": "/usr/bin/redis-server"})
    assert settings.redis.url is None
    only_problem(config(), "redis.servr", {**ENV, "BROKER_REDIS_SERVR": "x"})  # a typo still is one


def test_the_key_prefix_separates_deployments_and_is_checked() -> None:
    assert parse_settings(config(), ENV).redis.key_prefix == "tb"
    assert parse_settings(config(), {**ENV, "BROKER_REDIS_KEY_PREFIX": "tb-staging"}).redis.key_prefix == "tb-staging"
    for bad in ("tb:x", "tb{x}", "x" * 33):
        only_problem(config(redis={"key_prefix": bad}), "redis.key_prefix")


@pytest.mark.parametrize("name", ["pay{ments}", "pay/ments", "pay ments", "x" * 65])
def test_credential_and_caller_names_are_url_and_hash_tag_safe(name: str) -> None:
    """A name with braces would break the per-credential hash tag of every key; one with a slash
    or space could never be reached at /v1/tokens/{credential}."""
    data = config()
    data["credentials"][name] = data["credentials"]["payments"]
    found = problems(data)
    assert any(p.startswith(f"credentials.{name}: a credential name is") for p in found), found


# -- client_secrets: rotation (spec §6.5) -----------------------------------------------------------

ROTATION_ENV = {**ENV, "NEW_SECRET": "new-value", "OLD_SECRET": "old-value"}


def rotating(secrets: Any, **more: Any) -> dict[str, Any]:
    data = config()
    del data["credentials"]["payments"]["client_secret"]
    data["credentials"]["payments"]["client_secrets"] = secrets
    data["credentials"]["payments"].update(more)
    return data


def test_client_secrets_are_read_in_order_and_the_first_is_the_client_secret() -> None:
    data = rotating([{"env": "NEW_SECRET"}, {"env": "OLD_SECRET"}])
    payments = parse_settings(data, ROTATION_ENV).credentials["payments"]
    assert [s.reveal() for s in payments.client_secrets] == ["new-value", "old-value"]
    assert [s.source for s in payments.client_secrets] == ["env:NEW_SECRET", "env:OLD_SECRET"]
    assert payments.client_secret.reveal() == "new-value"
    assert "new-value" not in repr(payments)
    assert "old-value" not in repr(payments)


def test_client_secrets_do_not_shape_the_cache_keys() -> None:
    """Rotating a secret must not turn every cached token into a miss."""
    single = parse_settings(config(), ROTATION_ENV).credentials["payments"]
    rotated = parse_settings(rotating([{"env": "NEW_SECRET"}, {"env": "PAY_SECRET"}]), ROTATION_ENV)
    assert rotated.credentials["payments"].shape == single.shape


@pytest.mark.parametrize(
    ("secrets", "key", "words"),
    [
        ([], "credentials.payments.client_secrets", "1 to 8 secrets, got 0"),
        ([{"env": "NEW_SECRET"}] * 9, "credentials.payments.client_secrets", "1 to 8 secrets, got 9"),
        ({"env": "NEW_SECRET"}, "credentials.payments.client_secrets", "must be a list"),
        ("new-value", "credentials.payments.client_secrets", "must be a list"),
        ([{"env": "NEW_SECRET"}, {"env": "UNSET_SECRET"}], "credentials.payments.client_secrets[1]", "UNSET_SECRET"),
        ([{"vault": "x"}, {"env": "OLD_SECRET"}], "credentials.payments.client_secrets[0]", "must be { env"),
        ([{"env": "NEW_SECRET"}, None], "credentials.payments.client_secrets[1]", "must be { env"),
        ([{"env": "NEW_SECRET"}, ""], "credentials.payments.client_secrets[1]", "must not be empty"),
        (
            [{"env": "NEW_SECRET"}, {"env": "OLD_SECRET"}, {"env": "NEW_SECRET"}],
            "credentials.payments.client_secrets[2]",
            "is the same secret as client_secrets[0]",
        ),
    ],
    ids=["empty", "nine", "table", "string", "unset-env", "bad-ref", "null", "blank", "twice"],
)
def test_bad_client_secrets_name_the_item(secrets: Any, key: str, words: str) -> None:
    line = only_problem(rotating(secrets), key, ROTATION_ENV)
    assert words in line
    assert "new-value" not in line
    assert "old-value" not in line


def test_every_bad_item_of_client_secrets_is_its_own_line() -> None:
    found = problems(rotating([{"env": "UNSET_A"}, {"env": "OLD_SECRET"}, {"file": ""}]), ROTATION_ENV)
    assert [line.split(": ", 1)[0] for line in found] == [
        "credentials.payments.client_secrets[0]",
        "credentials.payments.client_secrets[2]",
    ]


def test_client_secret_and_client_secrets_together_is_a_problem() -> None:
    data = rotating([{"env": "NEW_SECRET"}], client_secret={"env": "OLD_SECRET"})
    assert "exactly one of client_secret or client_secrets" in only_problem(data, "credentials.payments", ROTATION_ENV)


def test_neither_client_secret_nor_client_secrets_is_a_problem() -> None:
    data = config()
    del data["credentials"]["payments"]["client_secret"]
    assert "is required" in only_problem(data, "credentials.payments.client_secret")


def test_a_literal_in_client_secrets_is_warned_about_by_position() -> None:
    settings = parse_settings(rotating([{"env": "NEW_SECRET"}, "literal-hunter2"]), ROTATION_ENV)
    [warning] = settings.warnings
    assert warning.startswith("credentials.payments.client_secrets[1]: ")
    assert "literal-hunter2" not in warning


def test_public_url_is_the_facades_issuer_base_without_a_trailing_slash() -> None:
    """The facade's issuers are public_url + /oauth2/NAME, compared byte for byte by clients."""
    assert parse_settings(config(), ENV).server.public_url is None
    for given in ("https://tb.internal", "https://tb.internal/", "https://tb.internal//"):
        assert parse_settings(config(server={"public_url": given}), ENV).server.public_url == "https://tb.internal"
    prefixed = parse_settings(config(server={"public_url": "https://gw.internal/broker/"}), ENV)
    assert prefixed.server.public_url == "https://gw.internal/broker"
    env = {**ENV, "BROKER_SERVER_PUBLIC_URL": "http://127.0.0.1:9090"}
    assert parse_settings(config(), env).server.public_url == "http://127.0.0.1:9090"
    for bad in ("https://tb.internal/?x=1", "https://tb.internal/#top"):
        only_problem(config(server={"public_url": bad}), "server.public_url")
    only_problem(config(server={"public_url": "tb.internal"}), "server.public_url")


def test_facade_min_ttl_seconds() -> None:
    assert parse_settings(config(), ENV).facade.min_ttl_seconds == 120
    assert parse_settings(config(facade={"min_ttl_seconds": 0}), ENV).facade.min_ttl_seconds == 0
    env = {**ENV, "BROKER_FACADE_MIN_TTL_SECONDS": "45"}
    assert parse_settings(config(), env).facade.min_ttl_seconds == 45
    only_problem(config(facade={"min_ttl_seconds": -1}), "facade.min_ttl_seconds")
    only_problem(config(facade={"min_ttl_seconds": "soon"}), "facade.min_ttl_seconds")
    only_problem(config(facade={"min_ttl": 5}), "facade.min_ttl")
