"""The OAuth 2.0 token-endpoint facade (spec §3.5): each credential is an issuer of its own.

    issuer = {public_url}/oauth2/{credential}                      byte for byte, in every document
    GET  {issuer}/.well-known/openid-configuration                 discovery; the same document at the
    GET  /.well-known/oauth-authorization-server/oauth2/{credential}   RFC 8414 location
    GET  {issuer}/jwks                                             the upstream's public keys
    POST {issuer}/token                                            RFC 6749 §4.4, client credentials

The token endpoint is `GET /v1/tokens/{credential}` in another dialect: the caller's name and
key are the client's `client_id` and `client_secret` (HTTP Basic, form-urldecoded parts, or the
form body); the checks run in the order of spec §3.3 (client authentication, grant, syntax,
scopes within the grant), through the same registry, token service, counters and audit trail;
and errors are the same exceptions, rendered per RFC 6749 §5.2 (`BrokerError.facade`). Hits
are answered by the fast path (broker/api/fastpath.py) with the same bytes, through the same
functions below.

The facade is off while `[server] public_url` is unset: every issuer is compared byte for byte
with the URL a client discovered, and a URL guessed from the request's Host header is wrong
behind a proxy (README, "Use it from your client library").
"""

from __future__ import annotations

import binascii
import json
from collections.abc import Callable
from typing import Any, NamedTuple
from urllib.parse import parse_qsl, unquote_plus

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from broker.api.routes import read_body, scope_set_for
from broker.api.state import Broker
from broker.callers import CallerRegistry
from broker.entries import CachedToken
from broker.errors import (
    AccessDenied,
    BrokerError,
    InvalidCallerToken,
    InvalidRequest,
    NotFound,
    UnsupportedGrantType,
)
from broker.vault.models import CallerSettings, CredentialSettings

__all__ = [
    "FORM_TYPE",
    "MAX_FORM_FIELDS",
    "ROUTES",
    "TokenRequest",
    "authenticate",
    "authorize",
    "discovery_document",
    "error_response",
    "issuer_of",
    "parse_token_request",
    "read_form",
    "token_request",
    "token_response_parts",
]

FORM_TYPE = "application/x-www-form-urlencoded"
MAX_FORM_FIELDS = 32
GRANT_TYPE = "client_credentials"
AUTH_METHODS = ("client_secret_basic", "client_secret_post")
_NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


def issuer_of(broker: Broker, name: str) -> str | None:
    """The issuer of credential `name`, or None while the facade is off (no public_url)."""
    public_url = broker.settings.server.public_url
    return None if public_url is None else f"{public_url}/oauth2/{name}"


def discovery_document(issuer: str, credential: CredentialSettings) -> dict[str, Any]:
    """The fields of RFC 8414 and OIDC Discovery that clients read, and no others: Authlib hands
    every top-level key to its session."""
    return {
        "issuer": issuer,
        "token_endpoint": f"{issuer}/token",
        "jwks_uri": f"{issuer}/jwks",
        "grant_types_supported": [GRANT_TYPE],
        "token_endpoint_auth_methods_supported": list(AUTH_METHODS),
        "response_types_supported": ["token"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["RS256"],
        "scopes_supported": list(credential.scopes),
    }


# -- the token request --------------------------------------------------------------------------


class TokenRequest(NamedTuple):
    """A token request as read from the wire: the client's credentials, and the parameters that
    are checked only after the client is authenticated and its grant found (spec §3.3)."""

    client_id: str
    client_secret: str
    grant_type: tuple[str, ...]  # every value sent
    scope: tuple[str, ...]

    def __repr__(self) -> str:
        return (
            f"TokenRequest(client_id={self.client_id!r}, client_secret='***',"
            f" grant_type={self.grant_type!r}, scope={self.scope!r})"
        )


def _basic(authorization: str) -> tuple[str, str]:
    """RFC 6749 §2.3.1: base64 of `form-urlencoded(id):form-urlencoded(secret)`. Decoding a raw
    name or key changes nothing (neither has '%' or '+'), so clients that skip the encoding work too."""
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() != "basic":
        raise InvalidCallerToken(
            "The token endpoint takes HTTP Basic client authentication, or client_id and client_secret in the body."
        )
    try:
        decoded = binascii.a2b_base64(value.strip().encode("ascii"), strict_mode=True).decode("utf-8")
    except ValueError:  # binascii.Error, UnicodeError
        raise InvalidCallerToken("The Basic credentials are not base64 of UTF-8 text.") from None
    client_id, colon, client_secret = decoded.partition(":")
    if not colon:
        raise InvalidCallerToken("The Basic credentials must be client_id:client_secret.")
    if "%" in decoded or "+" in decoded:  # what unquote_plus would change
        return unquote_plus(client_id), unquote_plus(client_secret)
    return client_id, client_secret


Form = dict[str, list[str]]  # every value of every field, in order


def read_form(content_type: str | None, body: bytes) -> Form:
    """The form body's fields. InvalidRequest for a body that is not a form."""
    if body and (content_type or "").split(";", 1)[0].strip().lower() != FORM_TYPE:
        raise InvalidRequest(f"The token request must be a form (Content-Type: {FORM_TYPE}).")
    try:
        pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True, max_num_fields=MAX_FORM_FIELDS)
    except UnicodeDecodeError:
        raise InvalidRequest("The form body is not UTF-8.") from None
    except ValueError:
        raise InvalidRequest(f"The form has more than {MAX_FORM_FIELDS} fields.") from None
    fields: Form = {}
    for name, value in pairs:
        fields.setdefault(name, []).append(value)
    return fields


def parse_token_request(authorization: str | None, content_type: str | None, body: bytes) -> TokenRequest:
    """Read the form and the client's credentials. InvalidRequest for a body that is not a form
    (the credentials may be in it) or credentials sent twice; InvalidCallerToken for none."""
    return token_request(authorization, read_form(content_type, body))


def token_request(authorization: str | None, fields: Form) -> TokenRequest:
    """The client's credentials (Basic or the form) and the parameters, from a form already read."""
    ids, secrets = fields.get("client_id", ()), fields.get("client_secret", ())
    if len(ids) > 1 or len(secrets) > 1:
        raise InvalidRequest("client_id and client_secret may be given only once.")
    if authorization:
        client_id, client_secret = _basic(authorization)
        # RFC 6749 §3.2.1 lets a client name itself with client_id beside Basic; a secret is a second method.
        if secrets or (ids and ids[0] != client_id):
            raise InvalidRequest("Send the client credentials with HTTP Basic or in the form body, not both.")
    elif ids and secrets:
        client_id, client_secret = ids[0], secrets[0]
    else:
        raise InvalidCallerToken(
            "Client authentication is required: HTTP Basic, or client_id and client_secret in the form body."
        )
    return TokenRequest(client_id, client_secret, tuple(fields.get("grant_type", ())), tuple(fields.get("scope", ())))


def authenticate(broker: Broker, request: TokenRequest) -> CallerSettings:
    """First check (spec §3.3): the client is a caller, by name and key. 401 invalid_client."""
    return broker.registry.snapshot.callers.authenticate_client(request.client_id, request.client_secret)


def _single(values: tuple[str, ...], name: str) -> str | None:
    if len(values) > 1:
        raise InvalidRequest(f"The {name} parameter may be given only once.")
    return values[0] if values else None


ScopeSetFor = Callable[[CredentialSettings, frozenset[str], str | None], str]


def authorize(
    broker: Broker,
    caller: CallerSettings,
    name: str,
    request: TokenRequest,
    scope_set_of: ScopeSetFor = scope_set_for,
) -> tuple[CredentialSettings, str]:
    """The checks after authentication, in order: grant (the same answer whether or not the
    credential exists), syntax, scopes within the grant → (credential, scope set).
    `scope_set_of` is the route's `scope_set_for`, or the fast path's memo of it."""
    granted = CallerRegistry.granted_scopes(caller, name)
    credential = broker.credential(name)
    if credential is None or credential.grant != "client_credentials":
        raise AccessDenied()  # users log in to the others: no client credentials grant for them
    grant_type = _single(request.grant_type, "grant_type")
    if grant_type is None:
        raise InvalidRequest(f"The grant_type parameter is required: grant_type={GRANT_TYPE}.")
    if grant_type != GRANT_TYPE:
        raise UnsupportedGrantType(f"This token endpoint supports only grant_type={GRANT_TYPE}.")
    return credential, scope_set_of(credential, granted, _single(request.scope, "scope"))


def token_response_parts(entry: CachedToken) -> tuple[bytes, bytes]:
    """The token endpoint's JSON body for `entry` (as JSONResponse renders it), split around the
    value of `expires_in`. RFC 6749 §5.1: `scope` is always sent, as granted."""
    head = b'{"access_token":' + _json(entry.access_token) + b',"token_type":"Bearer","expires_in":'
    return head, b',"scope":' + _json(entry.scope) + b"}"


def _json(value: str) -> bytes:
    return json.dumps(value, ensure_ascii=False).encode("utf-8")


def error_response(error: BrokerError) -> Response:
    """RFC 6749 §5.2: the error's facade status and code, never cached."""
    return JSONResponse(
        error.facade_body(), status_code=error.facade[0], headers={**_NO_STORE, **error.facade_headers()}
    )


# -- the routes ---------------------------------------------------------------------------------


def _facade_request(request: Request) -> tuple[Broker, str, str]:
    """Mark the request as the facade's (errors render per RFC 6749) → broker, credential name, issuer."""
    request.state.facade = True
    broker: Broker = request.state.broker
    name: str = request.path_params["credential"]
    issuer = issuer_of(broker, name)
    if issuer is None:
        raise NotFound("The OAuth facade is off: the broker's [server] public_url is not set.")
    return broker, name, issuer


def _published(broker: Broker, name: str) -> CredentialSettings:
    credential = broker.credential(name)
    if credential is None or credential.grant != "client_credentials":
        raise NotFound("No such credential.")
    return credential


async def discovery(request: Request) -> Response:
    broker, name, issuer = _facade_request(request)
    return JSONResponse(discovery_document(issuer, _published(broker, name)))


async def jwks(request: Request) -> Response:
    broker, name, _ = _facade_request(request)
    return JSONResponse(await broker.keys.get(_published(broker, name)))


async def token(request: Request) -> Response:
    broker, name, _ = _facade_request(request)
    form = await read_body(request, broker.settings.server.max_body_bytes, "a form")
    parsed = parse_token_request(request.headers.get("authorization"), request.headers.get("content-type"), form)
    caller = authenticate(broker, parsed)
    request.state.caller_name = caller.name
    request.state.credential = name
    credential, scope_set = authorize(broker, caller, name, parsed)
    await broker.limiter.spend(caller)  # spec §3.3: the rate limit answers after the scopes
    entry, source = await broker.tokens.get(credential, scope_set, broker.settings.facade.min_ttl_seconds)
    request.state.outcome = source
    ttl = entry.expires - broker.clock.monotonic()
    broker.tokens.stats.handout(name, source, ttl, facade=True)
    broker.audit.record(caller.name, name, scope_set, entry.fingerprint, source, "oauth2")
    answer = {"access_token": entry.access_token, "token_type": "Bearer", "expires_in": max(0, int(ttl))}
    return JSONResponse({**answer, "scope": entry.scope}, headers=_NO_STORE)


ROUTES = [
    Route("/oauth2/{credential}/.well-known/openid-configuration", discovery, methods=["GET"]),
    Route("/.well-known/oauth-authorization-server/oauth2/{credential}", discovery, methods=["GET"]),
    Route("/oauth2/{credential}/jwks", jwks, methods=["GET"]),
    Route("/oauth2/{credential}/token", token, methods=["POST"]),
]
