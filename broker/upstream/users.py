"""The authorization code grant's exchanges with the authorization server (spec §5): the login's
code for tokens, a refresh token for new ones, revocation. Through the one UpstreamClient (its
HTTP client, discovery, circuit breakers, response validation); what differs is that nothing
that may have spent a code or a refresh token is ever retried blindly.
"""

from __future__ import annotations

import asyncio

import structlog

from broker.errors import UpstreamError, UpstreamInvalidResponse, UpstreamUnavailable
from broker.upstream.client import UpstreamClient
from broker.upstream.response import FetchedToken
from broker.vault.models import CredentialSettings

__all__ = ["UserGrants"]

log = structlog.get_logger("broker.upstream")


class UserGrants:
    def __init__(self, upstream: UpstreamClient) -> None:
        self.upstream = upstream

    async def exchange_code(
        self,
        credential: CredentialSettings,
        code: str,
        redirect_uri: str,
        verifier: str,
        scope_set: str,
        deadline: float,
    ) -> FetchedToken:
        """The login's code for tokens (RFC 6749 §4.1.3, PKCE RFC 7636): one request, never retried
        (a code is single use)."""
        form = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": redirect_uri,
            "code_verifier": verifier,
        }
        return await self._once(credential, form, deadline, scope_set, "authorization_code")

    async def refresh(
        self, credential: CredentialSettings, refresh_token: str, scope_set: str, deadline: float
    ) -> FetchedToken:
        """Spend a refresh token (RFC 6749 §6). Retried only when the request surely never left:
        a refresh token whose answer was lost may have been spent (rotation), the caller decides."""
        form = {"grant_type": "refresh_token", "refresh_token": refresh_token}
        if scope_set:
            form["scope"] = scope_set
        return await self._once(credential, form, deadline, scope_set, "refresh_token")

    async def _once(
        self, credential: CredentialSettings, form: dict[str, str], deadline: float, scope_set: str, grant: str
    ) -> FetchedToken:
        # The answer may carry `openid` (and a login's other scopes) beside what was asked.
        requested = " ".join(sorted({*scope_set.split(), "openid", "offline_access"}))
        breaker = self.upstream.breaker(credential.name)
        plan = await self.upstream.rotation.plan(credential, deadline)  # the secret in use; no fallback here
        attempt = 0
        while True:
            attempt += 1
            admitted = breaker.admit()
            try:
                with admitted:
                    return await self.upstream.post_token(
                        credential,
                        dict(form),
                        deadline,
                        plan=plan,
                        requested_scope=requested,
                        attempt=attempt,
                        grant=grant,
                    )
            except UpstreamUnavailable as exc:
                delay = None if exc.maybe_sent else self.upstream.retry_delay(exc, attempt, deadline)
                if delay is None:
                    raise
                await asyncio.sleep(delay)
            except UpstreamError:
                raise
            except Exception as exc:
                log.exception("upstream.unexpected_error", credential=credential.name, error_type=type(exc).__name__)
                raise UpstreamInvalidResponse(f"The token request failed unexpectedly ({type(exc).__name__}).") from exc

    async def revoke(self, credential: CredentialSettings, token: str, deadline: float) -> bool:
        """RFC 7009: revoke a refresh token (and with it, at most servers, its grant). False when
        the issuer advertises no revocation endpoint or did not confirm."""
        endpoint = await self.upstream.revocation_endpoint(credential, deadline)
        if endpoint is None:
            return False
        form = {"token": token, "token_type_hint": "refresh_token"}
        headers: dict[str, str] = {}
        plan = await self.upstream.rotation.plan(credential, deadline)
        self.upstream.authenticate(credential, plan.secret, form, headers, endpoint)
        try:
            async with (
                asyncio.timeout_at(self.upstream.loop_deadline(deadline)),
                self.upstream.http_for(credential) as http,
            ):
                response = await http.post(endpoint, data=form, headers=headers)
        except Exception as exc:  # noqa: BLE001 - best effort: the caller forgets the subject anyway
            log.warning("upstream.revocation_failed", credential=credential.name, reason=type(exc).__name__)
            return False
        log.info("upstream.revocation", credential=credential.name, status=response.status_code)
        return response.status_code == 200
