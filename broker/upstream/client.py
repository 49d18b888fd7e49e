"""The token request itself: one POST per attempt, retries within a deadline, to the endpoint that
discovery (broker/upstream/discovery.py) or the config names."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import structlog

from broker.clock import Clock, SystemClock
from broker.entries import fingerprint
from broker.errors import UpstreamError, UpstreamInvalidResponse, UpstreamRejected, UpstreamUnavailable
from broker.metrics import observe_upstream
from broker.secret import Secret
from broker.settings import UpstreamSettings
from broker.upstream.auth import client_auth_for
from broker.upstream.breaker import CircuitBreaker
from broker.upstream.discovery import Discoveries, Discovery
from broker.upstream.exchange import exchange_failure, get_json, loop_deadline, new_http_client, read_capped
from broker.upstream.mtls import MutualTlsClients
from broker.upstream.response import (
    FetchedToken,
    classify_error,
    parse_token_response,
)
from broker.upstream.rotation import SecretPlan, SecretRotation
from broker.vault.models import CredentialSettings

__all__ = ["Discovery", "UpstreamClient", "new_http_client"]

log = structlog.get_logger("broker.upstream")

_BACKOFF_BASE = 0.2
_BACKOFF_CAP = 5.0


class UpstreamClient:
    def __init__(
        self,
        http: httpx.AsyncClient,
        settings: UpstreamSettings,
        *,
        default_expires_in: float,
        clock: Clock | None = None,
        rotation: SecretRotation | None = None,
    ) -> None:
        self.http = http
        self.settings = settings
        self.default_expires_in = default_expires_in
        self.clock = clock or SystemClock()
        self.discoveries = Discoveries(http, settings.discovery_ttl_seconds)
        self._breakers: dict[str, CircuitBreaker] = {}
        # Without a store (check-config --probe, unit tests) this process remembers for itself.
        self.rotation = rotation or SecretRotation(None, fingerprint)
        self.mtls = MutualTlsClients(lambda context: new_http_client(settings, verify=context))

    async def aclose(self) -> None:
        """Shutdown: close the HTTP clients of client certificates (the shared one is the caller's)."""
        await self.mtls.aclose()

    @contextlib.asynccontextmanager
    async def http_for(self, credential: CredentialSettings) -> AsyncIterator[httpx.AsyncClient]:
        """The HTTP client for the credential's requests to the token (or revocation) endpoint:
        its own for a TLS client certificate, else the shared one."""
        if credential.tls_client is None:
            yield self.http
            return
        async with self.mtls.client(credential.tls_client) as http:
            yield http

    def authenticate(
        self,
        credential: CredentialSettings,
        secret: Secret | None,
        form: dict[str, str],
        headers: dict[str, str],
        endpoint: str,
    ) -> None:
        """Add the client authentication to one request about to be sent to `endpoint`."""
        client_auth_for(credential.auth_method).apply(
            credential, secret, form, headers, endpoint=endpoint, now=self.clock.now()
        )

    def forget(self, credentials: set[str]) -> None:
        """These credentials changed: their circuit breakers start closed, discovery anew."""
        for name in credentials:
            self._breakers.pop(name, None)
        self.rotation.forget(credentials)
        self.discoveries.forget()

    def breaker(self, credential: str) -> CircuitBreaker:
        breaker = self._breakers.get(credential)
        if breaker is None:
            breaker = self._breakers[credential] = CircuitBreaker(
                credential, failures=self.settings.breaker_failures, cooldown=self.settings.breaker_cooldown_seconds
            )
        return breaker

    async def fetch(self, credential: CredentialSettings, scope_set: str, deadline: float) -> FetchedToken:
        """One token for (credential, scope set), retrying transient failures until `deadline`.

        `deadline` is a time.monotonic() value. Raises an UpstreamError subclass, whatever goes
        wrong in the exchange (the original exception chained as its cause).
        """
        breaker = self.breaker(credential.name)
        plan = await self.rotation.plan(credential, deadline)
        attempt = failures = 0
        while True:
            attempt += 1
            admitted = breaker.admit()  # the circuit-open refusal is raised here: not retried
            try:
                with admitted:
                    fetched = await self._attempt(credential, plan, scope_set, deadline, attempt)
            except UpstreamRejected as exc:
                # Only a refused client authentication tries the next secret (spec §6.5): the
                # same fetch, the same deadline. Anything else says nothing about the secret.
                if exc.upstream_error == "invalid_client" and plan.fall_back():
                    continue
                raise
            except UpstreamUnavailable as exc:
                failures += 1
                delay = self.retry_delay(exc, failures, deadline)
                if delay is None:
                    raise
                log.info(
                    "upstream.retry",
                    credential=credential.name,
                    attempt=attempt,
                    delay=round(delay, 3),
                    reason=exc.description,
                )
                await asyncio.sleep(delay)
            except UpstreamError:
                raise
            except Exception as exc:
                # Not one of the failures _attempt knows (those are translated where they happen):
                # a bug here or in a library. The caller still gets an answer from the error tree;
                # the traceback goes to the log (through the redactor, like every line).
                log.exception("upstream.unexpected_error", credential=credential.name, error_type=type(exc).__name__)
                raise UpstreamInvalidResponse(f"The token request failed unexpectedly ({type(exc).__name__}).") from exc
            else:
                await self.rotation.worked(credential, plan, deadline)
                return fetched

    def retry_delay(self, exc: UpstreamUnavailable, failures: int, deadline: float) -> float | None:
        """Exponential backoff with full jitter, at least Retry-After; None when out of attempts or time."""
        if failures >= self.settings.max_attempts:
            return None
        backoff = random.uniform(0, min(_BACKOFF_CAP, _BACKOFF_BASE * 2 ** (failures - 1)))  # noqa: S311
        delay = max(backoff, exc.retry_after or 0.0)
        return delay if time.monotonic() + delay < deadline else None

    async def _attempt(
        self, credential: CredentialSettings, plan: SecretPlan, scope_set: str, deadline: float, attempt: int
    ) -> FetchedToken:
        form: dict[str, str] = {"grant_type": "client_credentials"}
        if scope_set:
            form["scope"] = scope_set
        if credential.audience:
            form["audience"] = credential.audience
        if credential.resource:
            form["resource"] = credential.resource
        form.update(credential.extra_params)
        return await self.post_token(credential, form, deadline, plan=plan, requested_scope=scope_set, attempt=attempt)

    async def post_token(
        self,
        credential: CredentialSettings,
        form: dict[str, str],
        deadline: float,
        *,
        plan: SecretPlan,
        requested_scope: str,
        attempt: int = 1,
        grant: str = "client_credentials",
    ) -> FetchedToken:
        """One POST to the token endpoint (any grant), the client authenticated; its answer read."""
        token_url = await self.token_endpoint(credential, deadline)
        headers: dict[str, str] = {}
        self.authenticate(credential, plan.secret, form, headers, token_url)
        # which of several secrets (the field name must not say "secret": the redactor masks those)
        using = {"using": f"client_secrets[{plan.index}]"} if plan.rotating else {}

        issued_at = self.clock.now()
        started = time.monotonic()
        status: int | str = "error"
        try:
            async with (
                asyncio.timeout_at(self.loop_deadline(deadline)),
                self.http_for(credential) as http,
                http.stream("POST", token_url, data=form, headers=headers) as response,
            ):
                status = response.status_code
                body = await read_capped(response)
                content_type = response.headers.get("content-type")
                retry_after = response.headers.get("retry-after")
        except UpstreamError:
            raise
        except Exception as exc:
            failure = exchange_failure(exc, "the authorization server")
            if isinstance(failure, UpstreamUnavailable):
                status = "timeout" if isinstance(exc, TimeoutError | httpx.TimeoutException) else "unreachable"
            raise failure from exc
        finally:
            elapsed = time.monotonic() - started
            observe_upstream(credential.name, str(status), elapsed)
            log.info(
                "upstream.token_request",
                credential=credential.name,
                grant=grant,
                status=status,
                attempt=attempt,
                duration_ms=round(elapsed * 1000, 1),
                **using,
            )
        if status == 200:
            return parse_token_response(
                content_type,
                body,
                requested_scope=requested_scope,
                issued_at=issued_at,
                default_expires_in=self.default_expires_in,
            )
        raise classify_error(int(status), content_type, body, retry_after)

    loop_deadline = staticmethod(loop_deadline)

    async def token_endpoint(self, credential: CredentialSettings, deadline: float) -> str:
        """Where the credential's token requests go: for tls_client_auth, the mTLS alias if any."""
        discovery = await self.discovery(credential, deadline)
        return self._for_method(credential, discovery.token_endpoint, discovery.mtls_token_endpoint)

    async def revocation_endpoint(self, credential: CredentialSettings, deadline: float) -> str | None:
        discovery = await self.discovery(credential, deadline)
        if discovery.revocation_endpoint is None:
            return None
        return self._for_method(credential, discovery.revocation_endpoint, discovery.mtls_revocation_endpoint)

    @staticmethod
    def _for_method(credential: CredentialSettings, endpoint: str, mtls_alias: str | None) -> str:
        if credential.tls_client is None:
            return endpoint
        endpoint = mtls_alias or endpoint
        if not endpoint.startswith("https://"):
            raise UpstreamInvalidResponse(
                "The authorization server's endpoint for tls_client_auth is not https (and discovery names no"
                " mtls_endpoint_aliases): there is no TLS connection to present the client certificate on."
            )
        return endpoint

    async def discovery(self, credential: CredentialSettings, deadline: float) -> Discovery:
        if credential.token_url:
            return Discovery(token_endpoint=credential.token_url)
        assert credential.issuer is not None  # noqa: S101 - settings guarantee one of the two
        return await self.discoveries.get(credential.issuer, deadline)

    async def get_json(self, url: str, deadline: float, what: str) -> dict[str, Any]:
        """A JSON object from `url` (a discovery document, a JWKS), size-capped, within `deadline`."""
        return await get_json(self.http, url, deadline, what)
