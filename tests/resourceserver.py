"""A resource server for the SDK tests: accepts only a token the test authorization server signed,
that has not expired, and that the test has not revoked; answers 401 otherwise.

It runs in the test process with uvicorn in a thread. The test "rotates" a token under a caller
by revoking it here: the broker still holds it, so the caller's next request meets a 401.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from types import TracebackType
from typing import Self

import httpx
import uvicorn
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.support import free_port

__all__ = ["ResourceServer", "Seen"]


@dataclass
class Seen:
    """What the resource server saw: accepted and rejected requests, in order."""

    accepted: list[tuple[str, bytes]] = field(default_factory=list)  # (token, body)
    rejected: list[tuple[str, bytes]] = field(default_factory=list)


class ResourceServer:
    def __init__(self, jwks_url: str) -> None:
        self.keys = KeySet.import_key_set(httpx.get(jwks_url, timeout=10).json())
        self.revoked: set[str] = set()
        self.reject_all = False
        self.seen = Seen()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        app = Starlette(routes=[Route("/data", self._data, methods=["GET", "POST"])])
        self._server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off")
        )
        self._thread = threading.Thread(target=self._server.run, name="resource-server", daemon=True)

    def _valid(self, authorization: str) -> str | None:
        scheme, _, token = authorization.partition(" ")
        if scheme != "Bearer" or not token or token in self.revoked or self.reject_all:
            return None
        try:
            claims = jwt.decode(token, self.keys, algorithms=["RS256"]).claims
            jwt.JWTClaimsRegistry(exp={"essential": True}).validate(claims)
        except (JoseError, ValueError):
            return None
        return token

    async def _data(self, request: Request) -> Response:
        body = await request.body()
        authorization = request.headers.get("authorization", "")
        token = self._valid(authorization)
        if token is None:
            self.seen.rejected.append((authorization.removeprefix("Bearer "), body))
            return JSONResponse({"error": "invalid_token"}, 401, headers={"WWW-Authenticate": "Bearer"})
        self.seen.accepted.append((token, body))
        return JSONResponse({"ok": True, "body": body.decode()})

    def start(self) -> Self:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the resource server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
