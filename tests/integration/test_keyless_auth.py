"""Keyless client authentication (spec §6.7, issue 13 items 1 and 2): real `token-broker serve`
processes against the real test authorization server, which verifies what they send
(tests/authserver_keyless.py): private_key_jwt assertions against the registered public keys,
tls_client_auth certificates on its HTTPS listener against a test CA (trustme).

A key or certificate the authorization server refuses is `upstream_rejected` with its error; a
key or certificate file swapped at run time is used without a restart.
"""

from __future__ import annotations

import base64
import json
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from broker.callers import hash_key
from broker.secret_file import CHECK_EVERY
from tests.conftest import CALLER_KEYS, StartBrokers
from tests.support import AuthServerProcess
from tests.support_keyless import Pki, ec_key, rsa_key
from tests.unit.test_secret_file import KubeSecretMount

pytestmark = pytest.mark.slow

AUTH = {"Authorization": f"Bearer {CALLER_KEYS['billing']}"}
SCOPES = [f"urn:keyless:s{i}" for i in range(6)]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def mtls_server(pki: Pki) -> Iterator[AuthServerProcess]:
    """The test authorization server with its HTTPS listener (client certificates)."""
    with AuthServerProcess(tls=pki.tls) as server:
        yield server


@pytest.fixture
def server(mtls_server: AuthServerProcess) -> AuthServerProcess:
    mtls_server.reset()
    return mtls_server


@pytest.fixture
def write_config(tmp_path: Path, redis_url: str) -> Callable[[dict[str, str]], Path]:
    """write_config({name: the credential's table body}) → a config whose caller billing may ask
    every credential for SCOPES."""

    def write(credentials: dict[str, str]) -> Path:
        scopes = ", ".join(f'"{s}"' for s in SCOPES)
        tables = "".join(
            f"\n[credentials.{name}]\n{textwrap.dedent(body).strip()}\nscopes = [{scopes}]\n"
            for name, body in credentials.items()
        )
        grants = "".join(f"{name} = [{scopes}]\n" for name in credentials)
        text = (
            f'[redis]\nurl = "{redis_url}"\n{tables}\n'
            f'[callers.billing]\nkey_sha256 = "{hash_key(CALLER_KEYS["billing"])}"\n[callers.billing.grants]\n{grants}'
        )
        path = tmp_path / "keyless.toml"
        path.write_text(text, encoding="utf-8")
        return path

    return write


def get_token(broker_url: str, credential: str, scope: str) -> httpx.Response:
    return httpx.get(f"{broker_url}/v1/tokens/{credential}", params={"scope": scope}, headers=AUTH, timeout=30)


def assertion_of(record: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The (header, claims) of the client assertion a recorded token request carried (unverified:
    the authorization server verified it)."""
    header, claims, _ = record["form"]["client_assertion"].split(".")
    decode = lambda part: json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))  # noqa: E731
    return decode(header), decode(claims)


def key_file(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def rejected(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 502, response.text
    body: dict[str, Any] = response.json()
    assert body["error"] == "upstream_rejected"
    return body


# -- private_key_jwt ------------------------------------------------------------------------------


def test_private_key_jwt_with_each_algorithm(
    server: AuthServerProcess,
    write_config: Callable[[dict[str, str]], Path],
    start_brokers: StartBrokers,
    tmp_path: Path,
) -> None:
    rs, es = rsa_key(), ec_key()
    server.register_keyless("jwt-rs", jwks=rs.jwks(kid="rs-1"))
    server.register_keyless("jwt-ps", jwks=rs.jwks(kid="rs-1"))
    server.register_keyless("jwt-es", jwks=es.jwks())
    config = write_config(
        {
            "rs": f"""
                token_url = "{server.token_url}"
                client_id = "jwt-rs"
                auth_method = "private_key_jwt"
                private_key = {{ file = "{key_file(tmp_path, "rs.pem", rs.private_pem)}" }}
                key_id = "rs-1"
            """,
            "ps": f"""
                issuer = "{server.url}"
                client_id = "jwt-ps"
                auth_method = "private_key_jwt"
                private_key = {{ file = "{key_file(tmp_path, "rs.jwk", rs.private_jwk)}" }}
                signing_alg = "PS256"
                key_id = "rs-1"
            """,
            "es": f"""
                token_url = "{server.token_url}"
                client_id = "jwt-es"
                auth_method = "private_key_jwt"
                private_key = {{ file = "{key_file(tmp_path, "es.jwk", es.private_jwk)}" }}
            """,
        }
    )
    [broker] = start_brokers(config, workers=1)
    for name in ("rs", "ps", "es"):
        response = get_token(broker.url, name, SCOPES[0])
        assert response.status_code == 200, (name, response.text)

    records = server.stats()["requests"]
    assert [(r["client_id"], r["auth"], r["status"]) for r in records] == [
        ("jwt-rs", "private_key_jwt", 200),
        ("jwt-ps", "private_key_jwt", 200),
        ("jwt-es", "private_key_jwt", 200),
    ]
    assertions = [assertion_of(r) for r in records]
    assert [h["alg"] for h, _ in assertions] == ["RS256", "PS256", "ES256"]
    assert [h.get("kid") for h, _ in assertions] == ["rs-1", "rs-1", None]
    for (_, claims), client in zip(assertions, ("jwt-rs", "jwt-ps", "jwt-es"), strict=True):
        assert claims["iss"] == claims["sub"] == client
        assert claims["aud"] == server.token_url  # the discovered one for "ps"
        assert claims["exp"] - claims["iat"] == 60
    assert len({claims["jti"] for _, claims in assertions}) == 3
    assert all("client_secret" not in r["form"] and r["secret"] is None for r in records)


def test_a_retried_request_never_reuses_a_jti(
    server: AuthServerProcess,
    write_config: Callable[[dict[str, str]], Path],
    start_brokers: StartBrokers,
    tmp_path: Path,
) -> None:
    """The assertion is signed per attempt: the authorization server would refuse a jti it has
    seen (a replay); here the first attempt meets a 503 before it is looked at, so the request
    log shows what was sent."""
    key = rsa_key()
    server.register_keyless("jwt-client", jwks=key.jwks())
    config = write_config(
        {
            "signed": f"""
                token_url = "{server.token_url}"
                client_id = "jwt-client"
                auth_method = "private_key_jwt"
                private_key = {{ file = "{key_file(tmp_path, "key.pem", key.private_pem)}" }}
            """
        }
    )
    [broker] = start_brokers(config, workers=1)
    server.configure(fault="503", fault_count=2)
    assert get_token(broker.url, "signed", SCOPES[0]).status_code == 200
    records = server.stats()["requests"]
    assert [r["status"] for r in records] == [503, 503, 200]
    jtis = [assertion_of(r)[1]["jti"] for r in records]
    assert len(set(jtis)) == 3, jtis
    assert server.stats()["assertion_replays"] == 0


def test_a_key_the_authorization_server_does_not_know_is_rejected_with_its_error(
    server: AuthServerProcess,
    write_config: Callable[[dict[str, str]], Path],
    start_brokers: StartBrokers,
    tmp_path: Path,
) -> None:
    server.register_keyless("jwt-client", jwks=rsa_key().jwks())  # another key than the broker's
    config = write_config(
        {
            "signed": f"""
                token_url = "{server.token_url}"
                client_id = "jwt-client"
                auth_method = "private_key_jwt"
                private_key = {{ file = "{key_file(tmp_path, "key.pem", rsa_key().private_pem)}" }}
            """
        }
    )
    [broker] = start_brokers(config, workers=1)
    body = rejected(get_token(broker.url, "signed", SCOPES[0]))
    assert (body["upstream_error"], body["upstream_status"]) == ("invalid_client", 401)
    assert "BEGIN" not in broker.output()


def test_a_key_file_swapped_at_run_time_is_signed_with_without_a_restart(
    server: AuthServerProcess,
    write_config: Callable[[dict[str, str]], Path],
    start_brokers: StartBrokers,
    tmp_path: Path,
) -> None:
    old, new = rsa_key(), ec_key()
    mount = KubeSecretMount(tmp_path, "signing.key", old.private_pem)
    server.register_keyless("jwt-client", jwks=old.jwks())
    config = write_config(
        {
            "signed": f"""
                token_url = "{server.token_url}"
                client_id = "jwt-client"
                auth_method = "private_key_jwt"
                private_key = {{ file = "{mount.path}" }}
            """
        }
    )
    [broker] = start_brokers(config, workers=1)
    assert get_token(broker.url, "signed", SCOPES[0]).status_code == 200
    first_token = get_token(broker.url, "signed", SCOPES[0]).json()["access_token"]

    server.register_keyless("jwt-client", jwks=new.jwks())  # the authorization server moved on
    assert rejected(get_token(broker.url, "signed", SCOPES[1]))["upstream_error"] == "invalid_client"

    mount.update(new.private_jwk)  # and so does the key file (an EC key now: ES256 follows it)
    time.sleep(CHECK_EVERY + 0.2)
    assert get_token(broker.url, "signed", SCOPES[2]).status_code == 200
    header, _ = assertion_of(server.stats()["requests"][-1])
    assert header["alg"] == "ES256"
    # the cached token of the old key is still served: a key is not part of the cache key
    assert get_token(broker.url, "signed", SCOPES[0]).json()["access_token"] == first_token
    assert server.token_requests() == 3


# -- tls_client_auth ------------------------------------------------------------------------------


def tls_table(server: AuthServerProcess, pki: Pki, cert: str, key: str | None = None, **where: str) -> str:
    location = f'token_url = "{where["token_url"]}"' if "token_url" in where else f'issuer = "{server.url}"'
    key_line = f'tls_client_key = "{key}"' if key else ""
    return f"""
        {location}
        client_id = "mtls-client"
        auth_method = "tls_client_auth"
        tls_client_cert = "{cert}"
        {key_line}
        tls_ca_file = "{pki.tls.server_ca_file}"
    """


def test_tls_client_auth_through_the_discovered_mtls_alias_and_a_token_url(
    server: AuthServerProcess, pki: Pki, write_config: Callable[[dict[str, str]], Path], start_brokers: StartBrokers
) -> None:
    cert = pki.client_cert("mtls-client")
    server.register_keyless("mtls-client", tls_client_auth_subject_dn=cert.subject)
    assert server.tls_url is not None
    config = write_config(
        {
            # the issuer's discovery is plain HTTP; its mtls_endpoint_aliases name the HTTPS listener
            "discovered": tls_table(server, pki, cert.cert_file, cert.key_file),
            "direct": tls_table(server, pki, cert.combined_file, token_url=f"{server.tls_url}/oauth/token"),
        }
    )
    [broker] = start_brokers(config, workers=1)
    for name in ("discovered", "direct"):
        response = get_token(broker.url, name, SCOPES[0])
        assert response.status_code == 200, (name, response.text)
    records = server.stats()["requests"]
    assert [(r["auth"], r["client_cert"], r["url"]) for r in records] == [
        ("tls_client_auth", cert.subject, f"{server.tls_url}/oauth/token")
    ] * 2
    assert all(r["form"]["client_id"] == "mtls-client" for r in records)


def test_a_certificate_of_another_subject_is_rejected_with_the_upstreams_error(
    server: AuthServerProcess, pki: Pki, write_config: Callable[[dict[str, str]], Path], start_brokers: StartBrokers
) -> None:
    server.register_keyless("mtls-client", tls_client_auth_subject_dn=pki.client_cert("mtls-client").subject)
    wrong = pki.client_cert("someone-else")
    [broker] = start_brokers(write_config({"mtls": tls_table(server, pki, wrong.cert_file, wrong.key_file)}), workers=1)
    body = rejected(get_token(broker.url, "mtls", SCOPES[0]))
    assert (body["upstream_error"], body["upstream_status"]) == ("invalid_client", 401)


def test_a_certificate_the_tls_layer_refuses_is_unavailable_not_a_token(
    server: AuthServerProcess, pki: Pki, write_config: Callable[[dict[str, str]], Path], start_brokers: StartBrokers
) -> None:
    """A certificate from a CA the server does not trust fails the handshake: the server closes
    the connection without an answer, so there is no OAuth error to pass on (README, Security)."""
    untrusted = pki.client_cert("mtls-client", ca=pki.untrusted_ca)
    server.register_keyless("mtls-client", tls_client_auth_subject_dn=untrusted.subject)
    config = write_config({"mtls": tls_table(server, pki, untrusted.cert_file, untrusted.key_file)})
    [broker] = start_brokers(config, workers=1)
    response = get_token(broker.url, "mtls", SCOPES[0])
    assert response.status_code == 503, response.text
    assert response.json()["error"] == "upstream_unavailable"
    assert server.token_requests() == 0


def test_a_wrong_tls_ca_file_says_the_servers_certificate_does_not_verify(
    server: AuthServerProcess, pki: Pki, write_config: Callable[[dict[str, str]], Path], start_brokers: StartBrokers
) -> None:
    cert = pki.client_cert("mtls-client")
    table = tls_table(server, pki, cert.cert_file, cert.key_file)
    table = table.replace(pki.tls.server_ca_file, pki.tls.client_ca_file)  # not the CA of the server's certificate
    [broker] = start_brokers(write_config({"mtls": table}), workers=1)
    response = get_token(broker.url, "mtls", SCOPES[0])
    assert response.status_code == 503, response.text
    assert "TLS certificate does not verify" in response.json()["error_description"]


def test_certificate_files_swapped_at_run_time_are_presented_without_a_restart(
    server: AuthServerProcess,
    pki: Pki,
    write_config: Callable[[dict[str, str]], Path],
    start_brokers: StartBrokers,
    tmp_path: Path,
) -> None:
    right, wrong = pki.client_cert("mtls-client"), pki.client_cert("expired-registration")
    server.register_keyless("mtls-client", tls_client_auth_subject_dn=right.subject)
    mount = KubeSecretMount(tmp_path, "tls.pem", (wrong.key_pem + wrong.cert_pem).decode())
    [broker] = start_brokers(write_config({"mtls": tls_table(server, pki, mount.path)}), workers=1)
    assert rejected(get_token(broker.url, "mtls", SCOPES[0]))["upstream_error"] == "invalid_client"

    mount.update((right.key_pem + right.cert_pem).decode())
    time.sleep(CHECK_EVERY + 0.2)
    assert get_token(broker.url, "mtls", SCOPES[1]).status_code == 200
    assert [r["client_cert"] for r in server.stats()["requests"]] == [wrong.subject, right.subject]
