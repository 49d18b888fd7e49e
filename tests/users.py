"""Users who log in (spec §5) for tests on real broker processes: the `portal` credential's config,
a login driven over HTTP (the test authorization server's form filled in as a browser would), and
a look at a subject's grant record in Redis."""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path
from typing import Any

import httpx
import redis

from broker.callers import hash_key, new_caller_key
from broker.entries import Codec
from broker.settings import load_settings
from broker.store import Keys, TokenKeys
from broker.vault.keyring import KeyRing
from tests.conftest import READ, SECRET_ENV, WRITE, auth, config_text
from tests.support import CLIENT_ID, AuthServerProcess

__all__ = [
    "AUDIT_KEY",
    "CALLBACK_PATH",
    "PLACEHOLDER_URL",
    "PORTAL",
    "audit",
    "grant_record",
    "log_in",
    "portal_config",
    "subject_keys",
    "subject_path",
    "write_portal_config",
]

PORTAL = "portal"
CALLBACK_PATH = "/v1/oauth/callback"
# Where the authorization server sends the browser back to when the test calls the callback itself
PLACEHOLDER_URL = "http://broker.test"
AUDIT_KEY = new_caller_key()  # caller `audit`: reads only the users who logged in through it


def audit() -> dict[str, str]:
    return {"Authorization": f"Bearer {AUDIT_KEY}"}


def portal_config(
    redis_url: str,
    authserver: AuthServerProcess,
    *,
    public_url: str = PLACEHOLDER_URL,
    rotation_grace_seconds: float = 0.0,
    return_to_allow: tuple[str, ...] = ("https://app.example.com/done",),
) -> str:
    """The suite's config plus credential `portal` (authorization code grant, READ and WRITE):
    `billing` and `audit` read the users who logged in through them, `reporting` every user's
    (READ only)."""
    allow = ", ".join(json.dumps(prefix) for prefix in return_to_allow)
    extra = textwrap.dedent(
        f"""
        [server]
        public_url = "{public_url}"

        [credentials.{PORTAL}]
        issuer = "{authserver.url}"
        client_id = "{CLIENT_ID}"
        client_secret = {{ env = "{SECRET_ENV}" }}
        grant = "authorization_code"
        scopes = ["{READ}", "{WRITE}"]
        default_scopes = ["{READ}"]
        return_to_allow = [{allow}]
        rotation_grace_seconds = {rotation_grace_seconds}
        """
    )
    text = config_text(redis_url, authserver, extra)
    billing, reporting = "[callers.billing.grants]\n", "[callers.reporting.grants]\n"
    assert billing in text, "config_text changed shape: update portal_config"
    assert reporting in text, "config_text changed shape: update portal_config"
    text = text.replace(billing, f'{billing}{PORTAL} = ["{READ}", "{WRITE}"]\n')
    text = text.replace(reporting, f'{reporting}{PORTAL} = {{ scopes = ["{READ}"], subjects = "any" }}\n')
    audit_caller = f'[callers.audit]\nkey_sha256 = "{hash_key(AUDIT_KEY)}"\n[callers.audit.grants]\n'
    return f'{text}\n{audit_caller}{PORTAL} = ["{READ}"]\n'


def write_portal_config(
    path: Path, redis_url: str, authserver: AuthServerProcess, public_url: str = PLACEHOLDER_URL, **options: Any
) -> Path:
    """portal_config in `path`, its callback registered at the authorization server."""
    authserver.register_redirect_uris(f"{public_url}{CALLBACK_PATH}")
    path.write_text(portal_config(redis_url, authserver, public_url=public_url, **options), encoding="utf-8")
    return path


def subject_path(subject: str) -> str:
    return f"/v1/tokens/{PORTAL}/subjects/{subject}"


def log_in(
    broker_url: str,
    authserver: AuthServerProcess,
    user: str = "alice",
    caller: str = "billing",
    scope: str | None = None,
) -> str:
    """Start a login at the broker, log in at the authorization server, bring the code back to
    the broker's callback (as JSON) → the subject."""
    body = {"scope": scope} if scope is not None else {}
    with httpx.Client(base_url=broker_url, timeout=15, trust_env=False) as client:
        headers = audit() if caller == "audit" else auth(caller)
        started = client.post(f"/v1/authorizations/{PORTAL}", json=body, headers=headers)
        assert started.status_code == 200, started.text
        back = authserver.login(started.json()["authorize_url"], user)
        assert back.path == CALLBACK_PATH, back
        done = client.get(f"{CALLBACK_PATH}?{back.query.decode()}", headers={"Accept": "application/json"})
        assert done.status_code == 200, done.text
        subject: str = done.json()["subject"]
        return subject


def subject_keys(config: Path, subject: str, scope_set: str = READ) -> TokenKeys:
    settings = load_settings(config)
    shape = settings.credentials[PORTAL].shape
    return Keys(settings.redis.key_prefix).for_token(PORTAL, shape, scope_set, subject)


def grant_record(redis_url: str, keys: TokenKeys) -> tuple[int, dict[str, Any] | None]:
    """(version, the subject's grant record) as a broker with the suite's keys reads it."""
    with redis.Redis.from_url(redis_url) as client:
        raw = client.get(keys.grant)
    if not raw:
        return 0, None
    _, version, body = raw.decode().split("|", 2)
    codec = Codec(KeyRing.parse(os.environ["BROKER_ENCRYPTION_KEYS"]))
    opened = codec.open(body.encode(), f"{keys.grant}|{version}")
    return int(version), (json.loads(opened) if opened is not None else None)
