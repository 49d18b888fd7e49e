"""Test issuers of caller JWTs (spec §6.3): OIDC discovery and a JWK Set per issuer, changeable at
run time, with request counts. Tokens are minted by the tests themselves (`Signer`), which hold
the private keys; the server only publishes what it is told to.

Run as ``python -m tests.callerissuer --port N``. Issuer NAME is ``http://127.0.0.1:N/issuers/NAME``:

    GET  /issuers/NAME/.well-known/openid-configuration   {"issuer", "jwks_uri"}
    GET  /issuers/NAME/jwks                               the key set last put (404 before)
    PUT  /_control/issuers/NAME/jwks                      body: the public key set to publish
    GET  /_control/stats                                  {"NAME": {"jwks": n, "discovery": n}}
    POST /_control/reset                                  forget every issuer and count
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import httpx
import uvicorn
from joserfc import jwt
from joserfc.jwk import ECKey, Key, KeySet, OKPKey, RSAKey
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from broker.embedded_redis import terminate
from tests.support import REPO_ROOT, free_port, wait_http

__all__ = ["AUDIENCE", "CallerIssuerProcess", "Signer"]

AUDIENCE = "token-broker"


class IssuerApp:
    def __init__(self, base: str) -> None:
        self.base = base
        self.key_sets: dict[str, dict[str, Any]] = {}
        self.counts: dict[str, dict[str, int]] = {}
        self.app = Starlette(
            routes=[
                Route("/issuers/{name}/.well-known/openid-configuration", self.discovery),
                Route("/issuers/{name}/jwks", self.jwks),
                Route("/_control/issuers/{name}/jwks", self.put_jwks, methods=["PUT"]),
                Route("/_control/stats", self.stats),
                Route("/_control/reset", self.reset, methods=["POST"]),
                Route("/_control/health", self.health),
            ]
        )

    def _count(self, name: str, what: str) -> None:
        counts = self.counts.setdefault(name, {"jwks": 0, "discovery": 0})
        counts[what] += 1

    async def discovery(self, request: Request) -> Response:
        name = request.path_params["name"]
        self._count(name, "discovery")
        issuer = f"{self.base}/issuers/{name}"
        return JSONResponse({"issuer": issuer, "jwks_uri": f"{issuer}/jwks"})

    async def jwks(self, request: Request) -> Response:
        name = request.path_params["name"]
        self._count(name, "jwks")
        if name not in self.key_sets:
            return JSONResponse({"error": "no such issuer"}, 404)
        return JSONResponse(self.key_sets[name])

    async def put_jwks(self, request: Request) -> Response:
        self.key_sets[request.path_params["name"]] = await request.json()
        return Response(status_code=204)

    async def stats(self, request: Request) -> Response:
        return JSONResponse(self.counts)

    async def reset(self, request: Request) -> Response:
        self.key_sets.clear()
        self.counts.clear()
        return Response(status_code=204)

    async def health(self, request: Request) -> Response:
        return PlainTextResponse("ok")


class Signer:
    """An issuer's signing keys, held by the test: mints caller JWTs, publishes its public keys."""

    def __init__(self, issuer: str, keys: list[Key] | None = None) -> None:
        self.issuer = issuer
        self.keys = keys if keys is not None else [new_key("RSA")]

    @property
    def key(self) -> Key:
        return self.keys[0]

    def public_jwks(self) -> dict[str, Any]:
        return KeySet(self.keys).as_dict(private=False)

    def claims(self, subject: str, **changes: Any) -> dict[str, Any]:
        now = int(time.time())
        claims = {"iss": self.issuer, "sub": subject, "aud": [AUDIENCE], "iat": now, "nbf": now, "exp": now + 600}
        claims.update(changes)
        return {k: v for k, v in claims.items() if v is not None}

    def token(self, subject: str, *, key: Key | None = None, alg: str | None = None, **claims: Any) -> str:
        key = key or self.key
        algorithm = alg or _default_alg(key)
        header = {"alg": algorithm, "kid": key.kid}
        return jwt.encode(header, self.claims(subject, **claims), key, algorithms=[algorithm])


def new_key(kind: str) -> Key:
    kid = f"{kind.lower()}-{uuid.uuid4().hex[:8]}"
    if kind == "RSA":
        return RSAKey.generate_key(2048, parameters={"kid": kid, "use": "sig"})
    if kind == "EC":
        return ECKey.generate_key("P-256", parameters={"kid": kid, "use": "sig"})
    return OKPKey.generate_key("Ed25519", parameters={"kid": kid, "use": "sig"})


def _default_alg(key: Key) -> str:
    return {"RSA": "RS256", "EC": "ES256", "OKP": "Ed25519"}[key.key_type]


class CallerIssuerProcess:
    """This module's server in a child process; `issuer(name)` is an issuer's URL."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: Path | None = None
        self._client = httpx.Client(base_url=self.url, timeout=10.0, trust_env=False)

    def issuer(self, name: str) -> str:
        return f"{self.url}/issuers/{name}"

    def start(self) -> Self:
        fd, log = tempfile.mkstemp(prefix="callerissuer-", suffix=".log")
        self._log = Path(log)
        with open(fd, "wb") as out:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "tests.callerissuer", "--port", str(self.port)],
                cwd=REPO_ROOT,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        wait_http(f"{self.url}/_control/health", proc=self._proc, log_path=self._log)
        return self

    def stop(self) -> None:
        self._client.close()
        terminate(self._proc)
        self._proc = None
        if self._log is not None:
            self._log.unlink(missing_ok=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def publish(self, name: str, signer: Signer) -> None:
        self._client.put(f"/_control/issuers/{name}/jwks", json=signer.public_jwks()).raise_for_status()

    def stats(self, name: str) -> dict[str, int]:
        counts: dict[str, int] = self._client.get("/_control/stats").json().get(name, {"jwks": 0, "discovery": 0})
        return counts

    def reset(self) -> None:
        self._client.post("/_control/reset").raise_for_status()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    app = IssuerApp(f"http://127.0.0.1:{args.port}")
    uvicorn.run(app.app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False, lifespan="off")


if __name__ == "__main__":
    main()
