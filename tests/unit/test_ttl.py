"""Token lifetime and cache window (spec §4.2)."""

from __future__ import annotations

import base64
import json
import math
from typing import Any

import pytest
from joserfc import jwt
from joserfc.jwk import OctKey

from broker.errors import UpstreamInvalidResponse
from broker.tokens import cache_window, effective_skew
from broker.upstream.response import MAX_LIFETIME, lifetime_from, parse_token_response

NOW = 1_800_000_000.0
DEFAULT = 300.0
OPAQUE = "opaque-access-token"


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def unsigned_jwt(payload: bytes | dict[str, Any]) -> str:
    raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    header = _b64url(b'{"alg":"none","typ":"JWT"}')
    return f"{header}.{_b64url(raw)}."


def signed_jwt(claims: dict[str, Any]) -> str:
    return jwt.encode({"alg": "HS256"}, claims, OctKey.generate_key(256))


@pytest.mark.parametrize(
    ("expires_in", "expected"),
    [(3600, 3600.0), (1, 1.0), (2.5, 2.5), ("3600", 3600.0), (" 60 ", 60.0), ("\t90\n", 90.0), ("1.5", 1.5)],
)
def test_expires_in_number_or_numeric_string(expires_in: Any, expected: float) -> None:
    assert lifetime_from(expires_in, OPAQUE, NOW, DEFAULT) == expected


@pytest.mark.parametrize("make", [unsigned_jwt, signed_jwt], ids=["unsigned", "hs256"])
def test_an_earlier_jwt_exp_shortens_expires_in(make: Any) -> None:
    """Defect (hardening issue item 15): expires_in won over an earlier JWT exp, so a token was
    cached and handed out past the moment its own exp says it expires."""
    token = make({"sub": "svc", "exp": int(NOW) + 120})
    assert lifetime_from(3600, token, NOW, DEFAULT) == pytest.approx(120.0)
    assert lifetime_from("3600", token, NOW + 20, DEFAULT) == pytest.approx(100.0)


def test_a_later_jwt_exp_does_not_lengthen_expires_in() -> None:
    token = unsigned_jwt({"exp": NOW + 9999})
    assert lifetime_from(120, token, NOW, DEFAULT) == 120.0


@pytest.mark.parametrize("exp", [NOW - 5, NOW], ids=["past", "now"])
def test_a_jwt_exp_already_past_beside_expires_in_is_invalid_response(exp: float) -> None:
    """Defect: with an expires_in beside it, a JWT whose exp had passed was taken as valid."""
    with pytest.raises(UpstreamInvalidResponse, match="already expired"):
        lifetime_from(3600, unsigned_jwt({"exp": exp}), NOW, DEFAULT)


@pytest.mark.parametrize(
    "token",
    [OPAQUE, "a.b.c", unsigned_jwt({"sub": "no-exp"}), unsigned_jwt({"exp": "1800000010"}), unsigned_jwt(b"[1]")],
    ids=["opaque", "three-parts-not-jwt", "no-exp", "string-exp", "array-payload"],
)
def test_a_token_without_a_usable_exp_keeps_expires_in(token: str) -> None:
    assert lifetime_from(3600, token, NOW, DEFAULT) == 3600.0


def test_a_bad_expires_in_is_refused_even_beside_a_good_exp() -> None:
    with pytest.raises(UpstreamInvalidResponse, match="non-positive"):
        lifetime_from(0, unsigned_jwt({"exp": NOW + 60}), NOW, DEFAULT)


@pytest.mark.parametrize("make", [unsigned_jwt, signed_jwt], ids=["unsigned", "hs256"])
def test_missing_expires_in_uses_jwt_exp(make: Any) -> None:
    token = make({"sub": "svc", "exp": int(NOW) + 1234})
    assert lifetime_from(None, token, NOW, DEFAULT) == pytest.approx(1234.0)


def test_jwt_exp_in_the_past_is_invalid_response() -> None:
    with pytest.raises(UpstreamInvalidResponse):
        lifetime_from(None, unsigned_jwt({"exp": int(NOW) - 5}), NOW, DEFAULT)


def test_jwt_exp_never_gives_more_than_max_lifetime() -> None:
    token = unsigned_jwt({"exp": int(NOW) + 10 * MAX_LIFETIME})
    assert lifetime_from(None, token, NOW, DEFAULT) <= MAX_LIFETIME


@pytest.mark.parametrize(
    "token",
    [
        OPAQUE,
        unsigned_jwt({"sub": "no-exp"}),
        unsigned_jwt({"exp": "1800001234"}),
        unsigned_jwt({"exp": True}),
        unsigned_jwt(b"[1, 2]"),
        unsigned_jwt(b"not json"),
        "eyJhbGciOiJub25lIn0.%%%.sig",
        "a.b",
    ],
    ids=["opaque", "no-exp", "string-exp", "bool-exp", "array-payload", "garbage-payload", "bad-b64", "two-parts"],
)
def test_missing_expires_in_without_usable_jwt_exp_uses_default(token: str) -> None:
    assert lifetime_from(None, token, NOW, DEFAULT) == DEFAULT


@pytest.mark.parametrize(
    "expires_in",
    [
        0,
        -1,
        -3600,
        "0",
        "-60",
        0.0,
        "",
        "soon",
        "3600s",
        "0x10",
        True,
        False,
        float("nan"),
        float("inf"),
        float("-inf"),
        "nan",
        "inf",
        [3600],
        {"seconds": 3600},
        MAX_LIFETIME + 1,
        str(400 * 24 * 3600),
    ],
)
def test_bad_expires_in_is_invalid_response(expires_in: Any) -> None:
    with pytest.raises(UpstreamInvalidResponse):
        lifetime_from(expires_in, OPAQUE, NOW, DEFAULT)


def test_expires_in_up_to_max_lifetime_is_accepted() -> None:
    assert lifetime_from(MAX_LIFETIME, OPAQUE, NOW, DEFAULT) == MAX_LIFETIME
    assert lifetime_from(365 * 24 * 3600, OPAQUE, NOW, DEFAULT) == 365 * 24 * 3600


def test_huge_integer_expires_in_is_invalid_response() -> None:
    with pytest.raises(UpstreamInvalidResponse):
        lifetime_from(10**400, OPAQUE, NOW, DEFAULT)


def test_huge_integer_jwt_exp_does_not_crash() -> None:
    token = unsigned_jwt(b'{"exp": 1' + b"0" * 400 + b"}")
    try:
        lifetime = lifetime_from(None, token, NOW, DEFAULT)
    except UpstreamInvalidResponse:
        return
    assert 0 < lifetime <= MAX_LIFETIME


def test_nan_jwt_exp_does_not_give_a_nan_lifetime() -> None:
    token = unsigned_jwt(b'{"exp": NaN}')
    try:
        lifetime = lifetime_from(None, token, NOW, DEFAULT)
    except UpstreamInvalidResponse:
        return
    assert math.isfinite(lifetime)
    assert lifetime > 0


def test_parse_token_response_carries_lifetime_and_expiry() -> None:
    body = json.dumps({"access_token": OPAQUE, "token_type": "Bearer", "expires_in": "3600"}).encode()
    token = parse_token_response(
        "application/json", body, requested_scope="a", issued_at=NOW, default_expires_in=DEFAULT
    )
    assert token.lifetime == 3600.0
    assert token.expires_at == NOW + 3600.0


def test_parse_token_response_without_expires_in_uses_configured_default() -> None:
    body = json.dumps({"access_token": OPAQUE, "token_type": "Bearer"}).encode()
    token = parse_token_response("application/json", body, requested_scope="a", issued_at=NOW, default_expires_in=42)
    assert token.lifetime == 42.0


@pytest.mark.parametrize(
    ("lifetime", "skew", "expected_skew", "expected_window"),
    [
        (3600, 30, 30, 3570),
        (8, 30, 2, 6),
        (120, 30, 30, 90),
        (100, 30, 25, 75),
        (60, 0, 0, 60),
        (2, 30, 0.5, 1.5),
    ],
)
def test_effective_skew_and_cache_window(
    lifetime: float, skew: float, expected_skew: float, expected_window: float
) -> None:
    assert effective_skew(lifetime, skew) == expected_skew
    assert cache_window(lifetime, skew) == expected_window


@pytest.mark.parametrize("lifetime", [2, 5, 8, 40, 119, 120, 121, 3600, 86400])
def test_cache_window_keeps_at_least_three_quarters_and_never_hands_out_inside_the_skew(lifetime: float) -> None:
    window = cache_window(lifetime, 30)
    assert window >= 0.75 * lifetime
    assert lifetime - window <= 30
