"""The HTTP routes. Checks run in the order of spec §3.3: caller (middleware), grant, syntax,
scopes within the grant, the caller's rate limit (token requests only), then the token itself."""

from __future__ import annotations

import importlib.resources
import json
from datetime import UTC, datetime
from typing import Any

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from broker import metrics as metrics_mod
from broker import scopes
from broker.api.state import Broker
from broker.callers import CallerRegistry
from broker.errors import AccessDenied, InvalidRequest, InvalidScope
from broker.vault.models import CallerSettings, CredentialSettings

__all__ = [
    "get_token",
    "healthz",
    "invalidate_token",
    "json_body",
    "metrics",
    "openapi",
    "parse_min_ttl",
    "read_body",
    "readyz",
    "scope_set_for",
    "single_query",
]

MAX_MIN_TTL = 366 * 24 * 3600
MAX_QUERY_BYTES = 4096
_NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}
_INVALIDATION_OUTCOMES = {
    "dropped": "invalidated",
    "not_current": "invalidate_noop",
    "throttled": "invalidate_throttled",
}
# Package data: found wherever the package is installed (the image too), not only in a checkout.
_OPENAPI = importlib.resources.files("broker") / "openapi.yaml"


def _broker(request: Request) -> Broker:
    broker: Broker = request.state.broker
    return broker


def _granted(request: Request) -> tuple[CredentialSettings, frozenset[str]]:
    """The grant check: 403 access_denied before anything else about the request is looked at."""
    caller: CallerSettings = request.state.caller
    name: str = request.path_params["credential"]
    granted = CallerRegistry.granted_scopes(caller, name)
    request.state.credential = name
    credential = _broker(request).credential(name)
    if credential is None:
        raise AccessDenied()  # a grant left behind by a credential that is gone: the same answer as none
    if credential.grant != "client_credentials":
        raise InvalidRequest(
            f"Users log in to credential {name}: ask for a user's token at /v1/tokens/{name}/subjects/{{subject}}."
        )
    return credential, granted


def scope_set_for(credential: CredentialSettings, granted: frozenset[str], raw_scope: str | None) -> str:
    """Syntax of the scope parameter (400), then scopes within the grant (403) → canonical scope set.

    No scope named means the credential's default scopes; without those, the request is refused
    (spec §4.8): an upstream request without scope lets the authorization server choose.
    """
    requested = scopes.parse(raw_scope) if raw_scope is not None else ()
    if not requested:
        requested = credential.default_scopes
        if not requested:
            raise InvalidScope(
                f"Credential {credential.name} has no default scopes: name the scopes you need with scope=…."
            )
    CallerRegistry.check_scopes(granted, requested)
    return scopes.canonical(requested)


def single_query(request: Request, name: str) -> str | None:
    values = request.query_params.getlist(name)
    if len(values) > 1:
        raise InvalidRequest(f"The {name} parameter may be given only once.")
    return values[0] if values else None


def parse_min_ttl(raw: str | None) -> int:
    if raw is None:
        return 0
    if not raw.isascii() or not raw.isdigit() or len(raw) > 9 or int(raw) > MAX_MIN_TTL:
        raise InvalidRequest("min_ttl must be a non-negative integer number of seconds (at most a year).")
    return int(raw)


async def get_token(request: Request) -> Response:
    broker = _broker(request)
    credential, granted = _granted(request)
    if len(request.scope["query_string"]) > MAX_QUERY_BYTES:
        raise InvalidRequest(f"The query string is longer than {MAX_QUERY_BYTES} bytes.")
    raw_scope = single_query(request, "scope")
    min_ttl = parse_min_ttl(single_query(request, "min_ttl"))
    scope_set = scope_set_for(credential, granted, raw_scope)
    caller: CallerSettings = request.state.caller
    await broker.limiter.spend(caller)
    entry, source = await broker.tokens.get(credential, scope_set, min_ttl)
    request.state.outcome = source
    ttl = entry.expires - broker.clock.monotonic()
    broker.tokens.stats.handout(credential.name, source, ttl)
    broker.audit.record(caller.name, credential.name, scope_set, entry.fingerprint, source)
    body = {
        "access_token": entry.access_token,
        "token_type": "Bearer",
        "expires_in": max(0, int(ttl)),
        "expires_at": datetime.fromtimestamp(entry.expires_at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "scope": entry.scope,
    }
    return JSONResponse(body, headers=_NO_STORE)


async def invalidate_token(request: Request) -> Response:
    """Not rate-limited: it hands out no token, a drop per scope set is already throttled by
    `invalidate_min_interval_seconds`, and a caller over its limit must still be able to report a
    revoked token that every other caller of the scope set would otherwise keep getting."""
    broker = _broker(request)
    credential, granted = _granted(request)
    payload = await json_body(request, broker.settings.server.max_body_bytes)
    token = payload.get("access_token")
    if not isinstance(token, str) or not token or len(token) > 16384 or not _printable_ascii(token):
        raise InvalidRequest("The body must carry the rejected access_token as a string.")
    raw_scope = payload.get("scope")
    if "scope" in payload and not isinstance(raw_scope, str):
        raise InvalidRequest("scope must be a space-separated string.")
    scope_set = scope_set_for(credential, granted, raw_scope)
    result = await broker.tokens.invalidate(credential, scope_set, token)
    request.state.outcome = _INVALIDATION_OUTCOMES[result]
    return Response(status_code=204, headers=_NO_STORE)


def _printable_ascii(text: str) -> bool:
    return text.isascii() and text.isprintable()


async def read_body(request: Request, limit: int, shape: str) -> bytes:
    """The request body, at most `limit` bytes (declared or sent), else InvalidRequest naming `shape`."""
    declared = request.headers.get("content-length")
    if declared is not None and not (declared.isascii() and declared.isdigit() and int(declared[:12]) <= limit):
        raise InvalidRequest(f"The request body must be {shape} of at most {limit} bytes.")
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise InvalidRequest(f"The request body must be {shape} of at most {limit} bytes.")
            chunks.append(chunk)
    except ClientDisconnect:
        raise InvalidRequest("The request body was cut short.") from None
    return b"".join(chunks)


async def json_body(request: Request, limit: int) -> dict[str, Any]:
    body = await read_body(request, limit, "a JSON object")
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise InvalidRequest("The request body is not valid JSON.") from None
    if not isinstance(payload, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    return payload


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    broker = _broker(request)
    if not broker.health.redis_seen:
        return JSONResponse({"status": "starting", "redis": "unknown"}, status_code=503)
    if not broker.store.reachable:
        return JSONResponse({"status": "degraded", "redis": "unreachable"})
    return JSONResponse({"status": "ok", "redis": "ok"})


async def metrics(request: Request) -> Response:
    broker = _broker(request)
    broker.tokens.stats.flush(len(broker.tokens.l1))  # this worker's latest; others flush every second
    return Response(metrics_mod.render(), media_type=metrics_mod.CONTENT_TYPE_LATEST)


async def openapi(request: Request) -> Response:
    return Response(_OPENAPI.read_text(encoding="utf-8"), media_type="application/yaml")
