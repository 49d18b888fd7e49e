"""`BrokerAuth`: tokens held in process, renewed at a margin, single-flight per process, and
the one retry after a 401 (the flow is drawn in broker/client/__init__.py)."""

from __future__ import annotations

import asyncio
import functools
import math
import os
import threading
import time
from collections.abc import AsyncGenerator, Callable, Generator, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self, TypeGuard
from urllib.parse import quote

import httpx

from broker.client._answers import BrokerUnavailable, Token, error_of, token_of, unreachable
from broker.secret import Secret

if TYPE_CHECKING:
    import requests

__all__ = ["CALLER_KEY_ENV", "DEFAULT_URL", "URL_ENV", "BrokerAuth"]

URL_ENV = "TOKEN_BROKER_URL"
CALLER_KEY_ENV = "TOKEN_BROKER_CALLER_KEY"
DEFAULT_URL = "http://127.0.0.1:8080"
DEFAULT_TIMEOUT = 15.0  # above the broker's own request deadline (10 s), so its answer arrives
UNAVAILABLE_PAUSE = 1.0  # after a failed renewal, the held token is used this long before asking again


@dataclass(frozen=True, eq=False)
class _Held:
    """A token held in process, judged on the injected monotonic clock from when it was asked for."""

    token: Token
    renew_at: float
    expires: float

    @property
    def authorization(self) -> str:
        return f"Bearer {self.token.access_token}"


class _AsyncState:
    """What async flows share within one event loop: a lock and a connection pool are bound to it."""

    def __init__(self, loop: asyncio.AbstractEventLoop, client: httpx.AsyncClient, owned: bool) -> None:
        self.loop = loop
        self.lock = asyncio.Lock()
        self.client = client
        self.owned = owned


def _replayable(request: httpx.Request) -> bool:
    """Bytes, text, JSON and form bodies can be sent twice; generators and multipart streams not."""
    return isinstance(request.stream, httpx.ByteStream)


class BrokerAuth(httpx.Auth):
    """Tokens of one credential and scope set from token-broker, for httpx (sync and async) and requests.

    `url` defaults to $TOKEN_BROKER_URL, else http://127.0.0.1:8080; `caller_key` to the variable
    named by `caller_key_env`. `client`/`async_client` are for the broker connection (TLS, proxies);
    given ones are not closed by `close()`/`aclose()`. `clock` is a monotonic clock (tests).
    """

    def __init__(
        self,
        credential: str,
        scope: str | Sequence[str] | None = None,
        *,
        url: str | None = None,
        caller_key: str | None = None,
        caller_key_env: str = CALLER_KEY_ENV,
        min_ttl: float = 30.0,
        renew_fraction: float = 0.1,
        timeout: float = DEFAULT_TIMEOUT,
        client: httpx.Client | None = None,
        async_client: httpx.AsyncClient | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        base = (url or os.environ.get(URL_ENV) or DEFAULT_URL).rstrip("/")
        try:
            parsed = httpx.URL(base)
        except httpx.InvalidURL:
            parsed = None
        if parsed is None or parsed.scheme not in {"http", "https"} or not parsed.host:
            raise ValueError(f"The broker URL must be http:// or https:// with a host, not {base!r}.")
        key = caller_key if caller_key is not None else os.environ.get(caller_key_env, "")
        if not key:
            raise ValueError(f"No caller key: set the environment variable {caller_key_env}.")
        if not (key.isascii() and key.isprintable() and " " not in key):
            raise ValueError("The caller key must be printable ASCII without spaces.")
        if min_ttl < 0 or not 0 <= renew_fraction < 1 or timeout <= 0:
            raise ValueError("min_ttl must be ≥ 0, renew_fraction in [0, 1) and timeout > 0.")
        self.url = base
        self.credential = credential
        self.scope = scope if scope is None or isinstance(scope, str) else " ".join(scope)
        self.min_ttl = min_ttl
        self.renew_fraction = renew_fraction
        self._key = Secret(key, source="argument" if caller_key is not None else f"env:{caller_key_env}")
        self._tokens_url = f"{base}/v1/tokens/{quote(credential, safe='')}"
        self._timeout = timeout
        self._clock = clock
        self._held: _Held | None = None
        self._ask_not_before = 0.0  # the broker failed: until then the held token is used without asking
        self._lock = threading.Lock()
        self._client = client
        self._owns_client = client is None
        self._given_async_client = async_client
        self._async: _AsyncState | None = None

    def __repr__(self) -> str:
        return f"BrokerAuth({self.credential!r}, scope={self.scope!r}, url={self.url!r})"

    # --- the broker's two routes ---------------------------------------------------------------

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._key.reveal()}", "Accept": "application/json"}

    def _token_request(self, min_ttl: int) -> httpx.Request:
        params = {k: v for k, v in (("scope", self.scope), ("min_ttl", str(min_ttl) if min_ttl else None)) if v}
        return httpx.Request("GET", self._tokens_url, params=params, headers=self._headers())

    def _invalidate_request(self, rejected: Token) -> httpx.Request:
        body = {"access_token": rejected.access_token, **({"scope": self.scope} if self.scope is not None else {})}
        return httpx.Request("POST", f"{self._tokens_url}/invalidate", json=body, headers=self._headers())

    def _wanted_min_ttl(self, held: _Held | None) -> int:
        """What to ask for: the margin this token will be renewed at (the last one's lifetime as a guess)."""
        lifetime = held.token.expires_in if held is not None else 0
        return math.ceil(max(self.min_ttl, self.renew_fraction * lifetime))

    def _hold(self, token: Token, asked_at: float) -> _Held:
        left = token.expires_in
        margin = min(max(self.min_ttl, self.renew_fraction * left), left / 2)
        return _Held(token, renew_at=asked_at + left - margin, expires=asked_at + left)

    def _usable(self, held: _Held | None, now: float) -> TypeGuard[_Held]:
        return held is not None and (now < held.renew_at or (now < self._ask_not_before and now < held.expires))

    def _fallback(self, held: _Held | None, exc: BrokerUnavailable) -> _Held:
        """The broker is down or overloaded: a token still valid beats an error, for a while."""
        now = self._clock()
        if held is None or now >= held.expires:
            raise exc
        self._ask_not_before = now + (exc.retry_after or UNAVAILABLE_PAUSE)
        return held

    # --- sync ----------------------------------------------------------------------------------

    def _sync_client(self) -> httpx.Client:
        if self._client is None:
            self._client = httpx.Client(timeout=self._timeout)
        return self._client

    def _send(self, request: httpx.Request) -> httpx.Response:
        try:
            return self._sync_client().send(request)
        except httpx.HTTPError as exc:
            raise unreachable(self.url, exc) from exc

    def _fetch(self, held: _Held | None) -> _Held:
        asked_at = self._clock()
        return self._hold(token_of(self._send(self._token_request(self._wanted_min_ttl(held)))), asked_at)

    def _current(self) -> _Held:
        held = self._held
        if self._usable(held, self._clock()):
            return held
        with self._lock:
            held = self._held
            if self._usable(held, self._clock()):
                return held
            try:
                self._held = self._fetch(held)
            except BrokerUnavailable as exc:
                return self._fallback(held, exc)
            return self._held

    def _replace(self, rejected: _Held) -> _Held | None:
        """After a 401 with `rejected`: report it (once per process) and get another token, or None."""
        with self._lock:
            if self._held is rejected:
                response = self._send(self._invalidate_request(rejected.token))
                if response.status_code != 204:
                    raise error_of(response)
                self._held = self._fetch(None)
            held = self._held
        return held if held is not None and held.token.access_token != rejected.token.access_token else None

    def token(self) -> Token:
        """The current token (from the process, or the broker when it needs renewing)."""
        return self._current().token

    def sync_auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        held = self._current()
        request.headers["Authorization"] = held.authorization
        response = yield request
        if response.status_code != 401:
            return
        fresh = self._replace(held)
        if fresh is not None and _replayable(request):
            request.headers["Authorization"] = fresh.authorization
            yield request

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        """The `requests` auth: `requests.get(url, auth=BrokerAuth(…))`, with the same 401 handling."""
        held = self._current()
        request.headers["Authorization"] = held.authorization
        request.register_hook("response", functools.partial(self._requests_401, held))
        return request

    def _requests_401(self, held: _Held, response: requests.Response, **kwargs: Any) -> requests.Response:
        if response.status_code != 401:
            return response
        fresh = self._replace(held)
        sent = response.request
        if fresh is None or not (sent.body is None or isinstance(sent.body, bytes | str)):
            return response
        response.close()
        again = sent.copy()
        again.headers["Authorization"] = fresh.authorization
        retried: requests.Response = response.connection.send(again, **kwargs)
        retried.history.append(response)
        retried.request = again
        return retried

    def close(self) -> None:
        if self._owns_client and self._client is not None:
            self._client.close()
            self._client = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # --- async ---------------------------------------------------------------------------------

    def _async_state(self) -> _AsyncState:
        loop = asyncio.get_running_loop()
        if self._async is None or self._async.loop is not loop:
            given = self._given_async_client
            client = given if given is not None else httpx.AsyncClient(timeout=self._timeout)
            self._async = _AsyncState(loop, client, owned=given is None)
        return self._async

    async def _asend(self, request: httpx.Request) -> httpx.Response:
        try:
            return await self._async_state().client.send(request)
        except httpx.HTTPError as exc:
            raise unreachable(self.url, exc) from exc

    async def _afetch(self, held: _Held | None) -> _Held:
        asked_at = self._clock()
        return self._hold(token_of(await self._asend(self._token_request(self._wanted_min_ttl(held)))), asked_at)

    async def _acurrent(self) -> _Held:
        held = self._held
        if self._usable(held, self._clock()):
            return held
        async with self._async_state().lock:
            held = self._held
            if self._usable(held, self._clock()):
                return held
            try:
                self._held = await self._afetch(held)
            except BrokerUnavailable as exc:
                return self._fallback(held, exc)
            return self._held

    async def _areplace(self, rejected: _Held) -> _Held | None:
        async with self._async_state().lock:
            if self._held is rejected:
                response = await self._asend(self._invalidate_request(rejected.token))
                if response.status_code != 204:
                    raise error_of(response)
                self._held = await self._afetch(None)
            held = self._held
        return held if held is not None and held.token.access_token != rejected.token.access_token else None

    async def atoken(self) -> Token:
        return (await self._acurrent()).token

    async def async_auth_flow(self, request: httpx.Request) -> AsyncGenerator[httpx.Request, httpx.Response]:
        held = await self._acurrent()
        request.headers["Authorization"] = held.authorization
        response = yield request
        if response.status_code != 401:
            return
        fresh = await self._areplace(held)
        if fresh is not None and _replayable(request):
            request.headers["Authorization"] = fresh.authorization
            yield request

    async def aclose(self) -> None:
        state, self._async = self._async, None
        if state is not None and state.owned:
            await state.client.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()
