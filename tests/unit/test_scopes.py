"""Scope sets (spec §1, §3.3, §4.1): canonical form, RFC 6749 scope-token rules, size limits, ids."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from broker.errors import InvalidRequest
from broker.scopes import MAX_SCOPE_LENGTH, MAX_SCOPES, canonical, parse

# Every character RFC 6749 §3.3 allows in a scope-token: %x21 / %x23-5B / %x5D-7E.
ALLOWED = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) not in '"\\')


@pytest.mark.parametrize(
    "raw",
    ["a b", "b a", "a b a", "  b   a  ", "a\tb", "b\na\r\nb", "a b b a a"],
)
def test_equivalent_scope_strings_have_one_canonical_form(raw: str) -> None:
    assert parse(raw) == ("a", "b")
    assert canonical(parse(raw)) == "a b"


def test_parse_sorts_and_deduplicates_urn_scopes() -> None:
    raw = "urn:axa.claims.write urn:axa.claims.read urn:axa.claims.write"
    assert parse(raw) == ("urn:axa.claims.read", "urn:axa.claims.write")


def test_canonical_joins_a_list_sorted_with_single_spaces() -> None:
    assert canonical(["b", "a", "b", "c"]) == "a b c"
    assert canonical(()) == ""


@pytest.mark.parametrize("raw", ["", " ", "\t\n "])
def test_empty_scope_string_is_the_empty_set(raw: str) -> None:
    assert parse(raw) == ()


def test_every_rfc6749_scope_character_is_accepted() -> None:
    assert parse(ALLOWED) == (ALLOWED,)


@pytest.mark.parametrize(
    "raw",
    [
        'read"write',
        "read\\write",
        "caf\u00e9",
        "urn:\u2603",
        "read\x00",
        "read\x01write",
        "read\x7f",
        "a b\x1b[31m",
    ],
    ids=["dquote", "backslash", "latin1", "emoji-ish", "nul", "soh", "del", "escape-seq"],
)
def test_characters_outside_rfc6749_are_invalid_request(raw: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse(raw)
    assert info.value.status == 400
    assert info.value.code == "invalid_request"


@pytest.mark.parametrize("sep", ["\u00a0", "\u0085", "\u3000", "\x1c", "\x1f"])
def test_non_ascii_or_control_separators_are_invalid_request(sep: str) -> None:
    with pytest.raises(InvalidRequest):
        parse(f"a{sep}b")


def test_at_most_max_scopes_distinct_scopes() -> None:
    many = [f"s{i}" for i in range(MAX_SCOPES)]
    assert len(parse(" ".join(many))) == MAX_SCOPES
    with pytest.raises(InvalidRequest):
        parse(" ".join([*many, "one-more"]))


def test_duplicates_do_not_count_against_the_scope_limit() -> None:
    assert parse(" ".join(["same"] * (MAX_SCOPES * 2))) == ("same",)


def test_scope_length_limit() -> None:
    assert parse("x" * MAX_SCOPE_LENGTH) == ("x" * MAX_SCOPE_LENGTH,)
    with pytest.raises(InvalidRequest):
        parse("x" * (MAX_SCOPE_LENGTH + 1))


def test_oversized_scope_parameter_is_refused_even_if_mostly_whitespace() -> None:
    with pytest.raises(InvalidRequest):
        parse("a" + " " * (MAX_SCOPES * (MAX_SCOPE_LENGTH + 1)))


scope_token = st.text(alphabet=ALLOWED, min_size=1, max_size=20)


@hsettings(database=None, derandomize=True, max_examples=200)
@given(
    tokens=st.lists(scope_token, min_size=0, max_size=MAX_SCOPES, unique=True),
    seps=st.lists(st.sampled_from([" ", "  ", "\t", "\n"]), min_size=1, max_size=5),
    data=st.data(),
)
def test_canonical_form_ignores_order_duplicates_and_spacing(
    tokens: list[str], seps: list[str], data: st.DataObject
) -> None:
    shuffled = data.draw(st.permutations(tokens + tokens[: len(tokens) // 2]))
    raw = "".join(tok + seps[i % len(seps)] for i, tok in enumerate(shuffled))
    assert parse(raw) == tuple(sorted(tokens))
    assert canonical(parse(raw)) == " ".join(sorted(tokens))
