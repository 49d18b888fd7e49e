"""Fixtures for the Redis topology tests (spec §7.4): TLS, Sentinel and Cluster servers started here.

Every server is a real redis-server process in a temporary directory of its own, stopped when the
test ends, pass or fail. A test is skipped (with the reason) only when no redis-server can be found.
The TLS tests need one built with TLS: found or built by tests/topology/tls_binary.py, and a failure
when there is none (unless BROKER_TEST_ALLOW_NO_TLS=1), so that CI proves TLS on every machine.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme

from tests.topology.servers import RedisProcess, redis_binary, servers
from tests.topology.tls_binary import tls_redis_binary

__all__ = ["TLSFiles"]


@dataclass(frozen=True)
class TLSFiles:
    ca: Path  # the CA that signed the server's and the client's certificates
    server_cert: Path
    server_key: Path
    client_cert: Path  # a client certificate (with its key in the same file) from the same CA
    other_ca: Path  # a CA that signed nothing here: trusting it must not reach the server


@pytest.fixture
def tls_files(tmp_path: Path) -> TLSFiles:
    ca, other = trustme.CA(), trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    client = ca.issue_cert("token-broker@test")
    files = TLSFiles(
        ca=tmp_path / "ca.pem",
        server_cert=tmp_path / "server.pem",
        server_key=tmp_path / "server.key",
        client_cert=tmp_path / "client.pem",
        other_ca=tmp_path / "other-ca.pem",
    )
    ca.cert_pem.write_to_path(str(files.ca))
    server.cert_chain_pems[0].write_to_path(str(files.server_cert))
    server.private_key_pem.write_to_path(str(files.server_key))
    client.private_key_and_cert_chain_pem.write_to_path(str(files.client_cert))
    other.cert_pem.write_to_path(str(files.other_ca))
    return files


@pytest.fixture(scope="session")
def tls_binary() -> str:
    """A redis-server built with TLS (built once if need be); no skip without BROKER_TEST_ALLOW_NO_TLS=1."""
    return tls_redis_binary()


def tls_server(files: TLSFiles, binary: str, *, client_certs: bool) -> RedisProcess:
    """A TLS-only redis-server (no plaintext port) with the trustme server certificate."""
    server = RedisProcess(
        [
            "--port",
            "0",
            "--tls-port",
            "0",  # replaced below, once the port is known
            "--tls-cert-file",
            str(files.server_cert),
            "--tls-key-file",
            str(files.server_key),
            "--tls-ca-cert-file",
            str(files.ca),
            "--tls-auth-clients",
            "yes" if client_certs else "no",
        ],
        client_kwargs={
            "ssl": True,
            "ssl_ca_certs": str(files.ca),
            **({"ssl_certfile": str(files.client_cert)} if client_certs else {}),
        },
        name="tls",
        binary=binary,
    )
    server.args[3] = str(server.port)
    try:
        return server.start()
    except BaseException:
        server.cleanup()
        raise


@pytest.fixture
def tls_redis(tls_files: TLSFiles, tls_binary: str) -> Iterator[RedisProcess]:
    server = tls_server(tls_files, tls_binary, client_certs=False)
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def tls_redis_client_auth(tls_files: TLSFiles, tls_binary: str) -> Iterator[RedisProcess]:
    server = tls_server(tls_files, tls_binary, client_certs=True)
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def redis_processes() -> Iterator[list[RedisProcess]]:
    """Append RedisProcess objects (started or not): all are stopped and removed after the test."""
    redis_binary()
    with servers() as started:
        yield started
