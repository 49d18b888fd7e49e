"""The granted scope must lie within the requested scope set (spec §4.8, hardening issue item 1)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from broker.errors import UpstreamInvalidResponse
from broker.upstream.response import FetchedToken, parse_token_response

NOW = 1_800_000_000.0


def parse(requested: str, **fields: Any) -> FetchedToken:
    body = {"access_token": "tok", "token_type": "Bearer", "expires_in": 60, **fields}
    return parse_token_response(
        "application/json", json.dumps(body).encode(), requested_scope=requested, issued_at=NOW, default_expires_in=300
    )


def refusal(requested: str, granted: str) -> str:
    with pytest.raises(UpstreamInvalidResponse) as caught:
        parse(requested, scope=granted)
    return caught.value.description


def test_a_grant_beyond_the_request_is_refused_naming_only_the_extra_scopes() -> None:
    """Defect: any granted scope was taken as it was, so a broader token went into the cache
    shared by every caller of the requested scope set."""
    description = refusal("read", "read admin delete")
    assert description.endswith("beyond the requested set: admin delete.")


@pytest.mark.parametrize(
    ("requested", "granted", "expected"),
    [
        ("a b", "b a", "a b"),
        ("a b", " a\tb  a ", "a b"),
        ("a b", "a", "a"),  # narrower is fine: the answer says what was granted
        ("a b", "", ""),
        ("", "", ""),
    ],
)
def test_the_requested_set_or_less_is_accepted_and_canonical(requested: str, granted: str, expected: str) -> None:
    assert parse(requested, scope=granted).scope == expected


@pytest.mark.parametrize("requested", ["a b", ""])
def test_an_omitted_scope_means_the_requested_set(requested: str) -> None:
    assert parse(requested).scope == requested


def test_any_scope_granted_for_an_empty_request_is_beyond_it() -> None:
    """An empty request asks for nothing; the cache entry for it must not hold what the
    authorization server chose to grant (routes no longer send one, spec §4.8)."""
    assert refusal("", "urn:default").endswith(": urn:default.")


def test_scopes_compare_exactly() -> None:
    assert "READ" in refusal("read", "READ")
    assert "read:all" in refusal("read", "read:all")


def test_many_or_long_extra_scopes_are_named_in_a_bounded_sentence() -> None:
    extra = [f"urn:x:{i:03}" for i in range(500)]
    description = refusal("a", " ".join(["a", *extra]))
    assert "urn:x:000 urn:x:001" in description
    assert description.endswith(" and 490 more.")
    assert len(description) < 300

    long_name = "urn:" + "x" * 5000
    description = refusal("a", long_name)
    assert long_name not in description
    assert len(description) < 200


def test_unprintable_extra_scopes_are_escaped_in_the_sentence() -> None:
    description = refusal("a", "a bad\x00scope sc\u00f6pe")
    assert description.isascii()
    assert description.isprintable()
    assert "bad\\x00scope" in description
    assert "sc\\xf6pe" in description
