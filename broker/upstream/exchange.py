"""One HTTP exchange with an authorization server (or a caller issuer): the shared client, a
size-capped body, a JSON document by GET, and what a failed exchange stands for.

Every GET of a discovery document or a key set in the broker goes through `get_json`: one cap,
one deadline, one classification (spec §7: unavailable is retried or answered 503, an answer
that cannot be used is upstream_invalid_response).
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from typing import Any

import httpx

from broker.errors import UpstreamError, UpstreamInvalidResponse, UpstreamUnavailable
from broker.settings import UpstreamSettings
from broker.upstream.response import MAX_BODY_BYTES

__all__ = ["exchange_failure", "get_json", "loop_deadline", "new_http_client", "read_capped", "usable_url"]


def new_http_client(settings: UpstreamSettings, *, verify: ssl.SSLContext | bool = True) -> httpx.AsyncClient:
    """The one shared HTTP client of a process: timeouts, a pool, no redirects, no env proxies.
    Made the same way, with the TLS context of a client certificate, for tls_client_auth."""
    return httpx.AsyncClient(
        verify=verify,
        timeout=httpx.Timeout(settings.timeout_seconds, connect=settings.connect_timeout_seconds),
        limits=httpx.Limits(max_connections=100, max_keepalive_connections=20),
        follow_redirects=False,
        trust_env=False,
        headers={"User-Agent": "token-broker", "Accept": "application/json"},
    )


def loop_deadline(deadline: float) -> float:
    """asyncio.timeout_at takes loop time; convert from time.monotonic()."""
    loop = asyncio.get_running_loop()
    return loop.time() + (deadline - time.monotonic())


async def read_capped(response: httpx.Response) -> bytes:
    """A response body read with a size cap, so a huge answer cannot exhaust memory."""
    declared = response.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise UpstreamInvalidResponse("The authorization server's answer is larger than 64 KiB.")
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_bytes():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise UpstreamInvalidResponse("The authorization server's answer is larger than 64 KiB.")
        chunks.append(chunk)
    return b"".join(chunks)


async def get_json(
    http: httpx.AsyncClient, url: str, deadline: float, what: str, server: str = "the authorization server"
) -> dict[str, Any]:
    """A JSON object from `url` (a discovery document, a JWKS), size-capped, within `deadline`
    (time.monotonic()). UpstreamUnavailable or UpstreamInvalidResponse, with a sentence, if not."""
    subject = server[:1].upper() + server[1:]
    try:
        async with asyncio.timeout_at(loop_deadline(deadline)):
            async with http.stream("GET", url) as response:
                body = await read_capped(response)
                status = response.status_code
    except UpstreamError:
        raise
    except Exception as exc:
        raise exchange_failure(exc, f"{server}'s {what} endpoint") from exc
    if status == 429 or status >= 500:
        raise UpstreamUnavailable(f"{subject}'s {what} answered HTTP {status}.")
    if status != 200:
        raise UpstreamInvalidResponse(f"{subject}'s {what} answered HTTP {status}.")
    try:
        doc = json.loads(body)
    except RecursionError as exc:
        raise UpstreamInvalidResponse(f"The {what} document is nested too deeply to read.") from exc
    except ValueError as exc:  # UnicodeDecodeError included
        raise UpstreamInvalidResponse(f"The {what} document is not JSON.") from exc
    if not isinstance(doc, dict):
        raise UpstreamInvalidResponse(f"The {what} document is not a JSON object.")
    return doc


def usable_url(url: str) -> bool:
    """An absolute http(s) URL with a host that httpx can send a request to."""
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL:
        return False
    return parsed.scheme in ("https", "http") and bool(parsed.host)


# Failures that mean the request never left: nothing was spent on the server.
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout, httpx.UnsupportedProtocol)


def _certificate_refused(exc: BaseException) -> str | None:
    """Why the server's TLS certificate did not verify, if that is what the failure was."""
    seen: BaseException | None = exc
    for _ in range(8):  # httpx → httpcore → ssl: a short chain
        if seen is None:
            break
        if isinstance(seen, ssl.SSLCertVerificationError):
            return str(seen.verify_message or seen.reason or "verification failed")
        seen = seen.__cause__ or seen.__context__
    return None


def exchange_failure(exc: Exception, server: str) -> UpstreamError:
    """What a failed HTTP exchange with `server` ("the authorization server…") stands for.

    Timeouts and transport errors are transient; an answer that arrived but cannot be read (a
    broken Content-Encoding) is an invalid response, and so is any other failure (another httpx
    error, or an exception from below it): nothing usable came back, and retrying will not help.
    """
    name = type(exc).__name__
    subject = server[:1].upper() + server[1:]
    maybe_sent = not isinstance(exc, _NOT_SENT)
    if isinstance(exc, TimeoutError | httpx.TimeoutException):
        return UpstreamUnavailable(f"{subject} did not answer in time.", maybe_sent=maybe_sent)
    if isinstance(exc, httpx.ConnectError) and (reason := _certificate_refused(exc)):
        # a wrong CA (tls_ca_file) or host name: say so, rather than "could not be reached"
        return UpstreamUnavailable(f"{subject}'s TLS certificate does not verify ({reason}).", maybe_sent=False)
    if isinstance(exc, httpx.TransportError):
        return UpstreamUnavailable(f"{subject} could not be reached ({name}).", maybe_sent=maybe_sent)
    if isinstance(exc, httpx.DecodingError):
        return UpstreamInvalidResponse(f"{subject} sent a body that cannot be decoded (broken Content-Encoding).")
    return UpstreamInvalidResponse(f"The exchange with {server} failed ({name}).")
