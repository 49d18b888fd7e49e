"""The routes of users who log in (spec §5): start a login, the browser's callback, a subject's
token, logout. The flows themselves are broker/logins.py; the token path is the one of every token.

Checks run in the order of spec §3.3: caller, grant for the credential, request syntax, scopes
within the grant, rate limit, then whose subject it is ("own" or "any"), then the token.
"""

from __future__ import annotations

import base64
import hashlib
import html
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response

from broker import scopes
from broker.api.routes import json_body, parse_min_ttl, scope_set_for, single_query
from broker.api.state import Broker
from broker.callers import CallerRegistry
from broker.errors import AccessDenied, BrokerError, InvalidRequest, NotFound, UpstreamRejected
from broker.logins import LoginFailed
from broker.vault.models import CallerSettings, CredentialSettings

__all__ = ["callback", "forget_subject", "start_login", "subject", "subject_token"]

_NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}
_STYLE = (
    "body{font:16px/1.5 system-ui,sans-serif;max-width:32rem;margin:4rem auto;padding:0 1rem;color:#222}"
    "h1{font-size:1.4rem}p.advice{color:#555}"
)
_STYLE_HASH = base64.b64encode(hashlib.sha256(_STYLE.encode()).digest()).decode()
# The callback page: no scripts, no style but its own (allowed by its hash, not any inline
# style), no framing, nothing sent on.
_PAGE_HEADERS = {
    **_NO_STORE,
    "Content-Security-Policy": f"default-src 'none'; style-src 'sha256-{_STYLE_HASH}'; frame-ancestors 'none';"
    " base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


def _broker(request: Request) -> Broker:
    broker: Broker = request.state.broker
    return broker


def _user_credential(request: Request) -> tuple[Broker, CallerSettings, CredentialSettings, frozenset[str]]:
    """Caller (middleware), then the grant (403, same answer whether or not the credential
    exists or has users), then: is it a credential users log in to?"""
    broker = _broker(request)
    caller: CallerSettings = request.state.caller
    name: str = request.path_params["credential"]
    granted = CallerRegistry.granted_scopes(caller, name)
    request.state.credential = name
    credential = broker.credential(name)
    if credential is None:
        raise AccessDenied()
    if credential.grant != "authorization_code":
        raise NotFound(f"Credential {name} has no users: its grant is {credential.grant}.")
    return broker, caller, credential, granted


def _subject(request: Request) -> str:
    subject: str = request.path_params["subject"]
    if not subject or len(subject) > 255 or not subject.isprintable():
        raise InvalidRequest("The subject must be 1-255 printable characters (the id_token's sub).")
    return subject


async def start_login(request: Request) -> Response:
    """POST /v1/authorizations/{credential}: {scope, login_hint?, return_to?} → {authorize_url, state, expires_in}."""
    broker, caller, credential, granted = _user_credential(request)
    body = await json_body(request, broker.settings.server.max_body_bytes)
    values: dict[str, str | None] = {}
    for field in ("scope", "login_hint", "return_to"):
        value = body.get(field)
        if value is not None and (not isinstance(value, str) or len(value) > 2048 or not value.isprintable()):
            raise InvalidRequest(f"{field} must be a string of at most 2048 printable characters.")
        values[field] = value
    unknown = set(body) - {"scope", "login_hint", "return_to"}
    if unknown:
        raise InvalidRequest(f"Unknown field(s) in the body: {', '.join(sorted(unknown))}.")
    requested = scopes.parse(values["scope"]) if values["scope"] else ()
    requested = tuple(s for s in requested if s != "openid")  # always asked for; not the caller's to grant
    scope_set = scope_set_for(credential, granted, " ".join(requested) if requested else None)
    await broker.limiter.spend(caller)
    started = await broker.logins.start(
        credential, caller, scope_set, login_hint=values["login_hint"], return_to=values["return_to"]
    )
    request.state.outcome = "login_started"
    return JSONResponse(started, headers=_NO_STORE)


def _start_again(error: BrokerError) -> bool:
    """The sign-in itself is spent (a bad state, a denial, a code the server refused as used or
    expired): only a new one can succeed; anything else may pass if tried again in a moment."""
    return isinstance(error, LoginFailed) or (
        isinstance(error, UpstreamRejected) and error.upstream_error == "invalid_grant"
    )


async def callback(request: Request) -> Response:
    """GET /v1/oauth/callback?code&state: the user's browser, back from the authorization server."""
    broker = _broker(request)
    wants_json = "application/json" in request.headers.get("accept", "")
    query = request.query_params
    try:
        login = await broker.logins.complete(
            dict(broker.registry.snapshot.credentials),
            state=query.get("state"),
            code=query.get("code"),
            error=query.get("error"),
            error_description=query.get("error_description"),
        )
    except BrokerError as error:
        request.state.error = error.code
        request.state.outcome = "login_failed"
        if wants_json:
            return JSONResponse(error.body(), status_code=error.status, headers=_NO_STORE)
        return _page(
            "Sign-in did not complete",
            error.description,
            "Go back to the application and start the sign-in again."
            if _start_again(error)
            else "The sign-in service could not finish it; try again in a moment.",
            error.status,
        )
    request.state.credential = login.credential
    request.state.outcome = "login_completed"
    if login.return_to:
        return RedirectResponse(login.return_to, status_code=303, headers=_NO_STORE)
    if wants_json:
        return JSONResponse({"subject": login.subject, "credential": login.credential}, headers=_NO_STORE)
    who = login.name or login.subject
    return _page("Signed in", f"You are signed in as {who}.", "You may close this window.", 200)


def _page(title: str, message: str, advice: str, status: int) -> Response:
    body = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{_STYLE}</style></head>
<body><main><h1>{html.escape(title)}</h1><p id="message">{html.escape(message)}</p>
<p class="advice">{html.escape(advice)}</p></main></body></html>
"""
    return Response(body, status_code=status, media_type="text/html; charset=utf-8", headers=_PAGE_HEADERS)


async def subject_token(request: Request) -> Response:
    """GET /v1/tokens/{credential}/subjects/{subject}?scope&min_ttl: a user's token (spec §5.4)."""
    broker, caller, credential, granted = _user_credential(request)
    subject = _subject(request)
    min_ttl = parse_min_ttl(single_query(request, "min_ttl"))
    scope_set = scope_set_for(credential, granted, single_query(request, "scope"))
    await broker.limiter.spend(caller)
    await broker.logins.check_access(credential, caller, subject)
    entry, source = await broker.tokens.get(credential, scope_set, min_ttl, subject)
    request.state.outcome = source
    ttl = entry.expires - broker.clock.monotonic()
    broker.tokens.stats.handout(credential.name, source, ttl)
    broker.audit.record(caller.name, credential.name, scope_set, entry.fingerprint, source)
    return JSONResponse(_token_body(entry.access_token, ttl, entry.expires_at, entry.scope), headers=_NO_STORE)


def _token_body(token: str, ttl: float, expires_at: float, scope: str) -> dict[str, Any]:
    from datetime import UTC, datetime  # noqa: PLC0415 - the shape of /v1/tokens' answer

    return {
        "access_token": token,
        "token_type": "Bearer",
        "expires_in": max(0, int(ttl)),
        "expires_at": datetime.fromtimestamp(expires_at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "scope": scope,
    }


async def forget_subject(request: Request) -> Response:
    """DELETE /v1/tokens/{credential}/subjects/{subject}: logout (spec §5.5). 204."""
    broker, caller, credential, _ = _user_credential(request)
    subject = _subject(request)
    await broker.logins.check_access(credential, caller, subject)
    revoked = await broker.logins.logout(credential, subject)
    request.state.outcome = "logout_revoked" if revoked else "logout"
    return Response(status_code=204, headers=_NO_STORE)


_SUBJECT = {"GET": subject_token, "DELETE": forget_subject}


async def subject(request: Request) -> Response:
    """One route for a subject (a 405 lists both methods in `Allow`), dispatched by method."""
    return await _SUBJECT[request.method](request)
