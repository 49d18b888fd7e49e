"""The baseline the broker is measured against, served like `token-broker serve` serves the broker.

`python -m bench.baseline --port P --workers N --body-bytes B [--kind starlette|asgi]`

- starlette: a bare Starlette route returning a constant JSON object through JSONResponse
  (what "a bare Starlette endpoint" costs: routing, a Response object, json.dumps per request).
  It answers POST too (without reading the body), for the facade's form POSTs (bench/facade.py).
- asgi: a pure ASGI callable sending the same body pre-encoded: the ceiling under this uvicorn.

The body is a token-response-shaped JSON object padded to B bytes, so it matches the broker's
answer in size.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from bench.common import UVICORN_SETTINGS

PATH = "/v1/tokens/baseline"


def token_shaped(size: int) -> dict[str, Any]:
    """A JSON object shaped like a token response whose compact encoding is exactly `size` bytes."""
    body: dict[str, Any] = {
        "access_token": "",
        "token_type": "Bearer",
        "expires_in": 3599,
        "expires_at": "2026-11-24T12:00:00Z",
        "scope": "urn:bench:s00",
    }
    empty = len(json.dumps(body, separators=(",", ":")).encode())
    body["access_token"] = "x" * max(0, size - empty)
    return body


def _body_size() -> int:
    return int(os.environ.get("BENCH_BODY_BYTES", "1024"))


def starlette_app() -> Starlette:
    content = token_shaped(_body_size())

    async def endpoint(request: Request) -> Response:
        return JSONResponse(content, headers={"Cache-Control": "no-store", "Pragma": "no-cache"})

    return Starlette(routes=[Route(PATH, endpoint, methods=["GET", "POST"])])


def asgi_app() -> Any:
    body = json.dumps(token_shaped(_body_size()), separators=(",", ":")).encode()
    start = {
        "type": "http.response.start",
        "status": 200,
        "headers": [
            (b"cache-control", b"no-store"),
            (b"pragma", b"no-cache"),
            (b"content-length", str(len(body)).encode()),
            (b"content-type", b"application/json"),
        ],
    }
    done = {"type": "http.response.body", "body": body}

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await receive()  # startup
            await send({"type": "lifespan.startup.complete"})
            await receive()  # shutdown
            await send({"type": "lifespan.shutdown.complete"})
            return
        await send(start)
        await send(done)

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--body-bytes", type=int, default=1024)
    parser.add_argument("--kind", choices=["starlette", "asgi"], default="starlette")
    args = parser.parse_args()
    os.environ["BENCH_BODY_BYTES"] = str(args.body_bytes)
    factory = "bench.baseline:starlette_app" if args.kind == "starlette" else "bench.baseline:asgi_app"
    uvicorn.run(factory, factory=True, host="127.0.0.1", port=args.port, workers=args.workers, **UVICORN_SETTINGS)


if __name__ == "__main__":
    main()
