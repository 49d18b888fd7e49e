"""The one exception tree of token-broker, and how each error answers over HTTP.

BrokerError                      base: status, OAuth-style code, human sentence
├── CallerError                  the caller's request cannot be served (4xx)
│   ├── InvalidRequest           400 invalid_request
│   ├── InvalidCallerToken       401 invalid_token
│   ├── AccessDenied             403 access_denied (same answer whether or not the credential exists)
│   ├── InsufficientScope        403 insufficient_scope
│   ├── NotFound                 404 not_found (admin API: no such credential or caller)
│   └── ReadOnly                 409 read_only (admin API: the entry comes from the config file)
├── UpstreamError                the authorization server did not give us a token (5xx)
│   ├── UpstreamRejected         502 upstream_rejected: terminal, not retried
│   ├── UpstreamInvalidResponse  502 upstream_invalid_response: not a valid token response
│   ├── UpstreamUnavailable      503 upstream_unavailable: transient, retried
│   └── ReauthorizationRequired  409 reauthorization_required: a user's grant is gone; log in again
├── StoreUnavailable             Redis could not be reached (handled inside the token service)
└── StoreBusy                    503 temporarily_unavailable: no Redis connection free in time (load)

ConfigError                      invalid configuration: one line per problem (not a BrokerError:
                                 it never reaches a caller, it stops the process with exit code 2)
"""

from __future__ import annotations

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
    "ReadOnly",
    "ReauthorizationRequired",
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

    def __init__(self, description: str, *, retry_after: float | None = None, maybe_sent: bool = False) -> None:
        super().__init__(description)
        self.retry_after = retry_after
        # The request may have reached the server and its answer got lost (a read timeout, a
        # dropped connection): for a refresh token, that means it may have been spent.
        self.maybe_sent = maybe_sent

    def headers(self) -> dict[str, str]:
        seconds = max(1, round(self.retry_after)) if self.retry_after is not None else 1
        return {"Retry-After": str(seconds)}


class ReauthorizationRequired(UpstreamError):
    """A subject's grant cannot give tokens any more (refused, revoked, or a refresh whose answer
    was lost): only a new login helps. A still-valid cached token is served meanwhile."""

    status = 409
    code = "reauthorization_required"


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
