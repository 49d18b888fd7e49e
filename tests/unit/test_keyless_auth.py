"""The keyless client authentication strategies (spec §6.7) on their own: the client assertion
of private_key_jwt (RFC 7523 §2.2, §3), the key and certificate files followed without a
restart, and the per-certificate HTTP clients of tls_client_auth (RFC 8705 §2.1)."""

from __future__ import annotations

import ssl
from pathlib import Path

import httpx
import pytest
from joserfc import jwt
from joserfc.jwk import ECKey, RSAKey
from structlog.testing import capture_logs

from broker.client_cert import ClientCertificate
from broker.client_key import ClientKey
from broker.secret import Secret
from broker.secret_file import FileSecret
from broker.upstream.auth import ASSERTION_TYPE, client_auth_for
from broker.upstream.mtls import MutualTlsClients
from broker.vault.models import CredentialSettings
from tests.support_keyless import Pki, SigningKeyPair, ec_key, rsa_key
from tests.unit.test_secret_file import KubeSecretMount

TOKEN_URL = "https://auth.example.com/oauth/token"
NOW = 1_900_000_000.7


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


def jwt_credential(key: ClientKey) -> CredentialSettings:
    return CredentialSettings(
        name="payments",
        client_id="my-client",
        client_secrets=(),
        token_url=TOKEN_URL,
        auth_method="private_key_jwt",
        private_key=key,
    )


def signed(credential: CredentialSettings, endpoint: str = TOKEN_URL) -> tuple[dict[str, str], dict[str, str]]:
    form: dict[str, str] = {"grant_type": "client_credentials"}
    headers: dict[str, str] = {}
    client_auth_for("private_key_jwt").apply(credential, None, form, headers, endpoint=endpoint, now=NOW)
    return form, headers


def verified(form: dict[str, str], public: RSAKey | ECKey, alg: str) -> jwt.Token:
    return jwt.decode(form["client_assertion"], public, algorithms=[alg])


@pytest.mark.parametrize(
    ("pair", "alg"), [(rsa_key(), "RS256"), (rsa_key(), "PS256"), (ec_key(), "ES256")], ids=["rs", "ps", "es"]
)
def test_the_assertion_names_the_client_the_endpoint_and_lives_a_minute(pair: SigningKeyPair, alg: str) -> None:
    credential = jwt_credential(ClientKey(Secret(pair.private_pem), algorithm=alg, key_id="k1"))
    form, headers = signed(credential, "https://mtls.auth.example.com/token")
    public = type(pair.key).import_key(pair.public_jwk())
    token = verified(form, public, alg)
    assert token.header == {"alg": alg, "typ": "JWT", "kid": "k1"}
    claims = token.claims
    assert (claims["iss"], claims["sub"], claims["aud"]) == (
        "my-client",
        "my-client",
        "https://mtls.auth.example.com/token",
    )
    assert (claims["iat"], claims["exp"]) == (int(NOW), int(NOW) + 60)
    assert form["client_id"] == "my-client"
    assert form["client_assertion_type"] == ASSERTION_TYPE
    assert headers == {}
    assert "client_secret" not in form


def test_every_request_gets_a_new_jti() -> None:
    pair = rsa_key()
    credential = jwt_credential(ClientKey(Secret(pair.private_pem)))
    jtis = {verified(signed(credential)[0], pair.key, "RS256").claims["jti"] for _ in range(50)}
    assert len(jtis) == 50


def test_tls_client_auth_names_the_client_in_the_form() -> None:
    credential = CredentialSettings(
        name="payments", client_id="my-client", client_secrets=(), token_url=TOKEN_URL, auth_method="tls_client_auth"
    )
    form: dict[str, str] = {}
    headers: dict[str, str] = {}
    client_auth_for("tls_client_auth").apply(credential, None, form, headers, endpoint=TOKEN_URL, now=NOW)
    assert (form, headers) == ({"client_id": "my-client"}, {})


def test_a_key_file_swapped_is_signed_with_and_a_broken_one_keeps_the_last(tmp_path: Path) -> None:
    first, second = rsa_key(), ec_key()
    mount = KubeSecretMount(tmp_path, "signing.key", first.private_pem)
    key = ClientKey(FileSecret(mount.path, check_every=0))
    assert key.current().algorithm == "RS256"

    mount.update(second.private_jwk)  # the algorithm follows the key when none is configured
    assert key.current().algorithm == "ES256"
    assert key.current().key == ECKey.import_key(second.key.as_dict(private=True))

    with capture_logs() as logs:
        mount.update("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----")
        for _ in range(3):
            assert key.current().algorithm == "ES256"
    [warning] = [e for e in logs if e["event"] == "secret.private_key_unusable"]
    assert warning["source"] == f"file:{mount.path}"
    assert "PRIVATE KEY" not in str(warning)


def test_a_configured_algorithm_refuses_a_swapped_key_that_does_not_fit(tmp_path: Path) -> None:
    mount = KubeSecretMount(tmp_path, "signing.key", rsa_key().private_pem)
    key = ClientKey(FileSecret(mount.path, check_every=0), algorithm="PS256")
    before = key.current()
    mount.update(ec_key().private_pem)
    with capture_logs() as logs:
        assert key.current() is before
    reasons = [e["reason"] for e in logs if e["event"] == "secret.private_key_unusable"]
    assert reasons == ["signing_alg PS256 needs an RSA key, and private_key is an EC key"]


def test_certificate_files_swapped_make_a_new_context_and_a_broken_pair_keeps_the_last(
    pki: Pki, tmp_path: Path
) -> None:
    one, two = pki.client_cert("one"), pki.client_cert("two")
    mount = KubeSecretMount(tmp_path, "tls.pem", (one.key_pem + one.cert_pem).decode())
    certificate = ClientCertificate(mount.path, check_every=0)
    version, context = certificate.current()
    assert certificate.subject == one.subject
    assert certificate.current() == (version, context)

    mount.update((two.key_pem + two.cert_pem).decode())
    new_version, new_context = certificate.current()
    assert new_version != version
    assert new_context is not context
    assert certificate.subject == two.subject

    with capture_logs() as logs:
        mount.update((one.key_pem + two.cert_pem).decode())  # a key of another certificate
        assert certificate.current() == (new_version, new_context)
        assert certificate.current() == (new_version, new_context)
    [warning] = [e for e in logs if e["event"] == "secret.tls_client_cert_unusable"]
    assert "does not match" in warning["reason"]


async def test_one_http_client_per_certificate_replaced_when_its_files_change(pki: Pki, tmp_path: Path) -> None:
    one, two = pki.client_cert("one"), pki.client_cert("two")
    mount = KubeSecretMount(tmp_path, "tls.pem", (one.key_pem + one.cert_pem).decode())
    certificate = ClientCertificate(mount.path, check_every=0)
    other = ClientCertificate(two.cert_file, two.key_file)
    made: list[tuple[ssl.SSLContext, httpx.AsyncClient]] = []

    def make(context: ssl.SSLContext) -> httpx.AsyncClient:
        made.append((context, httpx.AsyncClient(verify=context)))
        return made[-1][1]

    clients = MutualTlsClients(make)
    async with clients.client(certificate) as first, clients.client(certificate) as again:
        assert first is again
        async with clients.client(other) as theirs:
            assert theirs is not first
        mount.update((two.key_pem + two.cert_pem).decode())
        async with clients.client(certificate) as renewed:
            assert renewed is not first
            assert not first.is_closed  # still in use by this request: closed when it is done
    assert first.is_closed
    assert len(made) == 3
    assert len(clients) == 2
    await clients.aclose()
    assert all(http.is_closed for _, http in made)
