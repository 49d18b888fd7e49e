"""The authorization code grant's exchanges with a keyless credential (spec §5.3, §5.5, §6.7):
the code exchange, a refresh and the revocation authenticate like client credentials requests,
each assertion for the endpoint it is sent to, each certificate request through the mTLS
aliases. The real upstream client against the real test authorization server (HTTP and HTTPS)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from broker.client_cert import ClientCertificate
from broker.client_key import ClientKey
from broker.secret import Secret
from broker.settings import UpstreamSettings
from broker.upstream.client import UpstreamClient
from broker.upstream.exchange import new_http_client
from broker.upstream.users import UserGrants
from broker.vault.models import CredentialSettings
from tests.support import CLIENT_ID, AuthServerProcess
from tests.support_keyless import Pki, rsa_key
from tests.test_authserver_code import REDIRECT, log_in

SETTINGS = UpstreamSettings(max_attempts=1)
KEY = rsa_key()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def mtls_server(pki: Pki) -> Iterator[AuthServerProcess]:
    with AuthServerProcess(tls=pki.tls) as server:
        yield server


@pytest.fixture
def server(mtls_server: AuthServerProcess) -> AuthServerProcess:
    mtls_server.reset()
    mtls_server.register_redirect_uris(REDIRECT)
    return mtls_server


@pytest.fixture
async def upstream() -> AsyncIterator[UpstreamClient]:
    async with new_http_client(SETTINGS) as http:
        client = UpstreamClient(http, SETTINGS, default_expires_in=300)
        yield client
        await client.aclose()


def credential(server: AuthServerProcess, **auth: object) -> CredentialSettings:
    return CredentialSettings(
        name="users",
        client_id=CLIENT_ID,
        client_secrets=(),
        issuer=server.url,
        grant="authorization_code",
        **auth,  # type: ignore[arg-type]
    )


async def sign_in_refresh_and_log_out(
    server: AuthServerProcess, upstream: UpstreamClient, cred: CredentialSettings
) -> None:
    grants = UserGrants(upstream)
    login = log_in(server, scope="openid urn:a urn:b")
    deadline = time.monotonic() + 10
    tokens = await grants.exchange_code(cred, login.code, REDIRECT, login.verifier, "urn:a urn:b", deadline)
    assert tokens.refresh_token is not None
    refreshed = await grants.refresh(cred, tokens.refresh_token, "urn:a", deadline)
    assert refreshed.refresh_token is not None
    assert await grants.revoke(cred, refreshed.refresh_token, deadline) is True
    [revocation] = server.stats()["revocations"]
    assert (revocation["client_id"], revocation["token_type"]) == (CLIENT_ID, "refresh_token")


async def test_private_key_jwt_signs_the_exchange_the_refresh_and_the_revocation(
    server: AuthServerProcess, upstream: UpstreamClient
) -> None:
    """The revocation endpoint checks the assertion's aud against its own URL: an assertion made
    for the token endpoint would be refused there."""
    server.register_keyless(jwks=KEY.jwks())
    cred = credential(server, auth_method="private_key_jwt", private_key=ClientKey(Secret(KEY.private_pem)))
    await sign_in_refresh_and_log_out(server, upstream, cred)
    records = server.stats()["requests"]
    assert [(r["form"]["grant_type"], r["auth"], r["status"]) for r in records] == [
        ("authorization_code", "private_key_jwt", 200),
        ("refresh_token", "private_key_jwt", 200),
    ]


async def test_tls_client_auth_goes_through_the_mtls_aliases(
    server: AuthServerProcess, upstream: UpstreamClient, pki: Pki, tmp_path: Path
) -> None:
    cert = pki.client_cert("users-client")
    server.register_keyless(tls_client_auth_subject_dn=cert.subject)
    certificate = ClientCertificate(cert.cert_file, cert.key_file, pki.tls.server_ca_file)
    cred = credential(server, auth_method="tls_client_auth", tls_client=certificate)
    await sign_in_refresh_and_log_out(server, upstream, cred)
    records = server.stats()["requests"]
    assert {(r["auth"], r["url"], r["client_cert"]) for r in records} == {
        ("tls_client_auth", f"{server.tls_url}/oauth/token", cert.subject)
    }
    assert len(upstream.mtls) == 1  # one client for the certificate, kept for the next request
