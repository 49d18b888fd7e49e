"""The browser side of the test authorization server's authorization code grant: the
authorization request and its checks, the users, the login page and error page, and the
redirects back to the client. tests/authserver_code.py serves them at /authorize."""

from __future__ import annotations

import dataclasses
import html
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final
from urllib.parse import urlencode, urlsplit, urlunsplit

from starlette.responses import HTMLResponse, RedirectResponse, Response

OIDC_SCOPES: Final = ("openid", "profile", "email", "offline_access")  # plus any "urn:…" scope
AUTH_PARAMS: Final = (
    "response_type",
    "client_id",
    "redirect_uri",
    "scope",
    "state",
    "nonce",
    "code_challenge",
    "code_challenge_method",
    "login_hint",
    "response_mode",
    "prompt",
)
PKCE_FORMAT: Final = re.compile(r"[A-Za-z0-9._~-]{43,128}")


@dataclasses.dataclass(frozen=True)
class User:
    password: str
    sub: str
    email: str | None = None
    name: str | None = None

    def claims(self, scopes: Iterable[str]) -> dict[str, Any]:
        scopes = set(scopes)
        claims: dict[str, Any] = {}
        if "email" in scopes and self.email is not None:
            claims |= {"email": self.email, "email_verified": True}
        if "profile" in scopes and self.name is not None:
            claims["name"] = self.name
        return claims


# bob's sub has a "|" like Auth0's ("auth0|…"): it must survive a URL path.
DEFAULT_USERS: Final = {
    "alice": User("alice-password", "user-alice", "alice@example.com", "Alice Example"),
    "bob": User("bob-password", "auth0|bob-42", "bob@example.com", "Bob Example"),
}


_USER_FIELDS: Final = frozenset(field.name for field in dataclasses.fields(User))


def users_from(data: object) -> dict[str, User]:
    """Users from a /_control/users body: {username: {password, sub, email?, name?}}."""
    if not isinstance(data, dict):
        raise TypeError('expected {"<username>": {"password": …, "sub": …, "email"?: …, "name"?: …}}')
    users = {}
    for username, fields in data.items():
        if not isinstance(fields, dict) or not {"password", "sub"} <= set(fields) <= _USER_FIELDS:
            raise ValueError(f"user {username!r}: password and sub required; email and name optional")
        if not all(isinstance(value, str) and value for value in fields.values()):
            raise TypeError(f"user {username!r}: every field must be a non-empty string")
        users[username] = User(**fields)
    return users


@dataclasses.dataclass(frozen=True)
class AuthorizationRequest:
    params: dict[str, str]  # as given (non-empty values), for the form's hidden fields
    client_id: str
    redirect_uri: str
    scope: str
    state: str
    nonce: str
    code_challenge: str


class PageError(Exception):
    """Shown to the user as a 400 page: the redirect_uri is not (yet) known to be the client's."""

    def __init__(self, error: str, description: str) -> None:
        super().__init__(description)
        self.error, self.description = error, description


class RedirectError(Exception):
    """Sent back to the client's validated redirect_uri."""

    def __init__(self, error: str, description: str, redirect_uri: str, state: str | None) -> None:
        super().__init__(description)
        self.error, self.description, self.redirect_uri, self.state = error, description, redirect_uri, state


def check_request(
    pairs: list[tuple[str, str]], known_client: Callable[[str], bool], redirect_uris: Mapping[str, list[str]]
) -> AuthorizationRequest:
    """The authorization request in pairs (query or form), checked in the order of
    panva/node-oidc-provider; PageError until client_id and redirect_uri are good, then RedirectError."""
    names = [name for name, _ in pairs]
    repeated = sorted({name for name in names if names.count(name) > 1})
    # Empty parameters count as absent (RFC 6749 §3.1).
    params = {name: value for name, value in pairs if name in AUTH_PARAMS and value}
    if {"client_id", "redirect_uri"} & set(repeated):
        raise PageError("invalid_request", "client_id and redirect_uri must not be repeated")
    client_id = params.get("client_id")
    if client_id is None:
        raise PageError("invalid_request", "client_id is missing")
    if not known_client(client_id):
        raise PageError("invalid_client", f"unknown client {client_id!r}")
    redirect_uri = params.get("redirect_uri")
    if redirect_uri is None:
        raise PageError("invalid_request", "redirect_uri is missing")
    if redirect_uri not in redirect_uris.get(client_id, []):
        raise PageError("invalid_request", f"redirect_uri {redirect_uri!r} is not registered for this client")
    state = params.get("state")

    def fail(error: str, description: str) -> RedirectError:
        return RedirectError(error, description, redirect_uri, state)

    if repeated:
        raise fail("invalid_request", f"parameters must not be repeated: {' '.join(repeated)}")
    for unsupported in ("request", "request_uri"):
        if any(name == unsupported for name, _ in pairs):
            raise fail(f"{unsupported}_not_supported", f"{unsupported} is not supported")
    response_type = params.get("response_type")
    if response_type is None:
        raise fail("invalid_request", "response_type is missing")
    if response_type != "code":
        raise fail("unsupported_response_type", "only response_type=code is supported")
    if params.get("response_mode", "query") != "query":
        raise fail("invalid_request", "only response_mode=query is supported")
    scopes = params.get("scope", "").split()
    if "openid" not in scopes:
        raise fail("invalid_scope", "scope must include openid")
    if unknown := [s for s in scopes if s not in OIDC_SCOPES and not s.startswith("urn:")]:
        raise fail("invalid_scope", f"unknown scope: {' '.join(unknown)}")
    if state is None:
        raise fail("invalid_request", "state is required")
    nonce = params.get("nonce")
    if nonce is None:
        raise fail("invalid_request", "nonce is required")
    method, challenge = params.get("code_challenge_method"), params.get("code_challenge")
    if method is None or challenge is None:
        raise fail("invalid_request", "PKCE is required: code_challenge and code_challenge_method=S256")
    if method != "S256":
        raise fail("invalid_request", "code_challenge_method must be S256")
    if not PKCE_FORMAT.fullmatch(challenge):
        raise fail("invalid_request", "code_challenge must be 43-128 characters of A-Z a-z 0-9 . _ ~ -")
    if "none" in params.get("prompt", "").split():
        raise fail("login_required", "the user is not signed in")
    return AuthorizationRequest(params, client_id, redirect_uri, " ".join(scopes), state, nonce, challenge)


def authorization_response(issuer: str, uri: str, params: dict[str, str | None], status: int) -> Response:
    """The redirect to the client with params and iss (RFC 9207); an existing query is kept (RFC 6749 §3.1.2)."""
    answer = {k: v for k, v in params.items() if v is not None} | {"iss": issuer}
    parts = urlsplit(uri)
    extra = urlencode(answer)
    location = urlunsplit(parts._replace(query=f"{parts.query}&{extra}" if parts.query else extra))
    return RedirectResponse(location, status, headers={"Cache-Control": "no-store"})


def error_response(issuer: str, exc: RedirectError, status: int) -> Response:
    params = {"error": exc.error, "error_description": exc.description, "state": exc.state}
    return authorization_response(issuer, exc.redirect_uri, params, status)


_PAGE_HEADERS: Final = {
    "Cache-Control": "no-store",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
}


def _html(title: str, body: str, status: int = 200, form_action: str = "'none'") -> HTMLResponse:
    page = (
        f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title></head>'
        f"<body><main>\n{body}\n</main></body></html>\n"
    )
    # The login form posts to itself and is then redirected to the client: both must be allowed.
    csp = f"default-src 'none'; form-action {form_action}; frame-ancestors 'none'; base-uri 'none'"
    return HTMLResponse(page, status, headers={**_PAGE_HEADERS, "Content-Security-Policy": csp})


def error_page(exc: PageError) -> HTMLResponse:
    body = (
        "<h1>Sign-in error</h1>\n"
        f'<p>error: <code id="error">{html.escape(exc.error)}</code></p>\n'
        f'<p id="error_description">{html.escape(exc.description)}</p>'
    )
    return _html("Sign-in error", body, 400)


def login_page(auth: AuthorizationRequest, message: str | None = None, username: str | None = None) -> HTMLResponse:
    hidden = "\n".join(
        f'<input type="hidden" name="{name}" value="{html.escape(value)}">' for name, value in auth.params.items()
    )
    prefill = html.escape(username if username is not None else auth.params.get("login_hint", ""))
    alert = f'<p role="alert" id="message">{html.escape(message)}</p>\n' if message else ""
    body = (
        "<h1>Sign in</h1>\n"
        f"<p><b>{html.escape(auth.client_id)}</b> asks for: <code>{html.escape(auth.scope)}</code></p>\n"
        f'{alert}<form method="post" action="/authorize">\n{hidden}\n'
        f'<label>Username <input name="username" value="{prefill}" autocomplete="username"></label>\n'
        '<label>Password <input name="password" type="password" autocomplete="current-password"></label>\n'
        '<button type="submit" name="decision" value="allow">Allow</button>\n'
        '<button type="submit" name="decision" value="deny">Deny</button>\n'
        "</form>"
    )
    parts = urlsplit(auth.redirect_uri)
    return _html("Sign in", body, form_action=f"'self' {parts.scheme}://{parts.netloc}")
