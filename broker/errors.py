"""The one exception tree of token-broker, and how each error answers over HTTP.

BrokerError                      base: status, OAuth-style code, human sentence
├── CallerError                  the caller's request cannot be served (4xx)
│   ├── InvalidRequest           400 invalid_request
│   ├── InvalidCallerToken       401 invalid_token
│   ├── AccessDenied             403 access_denied (same answer whether or not the credential exists)
│   ├── InsufficientScope        403 insufficient_scope
│   ├── NotFound                 404 not_found (admin API: no such credential or caller)
│   ├── ReadOnly                 409 read_only (admin API: the entry comes from the config file)
│   └── RateLimited              429 rate_limited: the caller is over its rate limit; Retry-After
├── UpstreamError                the authorization server did not give us a token (5xx)
│   ├── UpstreamRejected         502 upstream_rejected: terminal, not retried
│   ├── UpstreamInvalidResponse  502 upstream_invalid_response: not a valid token response
│   └── UpstreamUnavailable      503 upstream_unavailable: transient, retried
├── StoreUnavailable             Redis could not be reached (handled inside the token service)
└── StoreBusy                    503 temporarily_unavailable: no Redis connection free in time (load)

ConfigError                      invalid configuration: one line per problem (not a BrokerError:
                                 it never reaches a caller, it stops the process with exit code 2)
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

__all__ = [
    "AccessDenied",
    "BrokerError",
    "CallerError",
    "ConfigError",
    "InsufficientScope",
    "InvalidCallerToken",
    "InvalidRequest",
    "NotFound",
    "RateLimited",
    "ReadOnly",
    "StoreBusy",
    "StoreUnavailable",
    "UpstreamError",
    "UpstreamInvalidResponse",
    "UpstreamRejected",
    "UpstreamUnavailable",
]


class BrokerError(Exception):
    status: ClassVar[int] = 500
    code: ClassVar[str] = "server_error"

    def __init__(self, description: str) -> None:
        super().__init__(description)
        self.description = description

    def body(self) -> dict[str, Any]:
        return {"error": self.code, "error_description": self.description}

    def headers(self) -> dict[str, str]:
        return {}


class CallerError(BrokerError):
    status = 400


class InvalidRequest(CallerError):
    status = 400
    code = "invalid_request"


class InvalidCallerToken(CallerError):
    status = 401
    code = "invalid_token"

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": 'Bearer realm="token-broker", error="invalid_token"'}


class AccessDenied(CallerError):
    status = 403
    code = "access_denied"

    def __init__(self) -> None:
        # One fixed sentence: nothing in it may depend on whether the credential exists.
        super().__init__("This caller has no grant for the requested credential.")


class InsufficientScope(CallerError):
    status = 403
    code = "insufficient_scope"

    def __init__(self, refused: list[str]) -> None:
        super().__init__("The caller's grant does not include the requested scope(s): " + " ".join(refused) + ".")
        self.refused = refused


class NotFound(CallerError):
    status = 404
    code = "not_found"


class ReadOnly(CallerError):
    status = 409
    code = "read_only"


class RateLimited(CallerError):
    """The caller asked for tokens faster than its `rate_limit_per_second` (and burst) allow."""

    status = 429
    code = "rate_limited"

    def __init__(self, caller: str, per_second: float, burst: int, retry_after: float) -> None:
        self.retry_after = max(1, math.ceil(retry_after))  # whole seconds, as Retry-After wants
        super().__init__(
            f"Caller {caller} is over its rate limit of {per_second:.15g} token requests per second"
            f" (burst {burst}): retry in {self.retry_after} s."
        )

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}


class UpstreamError(BrokerError):
    status = 502


class UpstreamRejected(UpstreamError):
    """The authorization server refused the request; retrying will not help."""

    status = 502
    code = "upstream_rejected"

    def __init__(self, description: str, *, upstream_error: str | None, upstream_status: int) -> None:
        super().__init__(description)
        self.upstream_error = upstream_error
        self.upstream_status = upstream_status

    def body(self) -> dict[str, Any]:
        return {
            **super().body(),
            "upstream_error": self.upstream_error,
            "upstream_status": self.upstream_status,
        }


class UpstreamInvalidResponse(UpstreamError):
    status = 502
    code = "upstream_invalid_response"


class UpstreamUnavailable(UpstreamError):
    """Transient: connect error, timeout, 429, 5xx. Worth retrying later."""

    status = 503
    code = "upstream_unavailable"

    def __init__(self, description: str, *, retry_after: float | None = None) -> None:
        super().__init__(description)
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        seconds = max(1, round(self.retry_after)) if self.retry_after is not None else 1
        return {"Retry-After": str(seconds)}


class StoreUnavailable(BrokerError):
    status = 503
    code = "temporarily_unavailable"


class StoreBusy(BrokerError):
    """Every Redis connection was in use for longer than the pool waits: the broker is overloaded.

    Not an outage: nothing falls back to fetching without the lock, which would turn load into a
    stampede upstream. A still-valid token is served instead where there is one.
    """

    status = 503
    code = "temporarily_unavailable"

    def headers(self) -> dict[str, str]:
        return {"Retry-After": "1"}


class ConfigError(Exception):
    """Invalid configuration; `problems` holds one line per problem, each naming its key."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems
