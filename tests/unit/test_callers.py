"""Caller authentication and grants (spec §3.3, §6.2)."""

from __future__ import annotations

import hashlib

import pytest

from broker.callers import KEY_PREFIX, CallerRegistry, hash_key, new_caller_key
from broker.errors import AccessDenied, InsufficientScope, InvalidCallerToken
from broker.vault.models import CallerSettings

BILLING_KEY = new_caller_key()
REPORTING_KEY = new_caller_key()
READ, WRITE, ADMIN = "urn:x.read", "urn:x.write", "urn:x.admin"

BILLING = CallerSettings(
    name="billing", key_sha256=hash_key(BILLING_KEY), grants={"payments": frozenset({READ, WRITE})}
)
REPORTING = CallerSettings(name="reporting", key_sha256=hash_key(REPORTING_KEY), grants={"ledger": frozenset({READ})})
REGISTRY = CallerRegistry({"billing": BILLING, "reporting": REPORTING})


def test_new_caller_keys_are_long_random_and_hashed_with_sha256() -> None:
    keys = {new_caller_key() for _ in range(50)}
    assert len(keys) == 50
    for key in keys:
        assert key.startswith(KEY_PREFIX)
        assert len(key) - len(KEY_PREFIX) >= 43  # 32 bytes = 256 bits in urlsafe base64
        assert hash_key(key) == hashlib.sha256(key.encode()).hexdigest()


@pytest.mark.parametrize(("key", "caller"), [(BILLING_KEY, BILLING), (REPORTING_KEY, REPORTING)])
def test_valid_key_identifies_its_caller(key: str, caller: CallerSettings) -> None:
    assert REGISTRY.authenticate(f"Bearer {key}") is caller


def test_bearer_scheme_is_case_insensitive() -> None:
    assert REGISTRY.authenticate(f"bearer {BILLING_KEY}") is BILLING


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        f"Bearer {new_caller_key()}",
        f"Basic {BILLING_KEY}",
        f"Token {BILLING_KEY}",
        BILLING_KEY,
        "Bearer",
        "Bearer ",
        "Bearer tbk_short",
        f"Bearer {BILLING_KEY[:-1]}",
        f"Bearer {BILLING_KEY}x",
        f"Bearer {BILLING_KEY[:-1]}\u00e9",
        f"Bearer {BILLING_KEY} extra",
        "Bearer " + "a" * 300,
    ],
    ids=[
        "none",
        "empty",
        "unknown",
        "basic",
        "token-scheme",
        "no-scheme",
        "bearer-only",
        "bearer-space",
        "too-short",
        "truncated",
        "extended",
        "non-ascii",
        "trailing-junk",
        "too-long",
    ],
)
def test_missing_malformed_or_unknown_key_is_invalid_token(header: str | None) -> None:
    with pytest.raises(InvalidCallerToken) as info:
        REGISTRY.authenticate(header)
    exc = info.value
    assert exc.status == 401
    assert exc.headers() == {"WWW-Authenticate": 'Bearer realm="token-broker", error="invalid_token"'}
    assert BILLING_KEY not in exc.description


def test_granted_scopes_for_a_granted_credential() -> None:
    assert CallerRegistry.granted_scopes(BILLING, "payments") == frozenset({READ, WRITE})


def test_no_grant_gives_the_same_answer_whether_or_not_the_credential_exists() -> None:
    with pytest.raises(AccessDenied) as existing:
        CallerRegistry.granted_scopes(BILLING, "ledger")  # exists: reporting has a grant for it
    with pytest.raises(AccessDenied) as unknown:
        CallerRegistry.granted_scopes(BILLING, "no-such-credential")
    assert existing.value.status == unknown.value.status == 403
    assert existing.value.body() == unknown.value.body()
    assert existing.value.body()["error"] == "access_denied"
    assert "ledger" not in existing.value.description


def test_scopes_within_the_grant_pass() -> None:
    CallerRegistry.check_scopes(frozenset({READ, WRITE}), (READ,))
    CallerRegistry.check_scopes(frozenset({READ, WRITE}), (READ, WRITE))
    CallerRegistry.check_scopes(frozenset({READ}), ())


def test_scopes_outside_the_grant_are_named() -> None:
    with pytest.raises(InsufficientScope) as info:
        CallerRegistry.check_scopes(frozenset({READ}), (ADMIN, READ, WRITE))
    exc = info.value
    assert exc.status == 403
    assert exc.code == "insufficient_scope"
    assert sorted(exc.refused) == [ADMIN, WRITE]
    assert ADMIN in exc.description
    assert WRITE in exc.description
    assert READ not in exc.description


def test_a_client_is_a_caller_named_by_client_id_with_its_key_as_secret() -> None:
    """The OAuth facade's client authentication: name and key must both match."""
    assert REGISTRY.authenticate_client("billing", BILLING_KEY) is BILLING
    assert REGISTRY.authenticate_client("reporting", REPORTING_KEY) is REPORTING


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("billing", REPORTING_KEY),  # another caller's key
        ("reporting", BILLING_KEY),
        ("nobody", BILLING_KEY),  # an unknown name with a valid key
        ("nobody", new_caller_key()),
        ("billing", new_caller_key()),  # a wrong key
        ("billing", ""),
        ("billing", BILLING_KEY + " "),
        ("Billing", BILLING_KEY),
        ("billing\udc80", BILLING_KEY),  # not encodable: compared as replaced text, never raised
        ("", BILLING_KEY),
    ],
)
def test_a_client_with_a_wrong_name_or_key_gets_one_answer(name: str, key: str) -> None:
    with pytest.raises(InvalidCallerToken) as caught:
        REGISTRY.authenticate_client(name, key)
    assert caught.value.description == (
        "The client credentials are not valid (client_id: a caller name, client_secret: its caller key)."
    )
