"""The Starlette application: one lifespan opens Redis, the HTTP client and the token service."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from typing import Any

import structlog
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from broker import metrics, redis_client
from broker.api import admin, facade, routes, subjects
from broker.api.admin import AdminAuth
from broker.api.fastpath import FastPath
from broker.api.middleware import CallerAuth, RequestLimits, RequestLog
from broker.api.state import Broker, Health
from broker.audit import AuditTrail
from broker.caller_jwt import CallerJWTs
from broker.clock import Clock, SystemClock
from broker.entries import Codec
from broker.errors import BrokerError, StoreBusy, StoreUnavailable
from broker.events import Event, EventSubscriber
from broker.jwks import SigningKeys
from broker.logins import CALLBACK_PATH, Logins
from broker.ratelimit import RateLimiter
from broker.settings import Settings
from broker.store import Store
from broker.tasks import cancel
from broker.tokens import TokenService
from broker.upstream.client import UpstreamClient
from broker.upstream.exchange import new_http_client
from broker.upstream.rotation import SecretRotation
from broker.vault.models import Entries
from broker.vault.registry import Registry
from broker.vault.sync import VaultSync

__all__ = ["create_app"]

log = structlog.get_logger("broker.api")

_HEALTH_INTERVAL = 1.0
_HTTP_ERRORS = {404: "not_found", 405: "method_not_allowed"}


_OUTCOMES = {
    "upstream_rejected": "rejected",
    "upstream_unavailable": "unavailable",
    "upstream_invalid_response": "invalid_response",
    "temporarily_unavailable": "overloaded",
    "rate_limited": "rate_limited",
}


async def _broker_error(request: Request, exc: Exception) -> Response:
    """One exception tree, two renderings: the /v1 API's, or RFC 6749's on the OAuth facade."""
    assert isinstance(exc, BrokerError)  # noqa: S101 - registered for BrokerError only
    on_facade: bool = getattr(request.state, "facade", False)
    request.state.error = exc.facade[1] if on_facade else exc.code
    broker: Broker | None = getattr(request.state, "broker", None)
    if broker is not None:
        credential = getattr(request.state, "credential", None) or "-"
        broker.tokens.stats.refused(credential, _OUTCOMES.get(exc.code, "refused"), facade=on_facade)
    if on_facade:
        return facade.error_response(exc)
    return JSONResponse(exc.body(), status_code=exc.status, headers={"Cache-Control": "no-store", **exc.headers()})


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)  # noqa: S101
    code = _HTTP_ERRORS.get(exc.status_code, "invalid_request")
    description = "No such route." if exc.status_code == 404 else f"{exc.detail}."
    request.state.error = code
    return JSONResponse(
        {"error": code, "error_description": description}, status_code=exc.status_code, headers=exc.headers
    )


async def _server_error(request: Request, exc: Exception) -> Response:
    log.error("request.unhandled", error_type=type(exc).__name__)
    return JSONResponse(
        {"error": "server_error", "error_description": "The broker hit an unexpected error."}, status_code=500
    )


async def _flush_metrics(tokens: TokenService, interval: float = 1.0) -> None:
    while True:
        await asyncio.sleep(interval)
        tokens.stats.flush(len(tokens.l1))


async def _watch_redis(store: Store, health: Health) -> None:
    """Keeps readiness honest and notices Redis coming back (the store logs the transitions)."""
    while True:
        # StoreBusy (a full pool) too: load, and a watcher that died of it would be gone for good
        with contextlib.suppress(StoreUnavailable, StoreBusy):
            await store.ping()
            health.redis_seen = True
        await asyncio.sleep(_HEALTH_INTERVAL)


def create_app(settings: Settings, *, clock: Clock | None = None, fast_path: bool = True) -> Starlette:
    clock = clock or SystemClock()
    jwts = CallerJWTs(clock)
    registry = Registry(
        Entries(settings.credentials, settings.callers, settings.admins, settings.caller_issuers), jwts=jwts
    )
    # L1 hits in pure ASGI; off with access_log, which logs every hit (broker/api/fastpath.py)
    fast = fast_path and not settings.server.access_log

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        if settings.redis.url is None:
            raise RuntimeError("create_app needs a Redis URL; `token-broker serve` starts an embedded one")
        redis = redis_client.connect(
            settings.redis.url,
            tls_ca_file=settings.redis.tls_ca_file,
            tls_cert_file=settings.redis.tls_cert_file,
            tls_key_file=settings.redis.tls_key_file,
        )
        store = Store(redis, prefix=settings.redis.key_prefix, codec=Codec(settings.keyring), clock=clock)
        http = new_http_client(settings.upstream)
        jwts.use(http)  # caller JWTs: the issuers' key sets come through the one client too
        upstream = UpstreamClient(
            http,
            settings.upstream,
            default_expires_in=settings.cache.default_expires_in,
            clock=clock,
            rotation=SecretRotation(store, store.codec.fingerprint),  # the working secret, fleet-wide
        )
        tokens = TokenService(
            settings.cache,
            store,
            upstream,
            request_deadline=settings.server.request_deadline_seconds,
            clock=clock,
        )
        vault = VaultSync(store, registry, os.environ)
        limiter = RateLimiter(store, tokens.stats, clock)
        registry.on_credentials_changed(tokens.forget)

        logins = Logins(
            store,
            tokens,
            upstream,
            public_url=settings.server.public_url,
            request_deadline=settings.server.request_deadline_seconds,
            clock=clock,
        )

        def on_event(event: Event) -> None:
            if event.op == "vault":
                vault.poke()
            else:
                tokens.on_event(event)
                logins.on_event(event)

        def on_subscription(live: bool) -> None:
            tokens.on_subscription(live)
            logins.on_subscription(live)

        subscriber = EventSubscriber(redis, store.keys.events, on_event, on_subscription)
        health = Health()
        audit = AuditTrail()
        audit.start()
        subscriber.start()
        watcher = asyncio.create_task(_watch_redis(store, health), name="tb-health")
        flusher = asyncio.create_task(_flush_metrics(tokens), name="tb-metrics")
        with contextlib.suppress(StoreUnavailable, StoreBusy):
            await vault.refresh()  # the admin API's entries, before the first request
        syncer = asyncio.create_task(vault.run(), name="tb-vault")
        await subscriber.wait_live(2.0)
        try:
            keys = SigningKeys(upstream, deadline_seconds=settings.server.request_deadline_seconds)
            yield {
                "broker": Broker(
                    settings,
                    registry,
                    vault,
                    tokens,
                    store,
                    health,
                    clock,
                    audit,
                    keys=keys,
                    limiter=limiter,
                    logins=logins,
                )
            }
        finally:
            await cancel(syncer)
            registry.forget_listeners()
            await cancel(watcher)
            await cancel(flusher)
            await subscriber.stop()
            await tokens.flights.cancel_all()
            await limiter.aclose()
            await audit.stop()
            tokens.stats.flush(0)
            metrics.worker_exit()
            jwts.use(None)
            await upstream.aclose()
            await http.aclose()
            with contextlib.suppress(Exception):
                await redis.aclose()

    app = Starlette(
        routes=[
            Route("/v1/tokens/{credential}", routes.get_token, methods=["GET"]),
            Route("/v1/tokens/{credential}/invalidate", routes.invalidate_token, methods=["POST"]),
            # {subject:path}: an OIDC `sub` may hold slashes (any ASCII up to 255 characters)
            Route("/v1/tokens/{credential}/subjects/{subject:path}", subjects.subject, methods=["GET", "DELETE"]),
            Route("/v1/authorizations/{credential}", subjects.start_login, methods=["POST"]),
            Route(CALLBACK_PATH, subjects.callback, methods=["GET"]),
            Route("/healthz", routes.healthz, methods=["GET"]),
            Route("/readyz", routes.readyz, methods=["GET"]),
            Route("/metrics", routes.metrics, methods=["GET"]),
            Route("/openapi.yaml", routes.openapi, methods=["GET"]),
            Route("/v1/admin/credentials", admin.list_credentials, methods=["GET"]),
            Route("/v1/admin/credentials/{name}", admin.credential, methods=["GET", "PUT", "DELETE"]),
            Route("/v1/admin/callers", admin.list_callers, methods=["GET"]),
            Route("/v1/admin/callers/{name}", admin.caller, methods=["GET", "PUT", "DELETE"]),
            Route("/v1/admin/callers/{name}/key", admin.new_key, methods=["POST"]),
            Route("/v1/admin/caller_issuers", admin.list_caller_issuers, methods=["GET"]),
            Route("/v1/admin/caller_issuers/{name}", admin.caller_issuer, methods=["GET", "PUT", "DELETE"]),
            *facade.ROUTES,
        ],
        middleware=[
            Middleware(RequestLimits),
            *([Middleware(FastPath, max_encoded=settings.cache.l1_max_entries)] if fast else []),
            Middleware(RequestLog, access_log=settings.server.access_log),
            Middleware(CallerAuth, registry=registry),
            Middleware(AdminAuth),
        ],
        exception_handlers={BrokerError: _broker_error, HTTPException: _http_error, Exception: _server_error},
        lifespan=lifespan,
    )
    app.router.redirect_slashes = False  # every answer is JSON: a trailing slash is a 404, not a redirect
    _no_head_under_v1(app)
    return app


def _no_head_under_v1(app: Starlette) -> None:
    """Starlette answers HEAD for every GET route by running the GET endpoint: for a token route
    that is an upstream fetch (or a token handed out) for an answer without a body. Under /v1/
    HEAD is 405 `method_not_allowed` with `Allow: GET`; the service endpoints keep their HEAD."""
    for route in app.routes:
        if isinstance(route, Route) and route.path.startswith("/v1/") and route.methods:
            route.methods.discard("HEAD")


def app_from_env() -> Starlette:
    """uvicorn factory for worker processes: config from BROKER_CONFIG, Redis from BROKER_REDIS_URL."""
    from broker.logs import configure_logging  # noqa: PLC0415
    from broker.settings import load_settings  # noqa: PLC0415

    configure_logging()
    return create_app(load_settings())
