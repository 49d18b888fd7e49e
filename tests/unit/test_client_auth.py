"""Client authentication at the token endpoint (spec §4.6, RFC 6749 §2.3.1)."""

from __future__ import annotations

import base64
from urllib.parse import unquote_plus

import pytest
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from broker.secret import Secret
from broker.upstream.auth import client_auth_for
from broker.vault.models import CredentialSettings

TOKEN_URL = "https://auth.example.com/oauth/token"


def credential(client_id: str, secret: str, method: str = "client_secret_basic") -> CredentialSettings:
    return CredentialSettings(
        name="payments",
        client_id=client_id,
        client_secrets=(Secret(secret),),
        token_url=TOKEN_URL,
        auth_method=method,
    )


def basic(client_id: str, secret: str) -> tuple[dict[str, str], dict[str, str]]:
    form: dict[str, str] = {"grant_type": "client_credentials"}
    headers: dict[str, str] = {}
    cred = credential(client_id, secret)
    client_auth_for("client_secret_basic").apply(cred, cred.client_secret, form, headers, endpoint=TOKEN_URL, now=0.0)
    return form, headers


def decode_basic(header: str) -> tuple[str, str]:
    scheme, _, encoded = header.partition(" ")
    assert scheme == "Basic"
    user, sep, password = base64.b64decode(encoded, validate=True).decode("ascii").partition(":")
    assert sep == ":"
    return unquote_plus(user), unquote_plus(password)


def test_basic_urlencodes_id_and_secret_before_base64() -> None:
    form, headers = basic("a:b é", "p%ss+w:rd")
    assert decode_basic(headers["Authorization"]) == ("a:b é", "p%ss+w:rd")
    raw = base64.b64decode(headers["Authorization"].split()[1]).decode("ascii")
    assert raw.count(":") == 1  # the ':' in the id and secret are encoded, so the split is unambiguous
    assert form == {"grant_type": "client_credentials"}


def test_basic_with_plain_credentials_matches_the_usual_header() -> None:
    _, headers = basic("my-client", "secret123")
    assert headers["Authorization"] == "Basic " + base64.b64encode(b"my-client:secret123").decode()


def test_post_puts_id_and_secret_in_the_form() -> None:
    form: dict[str, str] = {"grant_type": "client_credentials", "scope": "a"}
    headers: dict[str, str] = {}
    cred = credential("a:b é", "p%ss+w:rd", "client_secret_post")
    client_auth_for("client_secret_post").apply(cred, cred.client_secret, form, headers, endpoint=TOKEN_URL, now=0.0)
    assert form == {
        "grant_type": "client_credentials",
        "scope": "a",
        "client_id": "a:b é",
        "client_secret": "p%ss+w:rd",
    }
    assert "Authorization" not in headers


def test_unknown_method_is_refused() -> None:
    with pytest.raises(ValueError, match="client_secret_jwt"):
        client_auth_for("client_secret_jwt")


text = st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=40)


@hsettings(database=None, derandomize=True, max_examples=200)
@given(client_id=text, secret=text)
def test_basic_round_trips_any_id_and_secret(client_id: str, secret: str) -> None:
    _, headers = basic(client_id, secret)
    assert decode_basic(headers["Authorization"]) == (client_id, secret)
