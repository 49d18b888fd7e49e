"""The test authorization server's authorization code grant with OpenID Connect (RFC 6749 §4.1,
RFC 7636 PKCE, OIDC Core), rotating refresh tokens (RFC 9700 §4.14), RFC 7009 revocation,
UserInfo, signing-key rotation, and the fault switches a broker must survive.

Mounted by tests/authserver.py (``AuthServer``), which authenticates clients at the token and
revocation endpoints and hands the client id over; the authorization request's checks and pages
are in tests/authserver_login.py. The checks follow panva/node-oidc-provider:

  GET /authorize     client_id, then redirect_uri (exact match with a registered one); until both
                     hold, errors are a 400 page, never a redirect (RFC 6749 §4.1.2.1); after, they
                     go back to redirect_uri with error, state and iss (RFC 9207).
  POST /authorize    the login form (hidden fields carry the request, checked again): Deny →
                     access_denied; a wrong password → the form again; Allow → code + state + iss.
  code exchange      found → not expired → PKCE S256 → same client → same redirect_uri → unused
                     (a second use revokes every token of the grant, RFC 6749 §4.1.2).
  refresh            found → not expired → same client → grant alive → scope ⊆ grant → not rotated
                     yet (reuse of a rotated token revokes the whole grant, unless within
                     rotation_grace_seconds) → a new refresh token, the old one rotated.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import hmac
import json
import math
import secrets
import time
import uuid
from collections.abc import Callable
from typing import Any, Final
from urllib.parse import urlsplit

from joserfc import jwt
from joserfc.jwk import KeySet, RSAKey
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from tests.authserver_http import CloseConnection, OAuthError, control_body, json_response, parse_form
from tests.authserver_login import (
    DEFAULT_USERS,
    OIDC_SCOPES,
    PKCE_FORMAT,
    AuthorizationRequest,
    PageError,
    RedirectError,
    User,
    authorization_response,
    check_request,
    error_page,
    error_response,
    login_page,
    users_from,
)

CODE_GRANT_TYPES: Final = frozenset({"authorization_code", "refresh_token"})
ID_TOKEN_FAULTS: Final = frozenset(
    {
        "none",
        "wrong_nonce",  # nonce of another login
        "no_nonce",
        "wrong_aud",
        "wrong_iss",
        "wrong_azp",  # azp names another client
        "expired",
        "future_iat",  # iat an hour ahead
        "alg_none",  # unsigned, header alg "none"
        "hs256",  # HMAC-signed with the RSA public key (PEM) as secret: the alg confusion attack
        "unknown_kid",  # signed by a key that is not in the JWKS
        "bad_signature",
        # Not faults but variants real servers send, which a client must accept:
        "aud_array",  # aud a list: the client and another audience; azp the client
        "no_azp",  # no azp claim (one audience)
    }
)
# close_after: the refresh is done (the old token rotated) but the connection drops, answerless.
# invalid_grant / 503: answered before anything happens, the token stays as it was.
REFRESH_FAULTS: Final = frozenset({"none", "close_after", "invalid_grant", "503"})
REVOCATION_FAULTS: Final = frozenset({"none", "503"})
OTHER_CLIENT: Final = "some-other-client"
_CONFIG_TYPES: Final[dict[str, tuple[type, ...]]] = {
    "code_lifetime": (int,),
    "id_token_lifetime": (int,),
    "refresh_lifetime": (int, type(None)),
    "rotate_refresh_tokens": (bool,),
    "rotation_grace_seconds": (int, float),
    "refresh_delay": (int, float),
    "refresh_fault": (str,),
    "refresh_fault_count": (int, type(None)),
    "id_token_fault": (str,),
    "id_token_fault_count": (int, type(None)),
    "id_token_on_refresh": (bool,),
    "revocation_fault": (str,),
    "revocation_fault_count": (int, type(None)),
    "advertise_revocation": (bool,),
}
_CONFIG_FAULTS: Final = {
    "refresh_fault": REFRESH_FAULTS,
    "id_token_fault": ID_TOKEN_FAULTS,
    "revocation_fault": REVOCATION_FAULTS,
}


@dataclasses.dataclass(frozen=True)
class CodeConfig:
    code_lifetime: int = 60
    id_token_lifetime: int = 300
    refresh_lifetime: int | None = None  # None: refresh tokens do not expire
    rotate_refresh_tokens: bool = True  # False: refresh answers carry no refresh_token, the old one stays
    rotation_grace_seconds: float = 0.0  # a rotated refresh token still works this long
    refresh_delay: float = 0.0  # seconds between doing a refresh and answering it
    refresh_fault: str = "none"
    refresh_fault_count: int | None = None
    id_token_fault: str = "none"
    id_token_fault_count: int | None = None
    id_token_on_refresh: bool = True
    revocation_fault: str = "none"
    revocation_fault_count: int | None = None
    advertise_revocation: bool = True  # revocation_endpoint in the discovery document

    @classmethod
    def owns(cls, name: str) -> bool:
        return name in _CONFIG_TYPES

    def updated(self, changes: dict[str, Any]) -> CodeConfig:
        for name, value in changes.items():
            types = _CONFIG_TYPES[name]
            if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
                raise TypeError(f"bad type for {name}: {value!r}")
            if name in _CONFIG_FAULTS and value not in _CONFIG_FAULTS[name]:
                raise ValueError(f"unknown {name} {value!r}; known: {sorted(_CONFIG_FAULTS[name])}")
            if name.endswith(("_count", "_lifetime", "_seconds", "_delay")) and (value or 0) < 0:
                raise ValueError(f"{name} must be >= 0")
        changes = dict(changes)
        for fault in _CONFIG_FAULTS:  # a newly set fault lasts forever unless the same call limits it
            if fault in changes:
                changes.setdefault(f"{fault}_count", None)
        return dataclasses.replace(self, **changes)

    def as_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class AccessSettings:
    """What tests/authserver.py Config says about access tokens, for the code flow's tokens too."""

    lifetime: int
    jwt_lifetime: int
    token_type: str
    audience: str
    expires_in: dict[str, Any]  # the expires_in member of the answer: {"expires_in": n} or {}


def _new_key() -> RSAKey:
    kid = f"test-{uuid.uuid4().hex[:8]}"
    return RSAKey.generate_key(2048, parameters={"kid": kid, "use": "sig", "alg": "RS256"})


class SigningKeys:
    """The key tokens are signed with, the keys the JWKS publishes, and a spare never published."""

    def __init__(self) -> None:
        self.initial = _new_key()
        self._spare: RSAKey | None = None
        self.reset()

    def reset(self) -> None:
        self.current = self.initial
        self.published = [self.initial]
        self.all = [self.initial]

    @property
    def spare(self) -> RSAKey:
        if self._spare is None:
            self._spare = _new_key()
        return self._spare

    def rotate(self, *, publish: bool, retire_others: bool) -> None:
        self.current = _new_key()
        self.all.append(self.current)
        if retire_others:
            self.published = []
        if publish:
            self.published.append(self.current)

    def publish_current(self) -> None:
        if self.current not in self.published:
            self.published.append(self.current)

    def jwks(self) -> dict[str, Any]:
        return KeySet(self.published).as_dict(private=False)

    def as_json(self) -> dict[str, Any]:
        return {"signing_kid": self.current.kid, "published_kids": [key.kid for key in self.published]}


@dataclasses.dataclass
class Code:
    request: AuthorizationRequest
    sub: str
    auth_time: int
    expires_at: float
    grant_id: str | None = None  # set by the first redemption


@dataclasses.dataclass
class Grant:
    id: str
    client_id: str
    sub: str
    scope: str
    nonce: str
    auth_time: int
    created_at: float
    refreshes: int = 0
    grace_reuses: int = 0
    refresh_tokens_issued: int = 0
    access_tokens_issued: int = 0
    revoked: bool = False
    revoked_reason: str | None = None

    def as_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class RefreshToken:
    grant_id: str
    expires_at: float | None
    rotated_at: float | None = None


@dataclasses.dataclass
class AccessToken:
    grant_id: str
    scope: str
    expires_at: float
    revoked: bool = False


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _s256(verifier: str) -> str:
    return _b64(hashlib.sha256(verifier.encode("ascii")).digest())


class CodeFlow:
    def __init__(self, issuer: str, keys: SigningKeys, known_client: Callable[[str], bool]) -> None:
        self.issuer = issuer
        self.keys = keys
        self.known_client = known_client
        self.reset()

    def reset(self) -> None:
        self.config = CodeConfig()
        self.keys.reset()
        self.users: dict[str, User] = dict(DEFAULT_USERS)
        self.redirect_uris: dict[str, list[str]] = {}
        self.codes: dict[str, Code] = {}
        self.grants: dict[str, Grant] = {}
        self.refresh_tokens: dict[str, RefreshToken] = {}
        self.access_tokens: dict[str, AccessToken] = {}
        self.counts = dict.fromkeys(
            (
                "authorize_requests",
                "logins",
                "login_failures",
                "consent_denials",
                "codes_issued",
                "code_exchanges",
                "code_reuse_detections",
                "refresh_requests",
                "refresh_reuse_detections",
                "userinfo_requests",
            ),
            0,
        )
        self.revocations: list[dict[str, Any]] = []

    def routes(self) -> list[Route]:
        return [
            Route("/authorize", self.authorize, methods=["GET"]),
            Route("/authorize", self.login, methods=["POST"]),
            Route("/userinfo", self.userinfo, methods=["GET", "POST"]),
            Route("/_control/users", self.control_users, methods=["GET", "POST"]),
            Route("/_control/redirect_uris", self.control_redirect_uris, methods=["GET", "POST"]),
            Route("/_control/keys", self.control_keys, methods=["GET", "POST"]),
            Route("/_control/revoke_grant", self.control_revoke_grant, methods=["POST"]),
        ]

    def discovery(self) -> dict[str, Any]:
        document: dict[str, Any] = {
            "authorization_endpoint": f"{self.issuer}/authorize",
            "userinfo_endpoint": f"{self.issuer}/userinfo",
            "grant_types_supported": ["client_credentials", "authorization_code", "refresh_token"],
            "response_types_supported": ["code"],
            "response_modes_supported": ["query"],
            "code_challenge_methods_supported": ["S256"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "scopes_supported": list(OIDC_SCOPES),
            "subject_types_supported": ["public"],
            "claims_supported": ["sub", "iss", "aud", "azp", "exp", "iat", "auth_time", "nonce", "email", "name"],
            "authorization_response_iss_parameter_supported": True,
        }
        if self.config.advertise_revocation:
            document["revocation_endpoint"] = f"{self.issuer}/revoke"
            document["revocation_endpoint_auth_methods_supported"] = ["client_secret_basic", "client_secret_post"]
        return document

    def stats(self) -> dict[str, Any]:
        return {
            **self.counts,
            "revocations": list(self.revocations),
            "grants": {grant.id: grant.as_json() for grant in self.grants.values()},
        }

    def _take(self, fault: str) -> str:
        value: str = getattr(self.config, fault)
        count: int | None = getattr(self.config, f"{fault}_count")
        if count is None:
            return value
        left = {fault: "none", f"{fault}_count": None} if count <= 1 else {f"{fault}_count": count - 1}
        self.config = dataclasses.replace(self.config, **left)
        return value if count >= 1 else "none"

    # --- the authorization endpoint -----------------------------------------------------------

    def _check(self, pairs: list[tuple[str, str]]) -> AuthorizationRequest:
        return check_request(pairs, self.known_client, self.redirect_uris)

    async def authorize(self, request: Request) -> Response:
        self.counts["authorize_requests"] += 1
        try:
            auth = self._check(request.query_params.multi_items())
        except PageError as exc:
            return error_page(exc)
        except RedirectError as exc:
            return error_response(self.issuer, exc, 302)
        return login_page(auth)

    async def login(self, request: Request) -> Response:
        form, problem = parse_form(request.headers.get("content-type", ""), await request.body())
        if problem:
            return error_page(PageError("invalid_request", problem))
        try:
            auth = self._check(list(form.items()))
        except PageError as exc:
            return error_page(exc)
        except RedirectError as exc:
            return error_response(self.issuer, exc, 303)
        decision = form.get("decision")
        if decision == "deny":
            self.counts["consent_denials"] += 1
            denied = RedirectError("access_denied", "the user denied the request", auth.redirect_uri, auth.state)
            return error_response(self.issuer, denied, 303)
        if decision != "allow":
            return login_page(auth, "Choose Allow or Deny.", form.get("username", ""))
        username, password = form.get("username", ""), form.get("password", "")
        user = self.users.get(username)
        if user is None or not hmac.compare_digest(user.password.encode(), password.encode()):
            self.counts["login_failures"] += 1
            return login_page(auth, "Wrong username or password.", username)
        self.counts["logins"] += 1
        self.counts["codes_issued"] += 1
        code = secrets.token_urlsafe(32)
        now = time.time()
        self.codes[code] = Code(auth, user.sub, int(now), now + self.config.code_lifetime)
        return authorization_response(self.issuer, auth.redirect_uri, {"code": code, "state": auth.state}, 303)

    # --- the token endpoint -------------------------------------------------------------------

    async def token(self, client_id: str, form: dict[str, str], access: AccessSettings) -> Response:
        if form["grant_type"] == "authorization_code":
            return self._redeem(client_id, form, access)
        return await self._refresh(client_id, form, access)

    def _redeem(self, client_id: str, form: dict[str, str], access: AccessSettings) -> Response:
        value, redirect_uri = form.get("code"), form.get("redirect_uri")
        if not value or not redirect_uri:
            raise OAuthError(400, "invalid_request", "code and redirect_uri are required")
        code = self.codes.get(value)
        if code is None:
            raise OAuthError(400, "invalid_grant", "authorization code not found")
        now = time.time()
        if now >= code.expires_at:
            raise OAuthError(400, "invalid_grant", "authorization code expired")
        verifier = form.get("code_verifier")
        if verifier is not None and not PKCE_FORMAT.fullmatch(verifier):
            raise OAuthError(400, "invalid_request", "code_verifier must be 43-128 characters of A-Z a-z 0-9 . _ ~ -")
        if verifier is None or not hmac.compare_digest(_s256(verifier), code.request.code_challenge):
            raise OAuthError(400, "invalid_grant", "PKCE verification failed")
        if code.request.client_id != client_id:
            raise OAuthError(400, "invalid_grant", "authorization code was issued to another client")
        if code.request.redirect_uri != redirect_uri:
            raise OAuthError(400, "invalid_grant", "redirect_uri differs from the authorization request's")
        if code.grant_id is not None:
            self.counts["code_reuse_detections"] += 1
            self._revoke_grant(self.grants[code.grant_id], "code_reuse")
            raise OAuthError(400, "invalid_grant", "authorization code already used; its tokens are revoked")
        request = code.request
        grant = Grant(
            uuid.uuid4().hex, client_id, code.sub, request.scope, request.nonce, code.auth_time, created_at=now
        )
        code.grant_id = grant.id
        self.grants[grant.id] = grant
        self.counts["code_exchanges"] += 1
        return json_response(self._tokens(grant, grant.scope, access, now, refresh=True, id_token=True))

    async def _refresh(self, client_id: str, form: dict[str, str], access: AccessSettings) -> Response:
        self.counts["refresh_requests"] += 1
        fault = self._take("refresh_fault")
        if fault == "invalid_grant":
            return OAuthError(400, "invalid_grant", "injected fault").response()
        if fault == "503":
            return PlainTextResponse("service unavailable", 503, headers={"Retry-After": "1"})
        try:
            answer: Response = json_response(self._rotate(client_id, form, access))
        except OAuthError as exc:
            answer = exc.response()
        if self.config.refresh_delay > 0:
            await asyncio.sleep(self.config.refresh_delay)
        return CloseConnection() if fault == "close_after" else answer

    def _rotate(self, client_id: str, form: dict[str, str], access: AccessSettings) -> dict[str, Any]:
        value = form.get("refresh_token")
        if not value:
            raise OAuthError(400, "invalid_request", "refresh_token is required")
        token = self.refresh_tokens.get(value)
        if token is None:
            raise OAuthError(400, "invalid_grant", "refresh token not found")
        now = time.time()
        if token.expires_at is not None and now >= token.expires_at:
            raise OAuthError(400, "invalid_grant", "refresh token expired")
        grant = self.grants[token.grant_id]
        if grant.client_id != client_id:
            raise OAuthError(400, "invalid_grant", "refresh token was issued to another client")
        if grant.revoked:
            raise OAuthError(400, "invalid_grant", f"the grant was revoked ({grant.revoked_reason})")
        requested = form.get("scope")
        scope = " ".join(requested.split()) if requested else grant.scope
        if extra := set(scope.split()) - set(grant.scope.split()):
            raise OAuthError(400, "invalid_scope", f"not part of the grant: {' '.join(sorted(extra))}")
        if token.rotated_at is not None:
            if now - token.rotated_at > self.config.rotation_grace_seconds:
                self.counts["refresh_reuse_detections"] += 1
                self._revoke_grant(grant, "refresh_token_reuse")
                raise OAuthError(400, "invalid_grant", "refresh token already used; the grant is revoked")
            grant.grace_reuses += 1
        rotate = self.config.rotate_refresh_tokens
        if rotate and token.rotated_at is None:
            token.rotated_at = now
        grant.refreshes += 1
        id_token = self.config.id_token_on_refresh and "openid" in scope.split()
        return self._tokens(grant, scope, access, now, refresh=rotate, id_token=id_token)

    def _tokens(
        self, grant: Grant, scope: str, access: AccessSettings, now: float, *, refresh: bool, id_token: bool
    ) -> dict[str, Any]:
        access_token = self._access_token(grant, scope, access, now)
        body: dict[str, Any] = {
            "access_token": access_token,
            "token_type": access.token_type,
            **access.expires_in,
            "scope": scope,
        }
        if refresh:
            value = secrets.token_urlsafe(32)
            lifetime = self.config.refresh_lifetime
            self.refresh_tokens[value] = RefreshToken(grant.id, None if lifetime is None else now + lifetime)
            grant.refresh_tokens_issued += 1
            body["refresh_token"] = value
        if id_token:
            body["id_token"] = self._id_token(grant, access_token, now)
        return body

    def _access_token(self, grant: Grant, scope: str, access: AccessSettings, now: float) -> str:
        jti = uuid.uuid4().hex
        claims = {
            "iss": self.issuer,
            "sub": grant.sub,
            "client_id": grant.client_id,
            "aud": access.audience,
            "scope": scope,
            "iat": int(now),
            "exp": math.ceil(now + access.jwt_lifetime),  # never earlier than expires_in says
            "jti": jti,
        }
        key = self.keys.current
        token = jwt.encode({"alg": "RS256", "kid": key.kid, "typ": "at+jwt"}, claims, key)
        self.access_tokens[token] = AccessToken(grant.id, scope, now + access.jwt_lifetime)
        grant.access_tokens_issued += 1
        return token

    def _id_token(self, grant: Grant, access_token: str, now: float) -> str:
        fault = self._take("id_token_fault")
        iat = int(now) + (3600 if fault == "future_iat" else -600 if fault == "expired" else 0)
        exp = int(now) - 300 if fault == "expired" else iat + self.config.id_token_lifetime
        user = next((u for u in self.users.values() if u.sub == grant.sub), None)
        claims: dict[str, Any] = {
            "iss": f"{self.issuer}/other" if fault == "wrong_iss" else self.issuer,
            "sub": grant.sub,
            "aud": OTHER_CLIENT if fault == "wrong_aud" else grant.client_id,
            "azp": OTHER_CLIENT if fault == "wrong_azp" else grant.client_id,
            "exp": exp,
            "iat": iat,
            "auth_time": grant.auth_time,
            "nonce": f"not-{grant.nonce}" if fault == "wrong_nonce" else grant.nonce,
            # OIDC Core §3.1.3.6: the left half of the access token's SHA-256
            "at_hash": _b64(hashlib.sha256(access_token.encode("ascii")).digest()[:16]),
            **(user.claims(grant.scope.split()) if user else {}),
        }
        if fault == "no_nonce":
            del claims["nonce"]
        elif fault == "aud_array":
            claims["aud"] = [grant.client_id, "test-api"]
        elif fault == "no_azp":
            del claims["azp"]
        return self._sign_id_token(claims, fault)

    def _sign_id_token(self, claims: dict[str, Any], fault: str) -> str:
        if fault in {"alg_none", "hs256"}:
            header = {"alg": "none" if fault == "alg_none" else "HS256", "typ": "JWT"}
            signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
            if fault == "alg_none":
                return f"{signing_input}."
            secret = self.keys.current.as_pem(private=False)
            return f"{signing_input}.{_b64(hmac.digest(secret, signing_input.encode(), 'sha256'))}"
        key = self.keys.spare if fault == "unknown_kid" else self.keys.current
        token = jwt.encode({"alg": "RS256", "kid": key.kid, "typ": "JWT"}, claims, key)
        if fault == "bad_signature":
            head, _, signature = token.rpartition(".")
            token = f"{head}.{'B' if signature[0] == 'A' else 'A'}{signature[1:]}"
        return token

    def _revoke_grant(self, grant: Grant, reason: str) -> None:
        """Every refresh and access token of the grant stops working (they are checked against it)."""
        if not grant.revoked:
            grant.revoked, grant.revoked_reason = True, reason

    # --- revocation (RFC 7009) and UserInfo ---------------------------------------------------

    def revoke(self, client_id: str, form: dict[str, str]) -> Response:
        if self._take("revocation_fault") == "503":
            return PlainTextResponse("service unavailable", 503, headers={"Retry-After": "1"})
        value = form.get("token")
        if not value:
            raise OAuthError(400, "invalid_request", "token is required")
        entry: dict[str, Any] = {
            "client_id": client_id,
            "token_type_hint": form.get("token_type_hint"),
            "token_type": None,
            "grant_id": None,
            "t": time.time(),
        }
        # The hint only says where to look first (RFC 7009 §2.1); both kinds are looked up.
        refresh, access = self.refresh_tokens.get(value), self.access_tokens.get(value)
        if (found := refresh or access) is not None:
            grant = self.grants[found.grant_id]
            if grant.client_id != client_id:
                raise OAuthError(400, "invalid_request", "the token was not issued to this client")
            entry |= {"token_type": "refresh_token" if refresh else "access_token", "grant_id": grant.id}
            if refresh:
                # RFC 7009 §2.1: revoking a refresh token also invalidates the grant's access tokens.
                self._revoke_grant(grant, "revoked")
            elif access is not None:
                access.revoked = True
        self.revocations.append(entry)
        return Response(b"", 200, headers={"Cache-Control": "no-store"})

    async def userinfo(self, request: Request) -> Response:
        self.counts["userinfo_requests"] += 1
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        token = self.access_tokens.get(value.strip()) if scheme.lower() == "bearer" else None
        if token is None:
            return _bearer_error(401, "invalid_token", "unknown access token")
        if token.revoked or self.grants[token.grant_id].revoked:
            return _bearer_error(401, "invalid_token", "the access token was revoked")
        if time.time() >= token.expires_at:
            return _bearer_error(401, "invalid_token", "the access token expired")
        if "openid" not in token.scope.split():
            return _bearer_error(403, "insufficient_scope", "the access token has no openid scope")
        grant = self.grants[token.grant_id]
        user = next((u for u in self.users.values() if u.sub == grant.sub), None)
        claims = user.claims(token.scope.split()) if user else {}
        return json_response({"sub": grant.sub, **claims})

    # --- /_control ----------------------------------------------------------------------------

    async def control_users(self, request: Request) -> Response:
        if request.method == "POST":
            try:
                self.users = users_from(await control_body(request))
            except (ValueError, TypeError) as exc:
                return JSONResponse({"error": str(exc)}, 400)
        return JSONResponse({name: dataclasses.asdict(user) for name, user in self.users.items()})

    async def control_redirect_uris(self, request: Request) -> Response:
        if request.method == "POST":
            try:
                self.redirect_uris |= self._redirect_uris_from(await control_body(request))
            except (ValueError, TypeError) as exc:
                return JSONResponse({"error": str(exc)}, 400)
        return JSONResponse(self.redirect_uris)

    def _redirect_uris_from(self, data: object) -> dict[str, list[str]]:
        if not isinstance(data, dict):
            raise TypeError('expected {"<client_id>": ["<redirect uri>", …]}')
        for client_id, uris in data.items():
            if not self.known_client(client_id):
                raise ValueError(f"unknown client {client_id!r}")
            if not isinstance(uris, list) or not all(isinstance(uri, str) for uri in uris):
                raise TypeError(f"redirect URIs of {client_id!r} must be a list of strings")
            for uri in uris:
                parts = urlsplit(uri)
                if parts.scheme not in {"http", "https"} or not parts.netloc or parts.fragment:
                    raise ValueError(f"{uri!r} is not an absolute http(s) URI without a fragment")
        return data

    async def control_keys(self, request: Request) -> Response:
        if request.method == "POST":
            try:
                self._change_keys(await control_body(request))
            except (ValueError, TypeError) as exc:
                return JSONResponse({"error": str(exc)}, 400)
        return JSONResponse(self.keys.as_json())

    def _change_keys(self, body: object) -> None:
        usage = 'expected {"action"?: "rotate" | "publish", "publish"?: bool, "retire_others"?: bool}'
        if not isinstance(body, dict) or set(body) - {"action", "publish", "retire_others"}:
            raise ValueError(usage)
        if not all(isinstance(body.get(flag, False), bool) for flag in ("publish", "retire_others")):
            raise TypeError(usage)
        match body.get("action", "rotate"):
            case "rotate":
                self.keys.rotate(publish=body.get("publish", True), retire_others=body.get("retire_others", False))
            case "publish":
                self.keys.publish_current()
            case action:
                raise ValueError(f"unknown action {action!r}; {usage}")

    async def control_revoke_grant(self, request: Request) -> Response:
        """Like a user withdrawing consent at the portal: the grants of a sub, or one grant."""
        try:
            body = await control_body(request)
        except ValueError as exc:
            return JSONResponse({"error": str(exc)}, 400)
        if not isinstance(body, dict) or len(body) != 1 or not {"grant_id", "sub"} >= set(body):
            return JSONResponse({"error": 'expected {"grant_id": …} or {"sub": …}'}, 400)
        (field, value), *_ = body.items()
        matching = [grant for grant in self.grants.values() if getattr(grant, field) == value and not grant.revoked]
        for grant in matching:
            self._revoke_grant(grant, "admin")
        return JSONResponse({"revoked": [grant.id for grant in matching]})


def _bearer_error(status: int, error: str, description: str) -> Response:
    challenge = f'Bearer error="{error}", error_description="{description}"'
    return json_response({"error": error, "error_description": description}, status, {"WWW-Authenticate": challenge})
