"""The one exception tree of token-broker, and how each error answers over HTTP.

Every error has two renderings: the `/v1` JSON API's (`status`, `code`, spec §3.3) and the OAuth
2.0 token-endpoint facade's (`facade`: status and RFC 6749 §5.2 code, spec §3.5). A class that
does not declare its `facade` rendering is refused when it is defined.

                                 /v1                            facade (RFC 6749)
BrokerError                      500 server_error               500 server_error
├── CallerError                  the caller's request cannot be served (4xx)
│   ├── InvalidRequest           400 invalid_request            400 invalid_request
│   │   └── InvalidScope         400 invalid_request            400 invalid_scope: a malformed scope,
│   │                                                           or none and no default scopes
│   ├── UnsupportedGrantType     400 unsupported_grant_type     400 unsupported_grant_type
│   ├── InvalidCallerToken       401 invalid_token              401 invalid_client
│   │   └── JWTRefused           401 invalid_token              401 invalid_client: a caller JWT not
│   │       │                                                   accepted; one sentence for every reason
│   │       └── KeysNeeded       (broker/caller_jwt.py) only a key set fetch can tell; answered as its parent
│   ├── AccessDenied             403 access_denied              400 unauthorized_client (both: the same
│   │                                                           answer whether or not the credential exists)
│   ├── InsufficientScope        403 insufficient_scope         400 invalid_scope
│   ├── NotFound                 404 not_found                  404 not_found (admin API: no such entry)
│   ├── ReadOnly                 409 read_only                  400 invalid_request (admin API only: an
│   │                                                           entry from the config file)
│   └── RateLimited              429 rate_limited               429 rate_limited: over the caller's rate
│                                                               limit; Retry-After
├── UpstreamError                the authorization server did not give us a token (5xx)
│   ├── UpstreamRejected         502 upstream_rejected          502 server_error: terminal, not retried
│   ├── UpstreamInvalidResponse  502 upstream_invalid_response  502 server_error: not a valid token response
│   ├── UpstreamUnavailable      503 upstream_unavailable       503 temporarily_unavailable: transient, retried
│   └── ReauthorizationRequired  409 reauthorization_required   400 invalid_grant: a user's grant is gone
├── StoreUnavailable             Redis could not be reached (handled inside the token service)
└── StoreBusy                    503 temporarily_unavailable    503 temporarily_unavailable: no Redis
                                                                connection free in time (load)

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
    "InvalidScope",
    "JWTRefused",
    "NotFound",
    "RateLimited",
    "ReadOnly",
    "ReauthorizationRequired",
    "StoreBusy",
    "StoreUnavailable",
    "UnsupportedGrantType",
    "UpstreamError",
    "UpstreamInvalidResponse",
    "UpstreamRejected",
    "UpstreamUnavailable",
]


class BrokerError(Exception):
    status: ClassVar[int] = 500
    code: ClassVar[str] = "server_error"
    facade: ClassVar[tuple[int, str]] = (500, "server_error")  # status and RFC 6749 code on the facade

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "facade" not in cls.__dict__:
            raise TypeError(f"{cls.__name__} must declare its OAuth facade rendering: facade = (status, code)")

    def __init__(self, description: str) -> None:
        super().__init__(description)
        self.description = description

    def body(self) -> dict[str, Any]:
        return {"error": self.code, "error_description": self.description}

    def headers(self) -> dict[str, str]:
        return {}

    def facade_body(self) -> dict[str, Any]:
        """RFC 6749 §5.2: `error` and `error_description`, nothing else."""
        return {"error": self.facade[1], "error_description": self.description}

    def facade_headers(self) -> dict[str, str]:
        """The facade's headers: `Retry-After` on every 503 (one second unless the error knows better)."""
        headers = {name: value for name, value in self.headers().items() if name == "Retry-After"}
        if self.facade[0] == 503:
            headers.setdefault("Retry-After", "1")
        return headers


class CallerError(BrokerError):
    status = 400
    facade = (400, "invalid_request")


class InvalidRequest(CallerError):
    status = 400
    code = "invalid_request"
    facade = (400, "invalid_request")


class InvalidScope(InvalidRequest):
    """The scope parameter cannot be used: malformed, or absent for a credential without default
    scopes. RFC 6749 §3.3 and §5.2 call both invalid_scope; the /v1 API calls them invalid_request."""

    facade = (400, "invalid_scope")


class UnsupportedGrantType(CallerError):
    """Another grant_type than client_credentials at the facade's token endpoint."""

    status = 400
    code = "unsupported_grant_type"
    facade = (400, "unsupported_grant_type")


class InvalidCallerToken(CallerError):
    status = 401
    code = "invalid_token"
    facade = (401, "invalid_client")

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": 'Bearer realm="token-broker", error="invalid_token"'}

    def facade_headers(self) -> dict[str, str]:
        # RFC 6749 §5.2: a 401 names the scheme the client may use; the facade takes Basic (or the body).
        return {"WWW-Authenticate": 'Basic realm="token-broker"'}


class JWTRefused(InvalidCallerToken):
    """A caller JWT that is not accepted (spec §6.3): one answer whatever the reason, so an answer
    never tells which check failed; `reason` (and `detail`) are for the operators' log."""

    facade = (401, "invalid_client")

    def __init__(self, reason: str, **detail: str) -> None:
        super().__init__("The caller token is not valid.")
        self.reason = reason
        self.detail = detail


class AccessDenied(CallerError):
    status = 403
    code = "access_denied"
    facade = (400, "unauthorized_client")

    def __init__(self) -> None:
        # One fixed sentence: nothing in it may depend on whether the credential exists.
        super().__init__("This caller has no grant for the requested credential.")


class InsufficientScope(CallerError):
    status = 403
    code = "insufficient_scope"
    facade = (400, "invalid_scope")

    def __init__(self, refused: list[str]) -> None:
        super().__init__("The caller's grant does not include the requested scope(s): " + " ".join(refused) + ".")
        self.refused = refused


class NotFound(CallerError):
    """No such thing to look at (a credential's discovery document, the facade while it is off, an
    admin API entry)."""

    status = 404
    code = "not_found"
    facade = (404, "not_found")


class ReadOnly(CallerError):
    status = 409
    code = "read_only"
    facade = (400, "invalid_request")  # the facade has no admin routes: never rendered there


class RateLimited(CallerError):
    """The caller asked for tokens faster than its `rate_limit_per_second` (and burst) allow."""

    status = 429
    code = "rate_limited"
    facade = (429, "rate_limited")  # RFC 6749 has no code for it; clients read 429 and Retry-After

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
    facade = (502, "server_error")


class UpstreamRejected(UpstreamError):
    """The authorization server refused the request; retrying will not help."""

    status = 502
    code = "upstream_rejected"
    facade = (502, "server_error")

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
    facade = (502, "server_error")


class UpstreamUnavailable(UpstreamError):
    """Transient: connect error, timeout, 429, 5xx. Worth retrying later."""

    status = 503
    code = "upstream_unavailable"
    facade = (503, "temporarily_unavailable")

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
    facade = (400, "invalid_grant")


class StoreUnavailable(BrokerError):
    status = 503
    code = "temporarily_unavailable"
    facade = (503, "temporarily_unavailable")


class StoreBusy(BrokerError):
    """Every Redis connection was in use for longer than the pool waits: the broker is overloaded.

    Not an outage: nothing falls back to fetching without the lock, which would turn load into a
    stampede upstream. A still-valid token is served instead where there is one.
    """

    status = 503
    code = "temporarily_unavailable"
    facade = (503, "temporarily_unavailable")

    def headers(self) -> dict[str, str]:
        return {"Retry-After": "1"}


class ConfigError(Exception):
    """Invalid configuration; `problems` holds one line per problem, each naming its key."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems
