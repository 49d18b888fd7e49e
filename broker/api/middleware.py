"""Pure ASGI middleware: request ids and request logging, caller authentication."""

from __future__ import annotations

import re
import time
import uuid
from typing import Any

import structlog
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from broker.caller_jwt import RefusalLog
from broker.errors import BrokerError, InvalidRequest, JWTRefused
from broker.logins import CALLBACK_PATH
from broker.vault.registry import Registry

__all__ = ["MAX_HEADERS", "MAX_HEADER_BYTES", "CallerAuth", "RequestLimits", "RequestLog", "error_response_parts"]

log = structlog.get_logger("broker.api")

MAX_HEADERS = 64
MAX_HEADER_BYTES = 16_384
_PROBES = frozenset({"/healthz", "/readyz"})  # polled every few seconds: not worth an event
_REQUEST_ID = re.compile(r"[A-Za-z0-9._\-]{1,64}")


def error_response_parts(error: BrokerError) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    import json  # noqa: PLC0415 - cold path

    body = json.dumps(error.body(), separators=(",", ":")).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"cache-control", b"no-store"),
    ]
    headers += [(k.lower().encode(), v.encode()) for k, v in error.headers().items()]
    return error.status, headers, body


async def send_error(send: Send, error: BrokerError) -> None:
    status, headers, body = error_response_parts(error)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class RequestLimits:
    """Refuses requests with too many or too large headers before anything else looks at them.

    uvicorn's httptools parser sets no header limits of its own.
    """

    def __init__(
        self, app: ASGIApp, *, max_headers: int = MAX_HEADERS, max_header_bytes: int = MAX_HEADER_BYTES
    ) -> None:
        self.app = app
        self.max_headers = max_headers
        self.max_header_bytes = max_header_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = scope["headers"]
            if len(headers) > self.max_headers or sum(len(k) + len(v) for k, v in headers) > self.max_header_bytes:
                await send_error(
                    send,
                    InvalidRequest(
                        f"The request headers exceed {self.max_headers} fields or {self.max_header_bytes} bytes."
                    ),
                )
                return
        await self.app(scope, receive, send)


class RequestLog:
    """Binds a request id and logs one event per request that did not end as an L1 hit.

    The route records its outcome in `scope["state"]["outcome"]`; L1 hits are counted
    elsewhere, not logged, unless `access_log` is on.
    """

    def __init__(self, app: ASGIApp, *, access_log: bool = False) -> None:
        self.app = app
        self.access_log = access_log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500
        state: dict[str, Any] = scope.setdefault("state", {})

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            outcome = state.get("outcome")
            quiet = outcome == "l1" or (scope["path"] in _PROBES and status < 400)
            if not quiet or self.access_log:
                request_id = _request_id(scope)
                log.info(
                    "request",
                    request_id=request_id,
                    method=scope["method"],
                    path=scope["path"][:256],
                    status=status,
                    outcome=outcome,
                    caller=state.get("caller_name"),
                    credential=state.get("credential"),
                    error=state.get("error"),
                    duration_ms=round((time.perf_counter() - started) * 1000, 2),
                )


def _request_id(scope: Scope) -> str:
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            text: str = bytes(value).decode("latin-1")
            if _REQUEST_ID.fullmatch(text):
                return text
            break
    return uuid.uuid4().hex


class CallerAuth:
    """Authenticates callers on /v1/ routes (the admin API has its own keys); everything else
    passes through untouched. Callers are read from the live registry on every request; a caller
    JWT whose issuer's key set must be fetched first is verified after the fetch. Why a JWT was
    refused goes to the log, aggregated (`RefusalLog`); the answer never says."""

    def __init__(self, app: ASGIApp, *, registry: Registry) -> None:
        self.app = app
        self.registry = registry
        self.refusals = RefusalLog(registry.jwts.clock)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope.get("path", "")
        if (
            scope["type"] != "http"
            or not path.startswith("/v1/")
            or path.startswith("/v1/admin/")  # admin keys (broker/api/admin.py)
            or path == CALLBACK_PATH  # a user's browser, back from logging in: the state authenticates it
        ):
            await self.app(scope, receive, send)
            return
        authorization: str | None = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                authorization = value.decode("latin-1")
                break
        state: dict[str, Any] = scope.setdefault("state", {})
        try:
            caller = await self.registry.snapshot.callers.authenticate_async(authorization)
        except BrokerError as error:
            if isinstance(error, JWTRefused):
                self.refusals.record(error)
            state["error"] = error.code
            await send_error(send, error)
            return
        state["caller"] = caller
        state["caller_name"] = caller.name
        await self.app(scope, receive, send)
