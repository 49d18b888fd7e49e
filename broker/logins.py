"""Users who log in (spec §5): the authorization code grant with OpenID Connect.

    caller: POST /v1/authorizations/{credential} ─▶ start: state, nonce, PKCE kept in Redis (10 min)
        ─▶ {authorize_url} ─▶ the user's browser logs in at the authorization server
        ─▶ GET /v1/oauth/callback?code&state ─▶ complete: state consumed (single use), code
           exchanged (same redirect_uri, the PKCE verifier), id_token verified, the grant stored
           sealed under (credential, sub), the access token cached
    caller: GET /v1/tokens/{credential}/subjects/{sub} ─▶ the token path (broker/tokens.py), whose
        grant spends the stored refresh token (broker/grants.py)
    caller: DELETE …/subjects/{sub} ─▶ logout: revoked upstream (RFC 7009), forgotten everywhere

A caller reads the subjects who logged in through it (`subjects = "own"`, the default) or every
subject of the credential (`subjects = "any"`).
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode, urlsplit

import structlog

from broker import scopes
from broker.clock import Clock, SystemClock
from broker.errors import (
    AccessDenied,
    InvalidRequest,
    ReauthorizationRequired,
    StoreUnavailable,
    UpstreamInvalidResponse,
)
from broker.events import Event
from broker.grants import GRANT_TTL
from broker.store import Store, TokenKeys
from broker.tokens import TokenService
from broker.upstream.client import UpstreamClient
from broker.upstream.oidc import IdTokenVerifier
from broker.upstream.users import UserGrants
from broker.vault.models import CallerSettings, CredentialSettings

__all__ = ["CALLBACK_PATH", "LOGIN_TTL", "Login", "LoginFailed", "Logins"]

log = structlog.get_logger("broker.logins")

LOGIN_TTL = 600  # seconds a user has to finish logging in
CALLBACK_PATH = "/v1/oauth/callback"
_ATTEMPTS = 5
_ALLOWED_FOR = 60.0  # seconds a caller's access to a subject is remembered (the fast path)
_ALLOWED_KEPT = 10_000


class LoginFailed(InvalidRequest):
    """The callback cannot complete a login: unknown or used `state`, or the user or the
    authorization server said no. Rendered for a person (HTML) or a program (JSON)."""

    facade = (400, "invalid_request")

    def __init__(self, description: str, *, upstream_error: str | None = None) -> None:
        super().__init__(description)
        self.upstream_error = upstream_error


@dataclass(frozen=True)
class Login:
    credential: str
    subject: str
    return_to: str | None
    name: str | None  # for the page: "signed in as …"


def _challenge(verifier: str) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()


class Logins:
    def __init__(
        self,
        store: Store,
        tokens: TokenService,
        upstream: UpstreamClient,
        *,
        public_url: str | None,
        request_deadline: float,
        clock: Clock | None = None,
    ) -> None:
        self.store = store
        self.tokens = tokens
        self.upstream = upstream
        self.users = UserGrants(upstream)
        self.verifier = IdTokenVerifier(upstream, clock)
        self.public_url = public_url
        self.request_deadline = request_deadline
        self.clock = clock or SystemClock()
        self._allowed: dict[tuple[str, str, str, str], float] = {}  # (credential, shape, caller, sub) → until

    def _deadline(self) -> float:
        return time.monotonic() + self.request_deadline

    @property
    def redirect_uri(self) -> str:
        if self.public_url is None:
            raise InvalidRequest("Logins need [server] public_url: the authorization server redirects there.")
        return f"{self.public_url}{CALLBACK_PATH}"

    # -- start ------------------------------------------------------------------------------------

    async def start(
        self,
        credential: CredentialSettings,
        caller: CallerSettings,
        scope_set: str,
        *,
        login_hint: str | None,
        return_to: str | None,
    ) -> dict[str, Any]:
        if return_to is not None and not any(_under(return_to, prefix) for prefix in credential.return_to_allow):
            raise InvalidRequest("return_to is not under any of the credential's return_to_allow prefixes.")
        redirect_uri = self.redirect_uri
        discovery = await self.upstream.discovery(credential, self._deadline())
        if not discovery.authorization_endpoint:
            raise UpstreamInvalidResponse("The authorization server's discovery names no authorization_endpoint.")
        state, nonce, verifier = secrets.token_urlsafe(32), secrets.token_urlsafe(24), secrets.token_urlsafe(48)
        requested = scopes.canonical([*scope_set.split(), "openid"])
        record = {
            "credential": credential.name,
            "shape": credential.shape,
            "caller": caller.name,
            "scope": scope_set,
            "nonce": nonce,
            "verifier": verifier,
            "return_to": return_to,
            "redirect_uri": redirect_uri,
        }
        await self.store.put_login(state, record, LOGIN_TTL)
        query = {
            "response_type": "code",
            "client_id": credential.client_id,
            "redirect_uri": redirect_uri,
            "scope": requested,
            "state": state,
            "nonce": nonce,
            "code_challenge": _challenge(verifier),
            "code_challenge_method": "S256",
        }
        if login_hint:
            query["login_hint"] = login_hint
        separator = "&" if "?" in discovery.authorization_endpoint else "?"
        return {
            "authorize_url": f"{discovery.authorization_endpoint}{separator}{urlencode(query)}",
            "state": state,
            "expires_in": LOGIN_TTL,
        }

    # -- the callback -----------------------------------------------------------------------------

    async def complete(
        self,
        credentials: dict[str, CredentialSettings],
        *,
        state: str | None,
        code: str | None,
        error: str | None,
        error_description: str | None,
    ) -> Login:
        if not state:
            raise LoginFailed("The sign-in link is incomplete (no state): start the sign-in again.")
        record = await self.store.take_login(state)  # single use: a replay finds nothing
        if record is None:
            raise LoginFailed("This sign-in is unknown, expired or already used: start the sign-in again.")
        if error:
            said = f" ({error_description[:200]})" if error_description else ""
            raise LoginFailed(f"The sign-in was not completed: {error}{said}.", upstream_error=error[:64])
        if not code:
            raise LoginFailed("The authorization server sent no code: start the sign-in again.")
        credential = credentials.get(str(record["credential"]))
        if credential is None or credential.shape != record["shape"]:
            raise LoginFailed("The credential of this sign-in changed or is gone: start the sign-in again.")
        deadline = self._deadline()
        fetched = await self.users.exchange_code(
            credential, code, str(record["redirect_uri"]), str(record["verifier"]), str(record["scope"]), deadline
        )
        if not fetched.id_token:
            raise UpstreamInvalidResponse("The authorization server sent no id_token (is `openid` granted?).")
        claims = await self.verifier.verify(credential, fetched.id_token, nonce=str(record["nonce"]), deadline=deadline)
        subject = str(claims["sub"])
        keys = self.tokens.keys_for(credential, str(record["scope"]), subject)
        await self._store_grant(keys, subject, str(record["caller"]), fetched.refresh_token, fetched.scope)
        await self.tokens.prime(credential, str(record["scope"]), subject, fetched)
        log.info("logins.completed", credential=credential.name, caller=record["caller"])
        name = claims.get("name") or claims.get("email") or claims.get("preferred_username")
        return_to = record.get("return_to")
        return Login(credential.name, subject, return_to if isinstance(return_to, str) else None, _short(name))

    async def _store_grant(
        self, keys: TokenKeys, subject: str, caller: str, refresh_token: str | None, scope: str
    ) -> None:
        for _ in range(_ATTEMPTS):
            version, record = await self.store.get_grant(keys)
            owners = sorted({*((record or {}).get("owners") or []), caller})
            fresh = {
                "sub": subject,
                "status": "active",
                "refresh_token": refresh_token,
                "scope": scope,
                "owners": owners,
                "login_at": self.clock.now(),
            }
            if await self.store.put_grant(keys, version, fresh, GRANT_TTL) == 1:
                return
        raise ReauthorizationRequired("This user's grant kept changing while the login was stored: try again.")

    # -- reading and forgetting a subject -----------------------------------------------------------

    def allowed_here(self, credential: CredentialSettings, caller: CallerSettings, subject: str) -> bool:
        """Without I/O (the fast path): this caller was found allowed this subject a moment ago."""
        if caller.subjects.get(credential.name, "own") == "any":
            return True
        if not self.tokens.l1_enabled and self.store.reachable:
            return False  # like L1: drops may have been missed while the events were not heard
        return self._remembered(credential, caller, subject)

    def _remembered(self, credential: CredentialSettings, caller: CallerSettings, subject: str) -> bool:
        until = self._allowed.get((credential.name, credential.shape, caller.name, subject))
        return until is not None and time.monotonic() < until

    def on_event(self, event: Event) -> None:
        """A drop (a logout's, or an invalidation's): who may read which subject is read again."""
        if event.op == "drop":
            self._allowed.clear()

    def on_subscription(self, live: bool) -> None:
        if live:
            self._allowed.clear()  # drops may have been missed meanwhile

    async def check_access(self, credential: CredentialSettings, caller: CallerSettings, subject: str) -> None:
        """A caller may read a subject who logged in through it, or any with `subjects = "any"`."""
        if self.allowed_here(credential, caller, subject):
            return
        try:
            _, record = await self.store.get_grant(self.tokens.keys_for(credential, "", subject))
        except StoreUnavailable:
            if self._remembered(credential, caller, subject):
                return  # Redis is unreachable: what was found a moment ago stands, as L1 copies do
            raise
        owners = frozenset((record or {}).get("owners") or [])
        if not caller.may_read_subject(credential.name, owners):
            raise AccessDenied()  # unknown, or another caller's: the same answer
        # Owners only grow until a logout, whose drop event makes every worker forget this.
        if len(self._allowed) >= _ALLOWED_KEPT:
            self._allowed.clear()
        self._allowed[(credential.name, credential.shape, caller.name, subject)] = time.monotonic() + _ALLOWED_FOR

    async def logout(self, credential: CredentialSettings, subject: str) -> bool:
        """Revoke the refresh token upstream (RFC 7009, when advertised) and forget the subject."""
        keys = self.tokens.keys_for(credential, "", subject)
        _, record = await self.store.get_grant(keys)
        revoked = False
        token = (record or {}).get("refresh_token")
        if isinstance(token, str) and token:
            revoked = await self.users.revoke(credential, token, self._deadline())
        purged = await self.store.purge_subject(credential.name, keys)
        self._allowed.clear()  # here at once; the other workers on the purge's drop event
        log.info("logins.logout", credential=credential.name, revoked=revoked, keys_purged=purged)
        return revoked


def _under(url: str, prefix: str) -> bool:
    """`url` starts with `prefix` at a path boundary, same scheme and host (no prefix tricks)."""
    if not url.startswith(prefix):
        return False
    target, base = urlsplit(url), urlsplit(prefix)
    if (target.scheme, target.netloc) != (base.scheme, base.netloc):
        return False
    return prefix.endswith("/") or len(url) == len(prefix) or url[len(prefix)] in "/?#"


def _short(value: Any) -> str | None:
    return value[:120] if isinstance(value, str) and value else None
