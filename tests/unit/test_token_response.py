"""Reading the authorization server's answer (spec §3.3 error table, §4.6, §4.7)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from broker.errors import UpstreamInvalidResponse, UpstreamRejected, UpstreamUnavailable
from broker.upstream.response import MAX_BODY_BYTES, FetchedToken, classify_error, parse_token_response

NOW = 1_800_000_000.0
JSON = "application/json"
GOOD = {"access_token": "tok-123", "token_type": "Bearer", "expires_in": 3600, "scope": "b a"}


def parse(body: bytes | dict[str, Any] | list[Any], content_type: str | None = JSON, requested: str = "a b") -> Any:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return parse_token_response(content_type, raw, requested_scope=requested, issued_at=NOW, default_expires_in=300)


_DROP = object()  # with_(field=_DROP) leaves the field out


def with_(**changes: Any) -> dict[str, Any]:
    body = {**GOOD, **changes}
    return {k: v for k, v in body.items() if v is not _DROP}


def test_valid_answer() -> None:
    token = parse(GOOD)
    assert token == FetchedToken(access_token="tok-123", scope="a b", lifetime=3600.0, issued_at=NOW)
    assert token.expires_at == NOW + 3600


@pytest.mark.parametrize("content_type", ["application/json", "application/json; charset=utf-8", "Application/JSON"])
def test_json_content_types_accepted(content_type: str) -> None:
    assert parse(GOOD, content_type).access_token == "tok-123"


def test_fetched_token_repr_does_not_show_the_token() -> None:
    assert "tok-123" not in repr(parse(GOOD))


@pytest.mark.parametrize("token_type", ["Bearer", "bearer", "BEARER", "bEaReR"])
def test_bearer_in_any_case_accepted(token_type: str) -> None:
    assert parse(with_(token_type=token_type)).access_token == "tok-123"


@pytest.mark.parametrize("token_type", ["mac", "MAC", "DPoP", "", " Bearer", 1, None, _DROP])
def test_non_bearer_token_type_rejected(token_type: Any) -> None:
    with pytest.raises(UpstreamInvalidResponse):
        parse(with_(token_type=token_type))


@pytest.mark.parametrize("access_token", [_DROP, None, "", "   ", 123, ["tok"], "tok\x00en", "tök", "a\nb"])
def test_missing_empty_or_unprintable_access_token_rejected(access_token: Any) -> None:
    with pytest.raises(UpstreamInvalidResponse):
        parse(with_(access_token=access_token))


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        (JSON, [GOOD]),
        (JSON, b"<html><body>Login</body></html>"),
        ("text/html", b"<html><body>Login</body></html>"),
        ("text/html; charset=utf-8", json.dumps(GOOD).encode()),
        ("text/plain", json.dumps(GOOD).encode()),
        ("application/x-www-form-urlencoded", b"access_token=tok&token_type=Bearer"),
        (None, json.dumps(GOOD).encode()),
        (JSON, b""),
        (JSON, b"null"),
        (JSON, b'"tok-123"'),
        (JSON, b"\xff\xfe\x00garbage"),
    ],
    ids=[
        "array",
        "html-as-json",
        "html",
        "json-as-html",
        "text",
        "form",
        "no-type",
        "empty",
        "null",
        "string",
        "binary",
    ],
)
def test_not_a_json_object_rejected(content_type: str | None, body: Any) -> None:
    with pytest.raises(UpstreamInvalidResponse):
        parse(body, content_type)


def _padded(size: int) -> bytes:
    body = json.dumps(GOOD).encode()
    return body[:-1] + b" " * (size - len(body)) + b"}"


def test_body_up_to_64_kib_accepted_and_larger_refused() -> None:
    assert parse(_padded(MAX_BODY_BYTES)).access_token == "tok-123"
    with pytest.raises(UpstreamInvalidResponse, match="64 KiB"):
        parse(_padded(MAX_BODY_BYTES + 1))


def test_omitted_scope_means_the_requested_scope() -> None:
    assert parse(with_(scope=_DROP), requested="urn:x.read urn:x.write").scope == "urn:x.read urn:x.write"


@pytest.mark.parametrize(("granted", "expected"), [("b a", "a b"), ("  a  a\tb ", "a b"), ("a", "a")])
def test_granted_scope_is_canonicalised(granted: str, expected: str) -> None:
    assert parse(with_(scope=granted)).scope == expected


@pytest.mark.parametrize("scope", [["a", "b"], 1, {"a": 1}])
def test_non_string_scope_rejected(scope: Any) -> None:
    with pytest.raises(UpstreamInvalidResponse):
        parse(with_(scope=scope))


@pytest.mark.parametrize("expires_in", [0, -5, "soon", True])
def test_bad_expires_in_rejected(expires_in: Any) -> None:
    with pytest.raises(UpstreamInvalidResponse):
        parse(with_(expires_in=expires_in))


def test_deeply_nested_json_body_rejected_cleanly() -> None:
    with pytest.raises(UpstreamInvalidResponse):
        parse(b"[" * 60_000)


def test_huge_integer_expires_in_rejected_cleanly() -> None:
    body = b'{"access_token": "t", "token_type": "Bearer", "expires_in": 1' + b"0" * 400 + b"}"
    with pytest.raises(UpstreamInvalidResponse):
        parse(body)


# -- non-200 answers ------------------------------------------------------------------------------


def err(code: str, **extra: Any) -> bytes:
    return json.dumps({"error": code, **extra}).encode()


@pytest.mark.parametrize(
    ("status", "code"),
    [
        (400, "invalid_client"),
        (400, "invalid_scope"),
        (400, "unsupported_grant_type"),
        (401, "invalid_client"),
        (403, "unauthorized_client"),
    ],
)
def test_oauth_error_is_upstream_rejected(status: int, code: str) -> None:
    exc = classify_error(status, JSON, err(code, error_description="nope"), None)
    assert isinstance(exc, UpstreamRejected)
    assert (exc.upstream_error, exc.upstream_status) == (code, status)
    assert exc.status == 502
    assert exc.body() == {
        "error": "upstream_rejected",
        "error_description": exc.description,
        "upstream_error": code,
        "upstream_status": status,
    }


def test_oauth_error_without_content_type_still_read() -> None:
    exc = classify_error(400, None, err("invalid_client"), None)
    assert isinstance(exc, UpstreamRejected)
    assert exc.upstream_error == "invalid_client"


@pytest.mark.parametrize(("status", "body"), [(401, b""), (403, b"<html>Forbidden</html>"), (401, b"{}")])
def test_auth_failure_without_oauth_error_is_rejected_with_no_code(status: int, body: bytes) -> None:
    exc = classify_error(status, "text/html" if body.startswith(b"<") else JSON, body, None)
    assert isinstance(exc, UpstreamRejected)
    assert exc.upstream_error is None
    assert exc.upstream_status == status


@pytest.mark.parametrize(
    ("status", "retry_after", "expected"),
    [(429, "7", 7.0), (503, "120", 120.0), (500, None, None), (502, "soon", None), (503, "-1", None)],
)
def test_429_and_5xx_are_unavailable_with_retry_after(status: int, retry_after: str | None, expected: Any) -> None:
    exc = classify_error(status, "text/plain", b"busy", retry_after)
    assert isinstance(exc, UpstreamUnavailable)
    assert exc.status == 503
    assert exc.retry_after == expected
    assert int(exc.headers()["Retry-After"]) >= 1


def test_retry_after_header_is_passed_on_in_seconds() -> None:
    exc = classify_error(429, JSON, err("slow_down"), "7")
    assert isinstance(exc, UpstreamUnavailable)
    assert exc.headers() == {"Retry-After": "7"}


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_redirect_is_invalid_response(status: int) -> None:
    assert isinstance(classify_error(status, "text/html", b"<a href=/login>", None), UpstreamInvalidResponse)


@pytest.mark.parametrize(
    ("status", "content_type", "body"),
    [(404, "text/html", b"<html>Not Found</html>"), (400, "text/html", b"<html>Bad</html>"), (405, JSON, b"{}")],
)
def test_non_oauth_4xx_is_invalid_response(status: int, content_type: str, body: bytes) -> None:
    assert isinstance(classify_error(status, content_type, body, None), UpstreamInvalidResponse)


def test_classify_error_survives_deeply_nested_body() -> None:
    exc = classify_error(400, JSON, b'{"a":' * 20_000, None)
    assert isinstance(exc, UpstreamInvalidResponse | UpstreamRejected)


# -- properties -----------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
token_like = st.fixed_dictionaries(
    {},
    optional={
        "access_token": json_values | st.text(min_size=1, max_size=40),
        "token_type": json_values | st.sampled_from(["Bearer", "bearer", "mac"]),
        "expires_in": json_values | st.integers(-10, 10**9) | st.from_regex(r"\s*-?[0-9]{1,12}(\.[0-9]+)?\s*"),
        "scope": json_values | st.text(max_size=40),
    },
)
content_types = st.sampled_from([JSON, "application/json; charset=utf-8", "text/html", None, "application/jwt+json"])


def _parse_never_crashes(content_type: str | None, body: bytes) -> None:
    try:
        token = parse_token_response(content_type, body, requested_scope="a", issued_at=NOW, default_expires_in=300)
    except UpstreamInvalidResponse:
        return
    assert isinstance(token, FetchedToken)
    assert token.access_token
    assert token.lifetime > 0


@hsettings(database=None, derandomize=True, max_examples=300)
@given(content_type=content_types, body=st.binary(max_size=512))
def test_random_bytes_only_ever_give_a_token_or_invalid_response(content_type: str | None, body: bytes) -> None:
    _parse_never_crashes(content_type, body)


@hsettings(database=None, derandomize=True, max_examples=300)
@given(content_type=content_types, doc=token_like | json_values)
def test_random_json_only_ever_gives_a_token_or_invalid_response(content_type: str | None, doc: Any) -> None:
    _parse_never_crashes(content_type, json.dumps(doc).encode())


@hsettings(database=None, derandomize=True, max_examples=200)
@given(
    status=st.integers(300, 599),
    content_type=content_types,
    body=st.binary(max_size=256) | json_values.map(lambda v: json.dumps(v).encode()),
    retry_after=st.none() | st.text(max_size=10),
)
def test_classify_error_always_returns_an_upstream_error(
    status: int, content_type: str | None, body: bytes, retry_after: str | None
) -> None:
    exc = classify_error(status, content_type, body, retry_after)
    assert isinstance(exc, UpstreamRejected | UpstreamInvalidResponse | UpstreamUnavailable)
