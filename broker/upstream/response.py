"""Reading the authorization server's answer: a valid token, or the precise reason it is not.

Pure functions over (status, headers, body) so they can be tested without a network.
"""

from __future__ import annotations

import base64
import json
import math
from dataclasses import dataclass
from typing import Any

from broker.errors import UpstreamInvalidResponse, UpstreamRejected, UpstreamUnavailable

__all__ = [
    "MAX_BODY_BYTES",
    "MAX_LIFETIME",
    "FetchedToken",
    "classify_error",
    "jwt_exp",
    "lifetime_from",
    "parse_retry_after",
    "parse_token_response",
]

MAX_BODY_BYTES = 64 * 1024
MAX_LIFETIME = 366 * 24 * 3600  # an expires_in beyond a year is a bug upstream, not a token
TERMINAL_ERRORS = frozenset(
    {
        "invalid_client",
        "unauthorized_client",
        "invalid_scope",
        "invalid_grant",
        "unsupported_grant_type",
        "invalid_request",
        "access_denied",
    }
)


@dataclass(frozen=True)
class FetchedToken:
    access_token: str  # always a Bearer token: anything else is refused
    scope: str  # what the authorization server granted (may be narrower than asked)
    lifetime: float  # seconds, from expires_in / JWT exp / default
    issued_at: float  # wall-clock time the request was sent: conservative start of the lifetime
    refresh_token: str | None = None  # authorization code and refresh grants (spec §5)
    id_token: str | None = None

    @property
    def expires_at(self) -> float:
        return self.issued_at + self.lifetime

    def __repr__(self) -> str:
        return f"FetchedToken(scope={self.scope!r}, lifetime={self.lifetime})"


def jwt_exp(token: str) -> float | None:
    """The `exp` claim of a JWT, read without verifying it (we only use it as a lifetime hint)."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    payload = parts[1] + "=" * (-len(parts[1]) % 4)
    try:
        claims = json.loads(base64.urlsafe_b64decode(payload))
    except (ValueError, TypeError, RecursionError):
        return None
    exp = claims.get("exp") if isinstance(claims, dict) else None
    if isinstance(exp, int | float) and not isinstance(exp, bool):
        return _finite(exp)
    return None


def _finite(value: float) -> float | None:
    """`value` as a finite float, or None (NaN, infinities, integers beyond float range)."""
    try:
        result = float(value)
    except OverflowError:
        return None
    return result if math.isfinite(result) else None


def lifetime_from(expires_in: Any, access_token: str, now: float, default: float) -> float:
    """Token lifetime per spec §4.2, from `now` (when the request was sent).

    The earlier of `expires_in` and the JWT `exp`, whichever of them is there, else `default`: a
    token is never taken as valid past its own `exp` (read without verification, as a hint only; a
    token that is not a JWT with a numeric `exp` has none). Raises UpstreamInvalidResponse for a
    bad `expires_in` or an `exp` already past.
    """
    lifetime = None if expires_in is None else _expires_in_seconds(expires_in)
    exp = jwt_exp(access_token)
    if exp is None:
        return default if lifetime is None else lifetime
    until_exp = exp - now
    if until_exp <= 0:
        raise UpstreamInvalidResponse("The authorization server issued a token that has already expired.")
    return min(until_exp, MAX_LIFETIME if lifetime is None else lifetime)


def _expires_in_seconds(expires_in: Any) -> float:
    """A valid `expires_in` (a positive number or numeric string, at most a year) in seconds."""
    if isinstance(expires_in, bool):
        raise UpstreamInvalidResponse("The authorization server sent a non-numeric expires_in.")
    if isinstance(expires_in, str):
        if not expires_in.isascii():
            raise UpstreamInvalidResponse("The authorization server sent a non-numeric expires_in.")
        try:
            expires_in = float(expires_in.strip())
        except ValueError:
            raise UpstreamInvalidResponse("The authorization server sent a non-numeric expires_in.") from None
    if not isinstance(expires_in, int | float):
        raise UpstreamInvalidResponse("The authorization server sent a non-numeric expires_in.")
    if expires_in > MAX_LIFETIME:
        raise UpstreamInvalidResponse("The authorization server sent an expires_in longer than a year.")
    expires_in = _finite(expires_in)
    if expires_in is None:
        raise UpstreamInvalidResponse("The authorization server sent a non-numeric expires_in.")
    if expires_in <= 0:
        raise UpstreamInvalidResponse("The authorization server sent a non-positive expires_in.")
    return float(expires_in)


def _json_object(body: bytes) -> dict[str, Any] | None:
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def _is_json(content_type: str | None) -> bool:
    media = (content_type or "").split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def parse_token_response(
    content_type: str | None,
    body: bytes,
    *,
    requested_scope: str,
    issued_at: float,
    default_expires_in: float,
) -> FetchedToken:
    """A 200 answer to a token request → FetchedToken, or UpstreamInvalidResponse.

    `requested_scope` is the canonical scope set asked for: the granted scope must lie within it.
    """
    if len(body) > MAX_BODY_BYTES:
        raise UpstreamInvalidResponse("The authorization server's answer is larger than 64 KiB.")
    if not _is_json(content_type):
        raise UpstreamInvalidResponse("The authorization server did not answer with JSON.")
    data = _json_object(body)
    if data is None:
        raise UpstreamInvalidResponse("The authorization server's answer is not a JSON object.")
    token = data.get("access_token")
    if not isinstance(token, str) or not token.strip():
        raise UpstreamInvalidResponse("The authorization server's answer has no access_token.")
    if len(token) > 16384 or not token.isascii() or not token.isprintable():
        raise UpstreamInvalidResponse("The authorization server's access_token is not a printable token.")
    token_type = data.get("token_type")
    if not isinstance(token_type, str) or token_type.lower() != "bearer":
        raise UpstreamInvalidResponse("The authorization server issued a token that is not a Bearer token.")
    granted = _granted_scope(data.get("scope"), requested_scope)
    lifetime = lifetime_from(data.get("expires_in"), token, issued_at, default_expires_in)
    return FetchedToken(
        access_token=token,
        scope=granted,
        lifetime=lifetime,
        issued_at=issued_at,
        refresh_token=_optional_token(data, "refresh_token"),
        id_token=_optional_token(data, "id_token"),
    )


def _optional_token(data: dict[str, Any], name: str) -> str | None:
    value = data.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or not value or len(value) > 16384 or not value.isascii() or not value.isprintable():
        raise UpstreamInvalidResponse(f"The authorization server's {name} is not a printable token.")
    return value


def _granted_scope(scope: Any, requested_scope: str) -> str:
    """The granted scope set, canonical; UpstreamInvalidResponse if it reaches beyond the request.

    The cache is shared per requested scope set, so a broader token would reach callers never
    granted the extra scopes (spec §4.8). A narrower grant is fine. An empty request grants
    nothing, so any scope granted for it is beyond it. Omitted means as requested (RFC 6749 §5.1).
    """
    if scope is None:
        return requested_scope
    if not isinstance(scope, str):
        raise UpstreamInvalidResponse("The authorization server sent a scope that is not a string.")
    granted = set(scope.split())
    if extra := granted - set(requested_scope.split()):
        raise UpstreamInvalidResponse(
            f"The authorization server granted scope beyond the requested set: {_scope_names(extra)}."
        )
    return " ".join(sorted(granted))


def _scope_names(scopes: set[str], limit: int = 10, width: int = 80) -> str:
    """For a sentence: sorted, at most `limit` of them, each printable ASCII of at most `width`."""
    shown = []
    for name in sorted(scopes)[:limit]:
        printable = name if name.isascii() and name.isprintable() else ascii(name)[1:-1]
        shown.append(printable if len(printable) <= width else printable[: width - 3] + "...")
    more = len(scopes) - limit
    return " ".join(shown) + (f" and {more} more" if more > 0 else "")


def parse_retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None  # HTTP-date form: rare at token endpoints; fall back to our own backoff
    return seconds if 0 <= seconds < 3600 else None


def classify_error(status: int, content_type: str | None, body: bytes, retry_after: str | None) -> Exception:
    """A non-200 answer → the error it stands for: rejected (terminal), unavailable (transient) or invalid."""
    if status == 429 or status >= 500:
        return UpstreamUnavailable(
            f"The authorization server answered HTTP {status}.",
            retry_after=parse_retry_after(retry_after),
        )
    data = _json_object(body) if _is_json(content_type) or body.startswith(b"{") else None
    code = data.get("error") if data else None
    if status in (400, 401, 403) and isinstance(code, str) and code.isascii() and len(code) <= 64:
        code = code if code in TERMINAL_ERRORS else code.strip() or None
        return UpstreamRejected(
            f"The authorization server refused the token request ({code or 'no error code'}).",
            upstream_error=code,
            upstream_status=status,
        )
    if status in (401, 403):
        return UpstreamRejected(
            f"The authorization server refused the client's authentication (HTTP {status}).",
            upstream_error=None,
            upstream_status=status,
        )
    if 300 <= status < 400:
        return UpstreamInvalidResponse(f"The authorization server answered with a redirect (HTTP {status}).")
    return UpstreamInvalidResponse(f"The authorization server answered HTTP {status} without an OAuth error.")
