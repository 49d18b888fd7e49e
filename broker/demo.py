"""A small demo authorization server for `token-broker dev`: the client credentials grant, and
the authorization code grant with OpenID Connect for one demo user (a login page, PKCE S256,
RS256 id_tokens, rotating refresh tokens whose reuse revokes the grant, RFC 7009 revocation),
RS256 JWT access tokens, a JWKS and an OIDC discovery document. Everything lives in memory.
Not for production."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import html
import re
import secrets
import time
import uuid
from collections.abc import Collection, Mapping
from typing import Any, Final
from urllib.parse import parse_qsl, unquote_plus, urlencode, urlsplit

from joserfc import jwt
from joserfc.jwk import KeySet, RSAKey
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route

__all__ = [
    "DEMO_CLIENT_ID",
    "DEMO_PASSWORD",
    "DEMO_SCOPES",
    "DEMO_SUBJECT",
    "DEMO_USER",
    "create_demo_authserver",
]

DEMO_CLIENT_ID = "demo-client"
DEMO_SCOPES = ("urn:demo:claims.read", "urn:demo:claims.write")
DEMO_USER = "demo-user"
DEMO_PASSWORD = "demo-password"  # noqa: S105 - printed in the `dev` banner on purpose
DEMO_SUBJECT = "demo-user-0001"

_CODE_LIFETIME: Final = 60
_ID_TOKEN_LIFETIME: Final = 300
_LOGIN_SCOPES: Final = frozenset({"openid", "profile", *DEMO_SCOPES})
_PKCE: Final = re.compile(r"[A-Za-z0-9._~-]{43,128}")
_STYLE: Final = (
    "body{font:16px/1.4 system-ui,sans-serif;max-width:24rem;margin:4rem auto;padding:0 1rem}"
    "label{display:block;margin:.8rem 0}input{display:block;width:100%;padding:.4rem}"
    "button{margin:1rem .5rem 0 0;padding:.4rem 1.2rem}.error{color:#b00020}"
)
_STYLE_HASH: Final = base64.b64encode(hashlib.sha256(_STYLE.encode()).digest()).decode()


def _client_from(request: Request, form: dict[str, str]) -> tuple[str, str] | None:
    header = request.headers.get("authorization", "")
    if header.lower().startswith("basic "):
        try:
            raw = base64.b64decode(header[6:], validate=True).decode()
        except ValueError:
            return None
        client_id, sep, secret = raw.partition(":")
        return (unquote_plus(client_id), unquote_plus(secret)) if sep else None
    if "client_id" in form and "client_secret" in form:
        return form["client_id"], form["client_secret"]
    return None


def _oauth_error(code: str, description: str, status: int = 400) -> JSONResponse:
    return JSONResponse({"error": code, "error_description": description}, status_code=status)


def _same(given: str, expected: str) -> bool:
    """Constant-time equality; on str, hmac.compare_digest raises for non-ASCII input."""
    return hmac.compare_digest(given.encode(), expected.encode())


def _s256(verifier: str) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()


class _PageError(Exception):
    """A bad client_id or redirect_uri: shown to the user, never redirected (RFC 6749 §4.1.2.1)."""


class _RedirectError(Exception):
    def __init__(self, redirect_uri: str, state: str | None, error: str, description: str) -> None:
        super().__init__(description)
        self.redirect_uri, self.state, self.error = redirect_uri, state, error


@dataclasses.dataclass(frozen=True)
class _Login:
    """A checked authorization request."""

    params: dict[str, str]
    redirect_uri: str
    scope: str
    state: str
    nonce: str
    code_challenge: str


@dataclasses.dataclass
class _Code:
    login: _Login
    auth_time: int
    expires_at: float
    grant_id: str
    used: bool = False


@dataclasses.dataclass
class _Refresh:
    """A refresh token: its grant, and what every token of the grant carries."""

    grant_id: str
    scope: str
    nonce: str
    auth_time: int
    used: bool = False


class _DemoServer:
    def __init__(self, issuer: str, client_secret: str, lifetime: int, redirect_uris: frozenset[str]) -> None:
        self.issuer, self.client_secret, self.lifetime = issuer, client_secret, lifetime
        self.redirect_uris = redirect_uris
        self.key = RSAKey.generate_key(2048, parameters={"kid": secrets.token_hex(4), "use": "sig", "alg": "RS256"})
        self.codes: dict[str, _Code] = {}
        self.refresh_tokens: dict[str, _Refresh] = {}
        self.revoked_grants: set[str] = set()
        origins = " ".join(sorted({f"{urlsplit(u).scheme}://{urlsplit(u).netloc}" for u in redirect_uris}))
        # No scripts at all; the form may post to itself and be redirected to the broker's callback.
        self.csp = (
            f"default-src 'none'; style-src 'sha256-{_STYLE_HASH}'; form-action 'self' {origins};"
            " frame-ancestors 'none'; base-uri 'none'"
        )

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/oauth/token", self.token, methods=["POST"]),
                Route("/authorize", self.authorize, methods=["GET", "POST"]),
                Route("/revoke", self.revoke, methods=["POST"]),
                Route("/.well-known/openid-configuration", self.discovery),
                Route("/jwks", self.jwks),
            ]
        )

    def _sign(self, claims: dict[str, Any]) -> str:
        return jwt.encode({"alg": "RS256", "kid": self.key.kid}, claims, self.key)

    def _client_ok(self, request: Request, form: dict[str, str]) -> bool:
        client = _client_from(request, form)
        return client is not None and client[0] == DEMO_CLIENT_ID and _same(client[1], self.client_secret)

    # --- the token endpoint -------------------------------------------------------------------

    async def token(self, request: Request) -> JSONResponse:
        form = dict(parse_qsl((await request.body()).decode("utf-8", "replace")))
        if not self._client_ok(request, form):
            return _oauth_error("invalid_client", "Client authentication failed.", 401)
        match form.get("grant_type"):
            case "client_credentials":
                requested = form.get("scope", "").split() or [DEMO_SCOPES[0]]
                if any(s not in DEMO_SCOPES for s in requested):
                    return _oauth_error("invalid_scope", "A requested scope is not known.")
                return self._answer(DEMO_CLIENT_ID, " ".join(requested), form.get("audience", "demo-api"))
            case "authorization_code":
                return self._redeem(form)
            case "refresh_token":
                return self._refresh(form)
        return _oauth_error(
            "unsupported_grant_type", "Supported: client_credentials, authorization_code, refresh_token."
        )

    def _answer(self, sub: str, scope: str, audience: str = "demo-api", **extra: str) -> JSONResponse:
        now = int(time.time())
        claims = {"iss": self.issuer, "sub": sub, "aud": audience, "scope": scope}
        access_token = self._sign(claims | {"iat": now, "exp": now + self.lifetime, "jti": uuid.uuid4().hex})
        body = {"access_token": access_token, "token_type": "Bearer", "expires_in": self.lifetime, "scope": scope}
        return JSONResponse(body | extra, headers={"Cache-Control": "no-store"})

    def _user_tokens(self, grant: _Refresh, scope: str) -> JSONResponse:
        """Tokens of the grant for `scope` (the grant's or less); the new refresh token keeps the
        grant's whole scope (RFC 6749 §6)."""
        refresh_token = secrets.token_urlsafe(32)
        self.refresh_tokens[refresh_token] = dataclasses.replace(grant, used=False)
        if "openid" not in scope.split():
            return self._answer(DEMO_SUBJECT, scope, refresh_token=refresh_token)
        now = int(time.time())
        id_token = self._sign(
            {
                "iss": self.issuer,
                "sub": DEMO_SUBJECT,
                "aud": DEMO_CLIENT_ID,
                "azp": DEMO_CLIENT_ID,
                "iat": now,
                "exp": now + _ID_TOKEN_LIFETIME,
                "auth_time": grant.auth_time,
                "nonce": grant.nonce,
                **({"name": "Demo User"} if "profile" in scope.split() else {}),
            }
        )
        return self._answer(DEMO_SUBJECT, scope, refresh_token=refresh_token, id_token=id_token)

    def _redeem(self, form: dict[str, str]) -> JSONResponse:
        code = self.codes.get(form.get("code", ""))
        if code is None or time.time() >= code.expires_at:
            return _oauth_error("invalid_grant", "The authorization code is unknown or expired.")
        verifier = form.get("code_verifier", "")
        if not _PKCE.fullmatch(verifier) or not _same(_s256(verifier), code.login.code_challenge):
            return _oauth_error("invalid_grant", "PKCE verification failed.")
        if form.get("redirect_uri") != code.login.redirect_uri:
            return _oauth_error("invalid_grant", "redirect_uri differs from the authorization request's.")
        if code.used:
            self.revoked_grants.add(code.grant_id)  # RFC 6749 §4.1.2: revoke what the first use got
            return _oauth_error("invalid_grant", "The authorization code was already used; its tokens are revoked.")
        code.used = True
        grant = _Refresh(code.grant_id, code.login.scope, code.login.nonce, code.auth_time)
        return self._user_tokens(grant, grant.scope)

    def _refresh(self, form: dict[str, str]) -> JSONResponse:
        token = self.refresh_tokens.get(form.get("refresh_token", ""))
        if token is None or token.grant_id in self.revoked_grants:
            return _oauth_error("invalid_grant", "The refresh token is unknown or revoked.")
        if token.used:
            self.revoked_grants.add(token.grant_id)  # RFC 9700 §4.14: a replayed refresh token ends the grant
            return _oauth_error("invalid_grant", "The refresh token was already used; the grant is revoked.")
        scope = " ".join(form.get("scope", "").split()) or token.scope
        if not set(scope.split()) <= set(token.scope.split()):
            return _oauth_error("invalid_scope", "A refresh may narrow the scope, not widen it.")
        token.used = True
        return self._user_tokens(token, scope)

    async def revoke(self, request: Request) -> Response:
        form = dict(parse_qsl((await request.body()).decode("utf-8", "replace")))
        if not self._client_ok(request, form):
            return _oauth_error("invalid_client", "Client authentication failed.", 401)
        if not form.get("token"):
            return _oauth_error("invalid_request", "token is required.")
        if (token := self.refresh_tokens.get(form["token"])) is not None:
            self.revoked_grants.add(token.grant_id)
        return Response(b"", headers={"Cache-Control": "no-store"})  # unknown tokens too (RFC 7009 §2.2)

    # --- the authorization endpoint and its login page ----------------------------------------

    def _check(self, params: Mapping[str, str]) -> _Login:
        if params.get("client_id") != DEMO_CLIENT_ID:
            raise _PageError(f"Unknown client_id; this server knows {DEMO_CLIENT_ID!r}.")
        redirect_uri = params.get("redirect_uri", "")
        if redirect_uri not in self.redirect_uris:
            raise _PageError("This redirect_uri is not registered for the client.")
        state, nonce = params.get("state", ""), params.get("nonce", "")
        scope = params.get("scope", "").split()

        def fail(error: str, description: str) -> _RedirectError:
            return _RedirectError(redirect_uri, state or None, error, description)

        if params.get("response_type") != "code":
            raise fail("unsupported_response_type", "Only response_type=code is supported.")
        if "openid" not in scope or not set(scope) <= _LOGIN_SCOPES:
            raise fail("invalid_scope", f"The scope must include openid; known: {' '.join(sorted(_LOGIN_SCOPES))}.")
        if not state or not nonce:
            raise fail("invalid_request", "state and nonce are required.")
        challenge = params.get("code_challenge", "")
        if params.get("code_challenge_method") != "S256" or not _PKCE.fullmatch(challenge):
            raise fail("invalid_request", "PKCE is required: code_challenge with code_challenge_method=S256.")
        fields = ("response_type", "client_id", "redirect_uri", "scope", "state", "nonce", "code_challenge")
        kept = {name: params[name] for name in (*fields, "code_challenge_method")}
        return _Login(kept, redirect_uri, " ".join(scope), state, nonce, challenge)

    async def authorize(self, request: Request) -> Response:
        if request.method == "GET":
            params: Mapping[str, str] = request.query_params
        else:
            params = dict(parse_qsl((await request.body()).decode("utf-8", "replace")))
        try:
            login = self._check(params)
        except _PageError as exc:
            return self._page("Sign-in error", f'<p class="error">{html.escape(str(exc))}</p>', 400)
        except _RedirectError as exc:
            return self._redirect(exc.redirect_uri, error=exc.error, error_description=str(exc), state=exc.state)
        if request.method == "GET":
            return self._login_page(login)
        if params.get("decision") == "deny":
            return self._redirect(login.redirect_uri, error="access_denied", state=login.state)
        user_ok = _same(params.get("username", ""), DEMO_USER)
        if not (_same(params.get("password", ""), DEMO_PASSWORD) and user_ok):
            return self._login_page(login, "Wrong username or password.")
        now = time.time()
        self.codes = {value: code for value, code in self.codes.items() if code.expires_at > now}
        code = secrets.token_urlsafe(32)
        self.codes[code] = _Code(login, int(now), now + _CODE_LIFETIME, uuid.uuid4().hex)
        return self._redirect(login.redirect_uri, code=code, state=login.state)

    def _redirect(self, redirect_uri: str, **params: str | None) -> Response:
        query = urlencode({name: value for name, value in params.items() if value is not None} | {"iss": self.issuer})
        separator = "&" if urlsplit(redirect_uri).query else "?"
        return RedirectResponse(f"{redirect_uri}{separator}{query}", 303, headers={"Cache-Control": "no-store"})

    def _login_page(self, login: _Login, message: str = "") -> HTMLResponse:
        hidden = "".join(
            f'<input type="hidden" name="{name}" value="{html.escape(value)}">' for name, value in login.params.items()
        )
        alert = f'<p class="error" role="alert">{html.escape(message)}</p>' if message else ""
        body = (
            f"<p><b>{DEMO_CLIENT_ID}</b> asks for <code>{html.escape(login.scope)}</code>.</p>{alert}"
            f'<form method="post" action="/authorize">{hidden}'
            f'<label>Username<input name="username" value="{DEMO_USER}" autocomplete="username"></label>'
            '<label>Password<input name="password" type="password" autocomplete="current-password"></label>'
            '<button name="decision" value="allow">Sign in and allow</button>'
            '<button name="decision" value="deny">Deny</button></form>'
            f"<p>Demo user <code>{DEMO_USER}</code>, password <code>{DEMO_PASSWORD}</code>.</p>"
        )
        return self._page("Sign in to the demo", body)

    def _page(self, title: str, body: str, status: int = 200) -> HTMLResponse:
        page = (
            f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
            f'<meta name="viewport" content="width=device-width"><style>{_STYLE}</style></head>'
            f"<body><h1>{title}</h1>{body}</body></html>"
        )
        headers = {
            "Content-Security-Policy": self.csp,
            "Cache-Control": "no-store",
            "X-Frame-Options": "DENY",
            "Referrer-Policy": "no-referrer",
            "X-Content-Type-Options": "nosniff",
        }
        return HTMLResponse(page, status, headers=headers)

    # --- metadata -----------------------------------------------------------------------------

    async def discovery(self, request: Request) -> JSONResponse:
        issuer = self.issuer
        return JSONResponse(
            {
                "issuer": issuer,
                "authorization_endpoint": f"{issuer}/authorize",
                "token_endpoint": f"{issuer}/oauth/token",
                "revocation_endpoint": f"{issuer}/revoke",
                "jwks_uri": f"{issuer}/jwks",
                "grant_types_supported": ["client_credentials", "authorization_code", "refresh_token"],
                "response_types_supported": ["code"],
                "code_challenge_methods_supported": ["S256"],
                "id_token_signing_alg_values_supported": ["RS256"],
                "scopes_supported": sorted(_LOGIN_SCOPES),
                "subject_types_supported": ["public"],
                "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
                "authorization_response_iss_parameter_supported": True,
            }
        )

    async def jwks(self, request: Request) -> JSONResponse:
        return JSONResponse(KeySet([self.key]).as_dict(private=False))


def create_demo_authserver(
    issuer: str, client_secret: str, lifetime: int = 3600, *, redirect_uris: Collection[str] = ()
) -> Starlette:
    """The demo server's app. `redirect_uris` are the only ones /authorize accepts (exact match):
    the broker's `{public_url}/v1/oauth/callback`."""
    return _DemoServer(issuer, client_secret, lifetime, frozenset(redirect_uris)).app()
