"""`[redis] url` forms and TLS keys (spec §2, §7.4): parsing, config validation, redaction.

No server needed: these check what a URL means and what the config check says about it. The
clients are built (nothing connects until the first command) to see which topology each URL gives.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from broker import redis_client
from broker.errors import ConfigError
from broker.redis_client import RedisTarget, RedisURLError, parse_url, redact_url
from broker.settings import RedisSettings, parse_settings


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://redis:6379/0", RedisTarget(kind="standalone", tls=False)),
        ("rediss://:pw@redis:6380/2", RedisTarget(kind="standalone", tls=True, db=2, password="pw")),
        ("unix:///run/redis.sock?db=3", RedisTarget(kind="standalone", tls=False, db=3)),
        (
            "redis+sentinel://:pw@s1:26379,s2/mymaster",
            RedisTarget(
                kind="sentinel", tls=False, nodes=(("s1", 26379), ("s2", 26379)), service="mymaster", password="pw"
            ),
        ),
        (
            "rediss+sentinel://u:p%40ss@[::1]:5000/svc/4?sentinel_password=sp",
            RedisTarget(
                kind="sentinel",
                tls=True,
                nodes=(("::1", 5000),),
                service="svc",
                db=4,
                username="u",
                password="p@ss",
                sentinel_password="sp",
            ),
        ),
        (
            "redis+cluster://h1:7000,h2:7001",
            RedisTarget(kind="cluster", tls=False, nodes=(("h1", 7000), ("h2", 7001))),
        ),
        ("rediss+cluster://h1/0", RedisTarget(kind="cluster", tls=True, nodes=(("h1", 6379),))),
    ],
)
def test_url_forms(url: str, expected: RedisTarget) -> None:
    assert parse_url(url) == expected


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://redis:6379", "must start with one of redis://, rediss://, unix://, redis+sentinel://"),
        ("redis+sentinel://s1:26379", "must name the master"),
        ("redis+sentinel://s1:26379/svc/x", "database number that is not a number"),
        ("redis+sentinel://s1:26379/svc/1/2", "too many path parts"),
        ("redis+sentinel://s1:nope/svc", "invalid port"),
        ("redis+sentinel://s1,,s2/svc", "empty host"),
        ("redis+cluster://h1:7000/1", "other than 0"),
        ("redis+cluster://h1:7000?db=1", "unknown query parameter"),
        ("redis:///0", "must name a host"),
        ("redis://[::1/0", "not a valid URL"),
        (":hunter2@redis:6379", "got 'no scheme'"),
        ("redis://redis:99999/0", "not a valid Redis URL"),
    ],
)
def test_bad_urls(url: str, message: str) -> None:
    with pytest.raises(RedisURLError, match=message.replace("+", r"\+")):
        parse_url(url)


def test_target_repr_hides_passwords() -> None:
    target = parse_url("redis+sentinel://:hunter2@s1/svc?sentinel_password=sekrit")
    assert "hunter2" not in repr(target)
    assert "sekrit" not in repr(target)


def test_redact_url_multi_host_and_sentinel_password() -> None:
    url = "rediss+sentinel://user:hunter2@s1:26379,s2:26379/svc?sentinel_password=sekrit"
    redacted = redact_url(url)
    assert redacted is not None
    assert "hunter2" not in redacted
    assert "sekrit" not in redacted
    assert redacted.startswith("rediss+sentinel://user:***@s1:26379,s2:26379/svc")


def _problems(redis_table: dict[str, object]) -> list[str]:
    try:
        parse_settings({"redis": redis_table}, env={})
    except ConfigError as exc:
        return list(exc.problems)
    return []


def test_config_accepts_every_topology(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    for url in ("redis+sentinel://s1,s2/mymaster/0", "redis+cluster://h1:7000,h2:7001", "unix:///tmp/r.sock"):
        assert _problems({"url": url}) == []
    assert _problems({"url": "rediss+cluster://h1:7000", "tls_ca_file": str(ca)}) == []
    settings = parse_settings({"redis": {"url": "rediss://r:6380/0"}}, env={"BROKER_REDIS_TLS_CA_FILE": str(ca)})
    assert settings.redis == RedisSettings(url="rediss://r:6380/0", tls_ca_file=str(ca))


def test_config_problems_name_the_key(tmp_path: Path) -> None:
    assert _problems({"url": "http://redis"}) == [
        "redis.url: must start with one of redis://, rediss://, unix://, redis+sentinel://, rediss+sentinel://,"
        " redis+cluster://, rediss+cluster://; got 'http://'"
    ]
    assert _problems({"url": "redis+sentinel://s1"}) == [
        "redis.url: must name the master after the hosts: redis+sentinel://host:26379/<service_name>[/db]"
    ]
    missing = tmp_path / "missing.pem"
    assert _problems({"url": "rediss://r", "tls_ca_file": str(missing)}) == [
        f"redis.tls_ca_file: no such file: {missing}"
    ]
    present = tmp_path / "ca.pem"
    present.write_text("x")
    assert _problems({"url": "redis://r", "tls_ca_file": str(present)}) == [
        "redis.tls_ca_file: is only used with a TLS URL (rediss://…), not with redis://"
    ]
    assert _problems({"url": "rediss://r", "tls_key_file": str(present)}) == [
        "redis.tls_key_file: needs redis.tls_cert_file (the client certificate it belongs to)"
    ]
    assert _problems({"url": "rediss://r", "tls_ca_file": 3}) == ["redis.tls_ca_file: must be a string, got 3"]


def test_repr_of_settings_hides_the_password() -> None:
    settings = RedisSettings(url="redis://:hunter2@r:6379/0", tls_ca_file="/ca.pem")
    assert "hunter2" not in repr(settings)
    assert "/ca.pem" in repr(settings)


def test_connect_builds_the_client_for_each_topology() -> None:
    async def build() -> list[str]:
        kinds = []
        for url in ("redis://127.0.0.1:1/0", "redis+sentinel://127.0.0.1:1/svc", "redis+cluster://127.0.0.1:1"):
            client = redis_client.connect(url, max_connections=7)
            kinds.append(type(client).__name__)
            if isinstance(client, aioredis.Redis):
                pool = client.connection_pool
                assert isinstance(pool, aioredis.BlockingConnectionPool)  # waits for a connection
                assert pool.max_connections == 7
            await client.aclose()
        return kinds

    assert asyncio.run(build()) == ["Redis", "_SentinelRedis", "_BoundedCluster"]
