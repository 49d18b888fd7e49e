"""The broker's answers as the SDK sees them: a `Token`, or the exception of its family (the tree is
drawn in broker/client/__init__.py)."""

from __future__ import annotations

import contextlib
import email.utils
from dataclasses import dataclass, field
from datetime import UTC, datetime

import httpx

__all__ = [
    "BrokerClientError",
    "BrokerRefused",
    "BrokerUnavailable",
    "Token",
    "error_of",
    "retry_after_of",
    "token_of",
    "unreachable",
]


class BrokerClientError(Exception):
    """The broker gave no token. `str()` is `"<error_description> (<error>)"`; never a secret."""

    def __init__(
        self, status: int | None, error: str, error_description: str, *, retry_after: float | None = None
    ) -> None:
        super().__init__(f"{error_description} ({error})")
        self.status = status
        self.error = error
        self.error_description = error_description
        self.retry_after = retry_after


class BrokerRefused(BrokerClientError):
    """A 4xx answer: asking again the same way gets the same answer."""


class BrokerUnavailable(BrokerClientError):
    """A 5xx answer, or none at all: no token for now."""


@dataclass(frozen=True)
class Token:
    """The broker's answer to GET /v1/tokens/{credential}."""

    access_token: str = field(repr=False)
    token_type: str
    expires_in: int  # seconds left when the broker answered
    expires_at: str | None
    scope: str
    answer: str = field(repr=False)  # the JSON answer as the broker sent it


def retry_after_of(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after", "").strip()
    if value.isascii() and value.isdigit():
        return float(value)
    with contextlib.suppress(TypeError, ValueError, IndexError):
        return max(0.0, (email.utils.parsedate_to_datetime(value) - datetime.now(UTC)).total_seconds())
    return None


def error_of(response: httpx.Response) -> BrokerClientError:
    """The broker's error answer as the exception of its family."""
    status = response.status_code
    try:
        body = response.json()
    except ValueError:
        body = None
    error, description = f"http_{status}", f"The broker answered HTTP {status}."
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        error = body["error"]
        if isinstance(body.get("error_description"), str):
            description = body["error_description"]
    kind = BrokerRefused if 400 <= status < 500 else BrokerUnavailable if status >= 500 else BrokerClientError
    return kind(status, error, description, retry_after=retry_after_of(response))


def token_of(response: httpx.Response) -> Token:
    if response.status_code != 200:
        raise error_of(response)
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        access_token, expires_in = body.get("access_token"), body.get("expires_in")
        token_type, scope, expires_at = body.get("token_type", "Bearer"), body.get("scope", ""), body.get("expires_at")
        if (
            isinstance(access_token, str)
            and access_token
            and isinstance(expires_in, int)
            and not isinstance(expires_in, bool)
            and expires_in >= 0
            and isinstance(token_type, str)
            and isinstance(scope, str)
            and isinstance(expires_at, str | None)
        ):
            return Token(access_token, token_type, expires_in, expires_at, scope, response.text)
    raise BrokerClientError(200, "invalid_response", "The broker's answer is not a token response.")


def unreachable(base: str, exc: httpx.HTTPError) -> BrokerClientError:
    if isinstance(exc, httpx.TransportError):
        reason = str(exc) or type(exc).__name__
        return BrokerUnavailable(None, "broker_unreachable", f"The broker at {base} could not be reached: {reason}.")
    return BrokerClientError(None, "invalid_response", f"The broker at {base} answered unreadably: {exc}.")
