"""Redis key names (spec §4.1): hash-tagged per credential, prefixed per deployment, and shaped by
everything in the credential that shapes a token."""

from __future__ import annotations

import dataclasses
import re

import pytest

from broker.scopes import canonical, parse
from broker.secret import Secret
from broker.store import Keys
from broker.vault.models import CredentialSettings

BASE = CredentialSettings(
    name="payments",
    client_id="client-a",
    client_secrets=(Secret("s"),),
    token_url="https://auth.example.com/oauth/token",
    scopes=("a", "b"),
)


def test_every_key_of_a_token_carries_the_credentials_hash_tag_and_one_id() -> None:
    keys = Keys().for_token("payments", BASE.shape, "a b")
    names = [keys.token, keys.lock, keys.fence, keys.refusal, keys.invalidated]
    idents = set()
    for name, kind in zip(names, ["tok", "lock", "fence", "neg", "inv"], strict=True):
        match = re.fullmatch(r"tb:\{payments\}:(\w+):([0-9a-f]{32})", name)
        assert match is not None, name
        assert match.group(1) == kind
        idents.add(match.group(2))
    assert len(idents) == 1


def test_the_prefix_separates_deployments() -> None:
    ours, theirs = Keys("tb"), Keys("tb-staging")
    assert ours.events == "tb:events"
    assert theirs.events == "tb-staging:events"
    assert ours.for_token("payments", BASE.shape, "a").token != theirs.for_token("payments", BASE.shape, "a").token
    assert theirs.for_token("payments", BASE.shape, "a").token.startswith("tb-staging:{payments}:tok:")


@pytest.mark.parametrize(
    "change",
    [
        {"client_id": "client-b"},
        {"token_url": "https://auth.example.com/v2/token"},
        {"token_url": None, "issuer": "https://auth.example.com"},
        {"auth_method": "client_secret_post"},
        {"audience": "https://api.example.com"},
        {"resource": "https://api.example.com"},
        {"extra_params": {"tenant": "x"}},
    ],
    ids=lambda change: next(iter(change)) if len(change) == 1 else "issuer",
)
def test_a_change_to_any_token_shaping_field_changes_every_key(change: dict[str, object]) -> None:
    """Defect (hardening item 7): keys were tb:{name}:… only, so a rolling deploy that changed the
    client id or endpoint served tokens minted for the old configuration."""
    changed = dataclasses.replace(BASE, **change)  # type: ignore[arg-type]
    assert changed.shape != BASE.shape
    assert Keys().for_token("payments", changed.shape, "a").token != Keys().for_token("payments", BASE.shape, "a").token


def test_fields_that_do_not_shape_a_token_keep_the_keys() -> None:
    # the secret (rotation must not turn every hit into a miss) and the scopes a caller may ask for
    rotated = (Secret("new"), Secret("rotated"))
    same = dataclasses.replace(BASE, client_secrets=rotated, scopes=("a", "b", "c"), default_scopes=("a",))
    assert same.shape == BASE.shape


def test_equivalent_scope_requests_share_keys_and_other_sets_do_not() -> None:
    keys = Keys()

    def token_key(raw: str) -> str:
        return keys.for_token("payments", BASE.shape, canonical(parse(raw))).token

    assert token_key("b a") == token_key("a b a")
    assert len({token_key(raw) for raw in ["a", "b", "a b", "a c"]}) == 4
