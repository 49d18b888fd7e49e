"""Config validation of the keyless auth methods (spec §2, §6.7): the key and certificate files
are loaded at start, and whatever is wrong with them is one problem line naming the key."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from broker.errors import ConfigError
from broker.settings import parse_settings
from broker.vault.models import CredentialSettings
from tests.support_keyless import Pki, ec_key, rsa_key
from tests.unit.test_cli import VALID, assert_no_traceback, check_config
from tests.unit.test_settings import BASE, ENV

RSA, EC = rsa_key(), ec_key()
TOKEN_URL = "https://auth.example.com/oauth/token"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


def write(tmp_path: Path, name: str, text: str | bytes) -> str:
    path = tmp_path / name
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return str(path)


def with_payments(**table: Any) -> dict[str, Any]:
    """The base config with `payments` authenticating as `table` says (its secret left out)."""
    data = copy.deepcopy(BASE)
    payments = data["credentials"]["payments"]
    del payments["client_secret"]
    payments.update(table)
    return data


def parse(data: dict[str, Any]) -> CredentialSettings:
    return parse_settings(data, ENV).credentials["payments"]


def only_problem(data: dict[str, Any], key: str) -> str:
    with pytest.raises(ConfigError) as info:
        parse_settings(data, ENV)
    found = info.value.problems
    assert len(found) == 1, found
    assert found[0].startswith(f"credentials.payments.{key}: "), found
    return found[0]


def jwt_table(tmp_path: Path, text: str | bytes, **more: Any) -> dict[str, Any]:
    return {"auth_method": "private_key_jwt", "private_key": {"file": write(tmp_path, "key", text)}, **more}


# -- private_key_jwt ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "more", "algorithm"),
    [
        (RSA.private_pem, {}, "RS256"),
        (RSA.private_pem, {"signing_alg": "PS256"}, "PS256"),
        (EC.private_pem, {}, "ES256"),
        (EC.private_jwk, {}, "ES256"),
        (RSA.private_jwk, {"signing_alg": "RS256"}, "RS256"),
    ],
    ids=["rsa-pem", "rsa-pem-ps256", "ec-pem", "ec-jwk", "rsa-jwk"],
)
def test_a_private_key_from_a_file_needs_no_client_secret(
    tmp_path: Path, text: str, more: dict[str, Any], algorithm: str
) -> None:
    credential = parse(with_payments(**jwt_table(tmp_path, text, **more)))
    assert credential.client_secrets == ()
    assert credential.private_key is not None
    assert credential.private_key.current().algorithm == algorithm
    assert "PRIVATE" not in repr(credential)


def test_key_id_is_the_configured_one_else_the_jwks_own(tmp_path: Path) -> None:
    jwk = json.dumps({**json.loads(RSA.private_jwk), "kid": "from-the-jwk"})
    key = parse(with_payments(**jwt_table(tmp_path, jwk))).private_key
    assert key is not None
    assert key.current().key_id == "from-the-jwk"
    key = parse(with_payments(**jwt_table(tmp_path, jwk, key_id="configured"))).private_key
    assert key is not None
    assert key.current().key_id == "configured"


def test_a_literal_private_key_works_and_is_warned_about() -> None:
    settings = parse_settings(with_payments(auth_method="private_key_jwt", private_key=RSA.private_pem), ENV)
    [warning] = settings.warnings
    assert warning.startswith("credentials.payments.private_key: a literal secret")
    assert "PRIVATE KEY" not in warning


def small_rsa_pem() -> bytes:
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505 - the key the broker must refuse
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def encrypted_pem() -> bytes:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"passphrase"),
    )


@pytest.mark.parametrize(
    ("text", "more", "key", "words"),
    [
        ("not a key at all", {}, "private_key", "neither a PEM private key"),
        ("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----", {}, "private_key", "not a readable PEM"),
        (RSA.key.as_pem(private=False).decode(), {}, "private_key", "public key, not a private key"),
        (json.dumps(RSA.public_jwk()), {}, "private_key", "public JWK"),
        (json.dumps({"keys": [RSA.public_jwk()]}), {}, "private_key", "JWK Set"),
        ('{"kty": "oct", "k": "c2VjcmV0", "d": "x"}', {}, "private_key", "kty 'oct'"),
        ("{not json", {}, "private_key", "not JSON"),
        (small_rsa_pem(), {}, "private_key", "1024-bit RSA key"),
        (ec_key("P-384").private_pem, {}, "private_key", "P-384"),
        (encrypted_pem(), {}, "private_key", "encrypted with a passphrase"),
        (RSA.private_pem, {"signing_alg": "ES256"}, "signing_alg", "ES256 needs an EC P-256 key"),
        (EC.private_pem, {"signing_alg": "PS256"}, "signing_alg", "PS256 needs an RSA key"),
        (RSA.private_pem, {"signing_alg": "HS256"}, "signing_alg", "must be one of RS256, PS256, ES256"),
        (RSA.private_pem, {"key_id": ""}, "key_id", "must not be empty"),
    ],
    ids=[
        "garbage",
        "broken-pem",
        "public-pem",
        "public-jwk",
        "jwk-set",
        "oct-jwk",
        "broken-json",
        "rsa-1024",
        "ec-p384",
        "encrypted",
        "es256-with-rsa",
        "ps256-with-ec",
        "hs256",
        "empty-kid",
    ],
)
def test_an_unusable_private_key_is_one_line(
    tmp_path: Path, text: str | bytes, more: dict[str, Any], key: str, words: str
) -> None:
    line = only_problem(with_payments(**jwt_table(tmp_path, text, **more)), key)
    assert words in line
    assert "PRIVATE KEY-----" not in line.replace("-----BEGIN …", "")


def test_an_unreadable_key_file_is_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pem"
    data = with_payments(auth_method="private_key_jwt", private_key={"file": str(missing)})
    line = only_problem(data, "private_key")
    assert str(missing) in line
    assert "No such file" in line


def test_private_key_jwt_without_a_key_or_with_a_secret(tmp_path: Path) -> None:
    assert "is required" in only_problem(with_payments(auth_method="private_key_jwt"), "private_key")
    data = with_payments(**jwt_table(tmp_path, RSA.private_pem), client_secret={"env": "PAY_SECRET"})
    assert "is not used with" in only_problem(data, "client_secret")


def test_key_fields_belong_to_private_key_jwt(tmp_path: Path) -> None:
    data = copy.deepcopy(BASE)
    data["credentials"]["payments"]["signing_alg"] = "RS256"
    line = only_problem(data, "signing_alg")
    assert 'only used with auth_method = "private_key_jwt"' in line


def test_the_key_is_not_part_of_the_shape(tmp_path: Path) -> None:
    """Replacing the key (a rotation) keeps the cached tokens; the method is part of the shape."""
    one = parse(with_payments(**jwt_table(tmp_path, RSA.private_pem)))
    other = parse(with_payments(**jwt_table(tmp_path, EC.private_pem, key_id="k2")))
    assert one.shape == other.shape
    secret = copy.deepcopy(BASE)
    assert parse_settings(secret, ENV).credentials["payments"].shape != one.shape


# -- tls_client_auth ------------------------------------------------------------------------------


def tls_table(**files: str) -> dict[str, Any]:
    return {"auth_method": "tls_client_auth", **files}


def test_a_certificate_and_its_key_need_no_client_secret(pki: Pki) -> None:
    cert = pki.client_cert("payments")
    credential = parse(with_payments(**tls_table(tls_client_cert=cert.cert_file, tls_client_key=cert.key_file)))
    assert credential.client_secrets == ()
    assert credential.tls_client is not None
    assert credential.tls_client.subject == cert.subject
    combined = parse(with_payments(**tls_table(tls_client_cert=cert.combined_file, tls_ca_file=pki.tls.server_ca_file)))
    assert combined.tls_client is not None
    assert combined.tls_client.files == (cert.combined_file, None, pki.tls.server_ca_file)


def test_an_unusable_certificate_is_one_line(pki: Pki, tmp_path: Path) -> None:
    cert, other = pki.client_cert("payments"), pki.client_cert("other")
    cases = [
        (tls_table(tls_client_cert=cert.cert_file), "tls_client_key", "holds no private key"),
        (tls_table(tls_client_cert=cert.cert_file, tls_client_key=other.key_file), "tls_client_key", "does not match"),
        (
            tls_table(tls_client_cert=write(tmp_path, "x.pem", "junk"), tls_client_key=cert.key_file),
            "tls_client_cert",
            "holds no PEM certificate",
        ),
        (
            tls_table(tls_client_cert=cert.cert_file, tls_client_key=write(tmp_path, "x.key", "junk")),
            "tls_client_key",
            "no readable PEM private key",
        ),
        (
            tls_table(tls_client_cert=cert.combined_file, tls_ca_file=cert.key_file),
            "tls_ca_file",
            "holds no PEM certificate",
        ),
        (tls_table(tls_client_cert=str(tmp_path / "missing.pem")), "tls_client_cert", "No such file"),
        (tls_table(), "tls_client_cert", "is required"),
    ]
    for table, key, words in cases:
        assert words in only_problem(with_payments(**table), key), (table, key)


def test_tls_client_auth_needs_https_and_no_secret(pki: Pki) -> None:
    cert = pki.client_cert("payments")
    data = with_payments(**tls_table(tls_client_cert=cert.combined_file), token_url="http://auth.example.com/token")
    assert "https" in only_problem(data, "token_url")
    data = with_payments(**tls_table(tls_client_cert=cert.combined_file), client_secrets=[{"env": "PAY_SECRET"}])
    assert "is not used with" in only_problem(data, "client_secrets")
    data = copy.deepcopy(BASE)
    data["credentials"]["payments"]["tls_client_cert"] = cert.combined_file
    assert 'only used with auth_method = "tls_client_auth"' in only_problem(data, "tls_client_cert")


def test_check_config_says_one_line_for_a_broken_key(tmp_path: Path) -> None:
    key = write(tmp_path, "payments.key", "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    config = VALID.replace(
        'client_secret = { env = "CLI_PAY_SECRET" }',
        f'auth_method = "private_key_jwt"\nprivate_key = {{ file = "{key}" }}',
    )
    path = tmp_path / "broker.toml"
    path.write_text(config, encoding="utf-8")
    result = check_config(path)
    assert result.returncode == 2
    assert_no_traceback(result)
    assert result.stderr.splitlines() == [
        f"config error: credentials.payments.private_key: is not a readable PEM private key (file:{key})"
    ]
    assert TOKEN_URL in VALID
