"""`rediss://` with a private CA (spec §7.4): the broker app against a TLS-only redis-server.

Certificates come from trustme; the server listens on a TLS port only (`--port 0`). With the right
CA the broker serves and caches tokens; with a wrong CA it never connects (readiness stays 503, the
error names the certificate check) and nothing reaches that Redis: no silent fallback to insecure.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from broker import redis_client
from broker.api import create_app
from broker.errors import StoreUnavailable
from broker.settings import Settings, load_settings
from broker.store import Store
from tests.conftest import READ, auth, config_text, token_body
from tests.support import AuthServerProcess, token_keys
from tests.topology.conftest import TLSFiles
from tests.topology.servers import RedisProcess

# The first test may build a TLS-capable redis-server (tests/topology/tls_binary.py, about 25 s).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

TOKENS = "/v1/tokens/payments"


def tls_settings(tmp_path: Path, url: str, authserver: AuthServerProcess, **tls: Path) -> Settings:
    """Config file with `url`; the TLS keys come in as environment overrides (BROKER_REDIS_TLS_*)."""
    path = tmp_path / "broker.toml"
    path.write_text(config_text(url, authserver), encoding="utf-8")
    env = {**os.environ, **{f"BROKER_REDIS_{name.upper()}": str(value) for name, value in tls.items()}}
    return load_settings(path, env=env)


def app_client(settings: Settings) -> TestClient:
    return TestClient(create_app(settings), raise_server_exceptions=False)


def wait_ready(client: TestClient, seconds: float) -> dict[str, str]:
    """The last /readyz body, polling until it says ok or `seconds` pass."""
    deadline = time.monotonic() + seconds
    while True:
        response = client.get("/readyz")
        body: dict[str, str] = response.json()
        if (response.status_code == 200 and body.get("status") == "ok") or time.monotonic() > deadline:
            return body
        time.sleep(0.1)


def url_of(server: RedisProcess) -> str:
    return f"rediss://127.0.0.1:{server.port}/0"


def test_tls_with_private_ca_serves_and_caches(
    tmp_path: Path, tls_redis: RedisProcess, tls_files: TLSFiles, authserver: AuthServerProcess
) -> None:
    """Defect (hardening item 21): the TLS tests skipped on every machine without a TLS-capable
    redis-server; one is found or built now, and none is a failure (tests/topology/tls_binary.py)."""
    settings = tls_settings(tmp_path, url_of(tls_redis), authserver, tls_ca_file=tls_files.ca)
    assert settings.redis.tls_ca_file == str(tls_files.ca)
    with app_client(settings) as client:
        assert wait_ready(client, 5.0) == {"status": "ok", "redis": "ok"}
        first = token_body(client.get(TOKENS, params={"scope": READ}, headers=auth()))
        second = token_body(client.get(TOKENS, params={"scope": READ}, headers=auth()))
        assert second["access_token"] == first["access_token"]
        assert authserver.token_requests() == 1
    with tls_redis.client() as direct:  # the entry really is in the TLS server, with a TTL
        key = token_keys(settings, "payments", READ).token
        assert direct.get(key) is not None
        assert 0 < direct.pttl(key) <= 3600 * 1000


def test_tls_with_wrong_ca_never_connects(
    tmp_path: Path, tls_redis: RedisProcess, tls_files: TLSFiles, authserver: AuthServerProcess
) -> None:
    settings = tls_settings(tmp_path, url_of(tls_redis), authserver, tls_ca_file=tls_files.other_ca)
    with app_client(settings) as client:
        body = wait_ready(client, 2.0)
        assert client.get("/readyz").status_code == 503, body
        assert body == {"status": "starting", "redis": "unknown"}
        # Availability still wins (spec §4.3): a token is fetched in-process, but nothing is cached
        # in a Redis whose certificate could not be verified.
        token_body(client.get(TOKENS, params={"scope": READ}, headers=auth()))
    with tls_redis.client() as direct:
        assert direct.dbsize() == 0

    async def probe() -> BaseException | None:
        redis = redis_client.connect(url_of(tls_redis), tls_ca_file=str(tls_files.other_ca))
        try:
            await Store(redis).ping()
        except StoreUnavailable as exc:
            return exc.__cause__
        finally:
            await redis.aclose()
        return None

    cause = asyncio.run(probe())
    assert cause is not None, "a server certificate from another CA was accepted"
    assert "CERTIFICATE_VERIFY_FAILED" in str(cause), str(cause)


def test_tls_client_certificate(
    tmp_path: Path, tls_redis_client_auth: RedisProcess, tls_files: TLSFiles, authserver: AuthServerProcess
) -> None:
    url = url_of(tls_redis_client_auth)
    with_cert = tls_settings(tmp_path, url, authserver, tls_ca_file=tls_files.ca, tls_cert_file=tls_files.client_cert)
    with app_client(with_cert) as client:
        assert wait_ready(client, 5.0) == {"status": "ok", "redis": "ok"}
        token_body(client.get(TOKENS, params={"scope": READ}, headers=auth()))
    with tls_redis_client_auth.client() as direct:
        assert direct.exists(token_keys(with_cert, "payments", READ).token)

    without_cert = tls_settings(tmp_path, url, authserver, tls_ca_file=tls_files.ca)
    with app_client(without_cert) as client:
        assert wait_ready(client, 2.0)["status"] == "starting"  # the server wants a client certificate
