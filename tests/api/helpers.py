"""Shared helpers for the API tests: error-body checks and brokers with extra configuration."""

from __future__ import annotations

import contextlib
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
from starlette.testclient import TestClient

from broker.api import create_app
from broker.callers import hash_key, new_caller_key
from broker.settings import load_settings
from tests.conftest import ADMIN, READ, SECRET_ENV, WRITE
from tests.support import CLIENT_ID, CLIENT_SECRET, AuthServerProcess

WWW_AUTHENTICATE = 'Bearer realm="token-broker", error="invalid_token"'
UPSTREAM_REJECTED_KEYS = {"error", "error_description", "upstream_error", "upstream_status"}

# A caller of our own for credentials the shared test config does not declare.
OPS_KEY = new_caller_key()


def ops_auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {OPS_KEY}"}


def assert_error(response: httpx.Response, status: int, error: str, *, upstream: bool = False) -> dict[str, Any]:
    """The error contract of spec §3.3: exact JSON shape, JSON content type, nothing internal or secret."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].split(";")[0].strip() == "application/json"
    body: dict[str, Any] = response.json()
    assert set(body) == (UPSTREAM_REJECTED_KEYS if upstream else {"error", "error_description"}), body
    assert body["error"] == error, body
    assert isinstance(body["error_description"], str), body
    assert body["error_description"].strip(), body
    raw = response.text + "".join(f"{k}: {v}\n" for k, v in response.headers.items())
    assert CLIENT_SECRET not in raw
    for leak in ("Traceback", 'File "', "broker/", "Error:"):
        assert leak not in raw, raw
    return body


def ops_config(authserver: AuthServerProcess, *, upstream: str = "", wrong_secret_env: str | None = None) -> str:
    """Extra TOML: credential `journal` (issuer discovery, client_secret_post, audience and extra
    params), optionally `broken` (token_url with a wrong secret), and caller `ops` granted them."""
    text = f"""
        [credentials.journal]
        issuer = "{authserver.url}"
        client_id = "{CLIENT_ID}"
        client_secret = {{ env = "{SECRET_ENV}" }}
        auth_method = "client_secret_post"
        scopes = ["{READ}", "{WRITE}", "{ADMIN}"]
        default_scopes = ["{READ}"]
        audience = "https://api.test"
        extra_params = {{ tenant = "t-1" }}
        """
    grants = f'journal = ["{READ}", "{WRITE}", "{ADMIN}"]\n'
    if wrong_secret_env is not None:
        text += f"""
        [credentials.broken]
        token_url = "{authserver.token_url}"
        client_id = "{CLIENT_ID}"
        client_secret = {{ env = "{wrong_secret_env}" }}
        scopes = ["{READ}"]
        default_scopes = ["{READ}"]
        """
        grants += f'broken = ["{READ}"]\n'
    text += f"""
        [callers.ops]
        key_sha256 = "{hash_key(OPS_KEY)}"
        [callers.ops.grants]
        """
    return textwrap.dedent(text) + grants + textwrap.dedent(upstream)


@contextlib.contextmanager
def broker_client(write_config: Callable[..., Path], extra: str) -> Iterator[TestClient]:
    """A broker built like the `client` fixture, with `extra` TOML appended to the test config."""
    settings = load_settings(write_config(extra))
    with TestClient(create_app(settings), raise_server_exceptions=False) as test_client:
        yield test_client
