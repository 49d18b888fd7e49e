"""Test OAuth 2.0 authorization server: client credentials grant plus fault switches; the
authorization code grant with OpenID Connect, refresh tokens and revocation are in
tests/authserver_code.py.

Run as ``python -m tests.authserver --port N [--host 127.0.0.1]``. Tests drive it over HTTP
through ``/_control/*`` (see tests/support.py).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import dataclasses
import enum
import hmac
import math
import time
import uuid
from collections import deque
from typing import Any, Final
from urllib.parse import unquote_plus

import uvicorn
from joserfc import jwt
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import (
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
)
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from tests.authserver_code import CODE_GRANT_TYPES, AccessSettings, CodeConfig, CodeFlow, SigningKeys
from tests.authserver_http import CLOSE_KEY as _CLOSE_KEY
from tests.authserver_http import CloseConnection as _CloseConnection
from tests.authserver_http import OAuthError, control_body
from tests.authserver_http import json_response as _json
from tests.authserver_http import parse_form as _parse_form
from tests.authserver_keyless import KeylessClients, TlsListener, peer_certificate
from tests.authserver_keyless import serve as _serve_with_tls

CLIENT_ID: Final = "test-client"
CLIENT_SECRET: Final = "test-secret"
# Characters that break Basic auth unless id and secret are form-urlencoded first (RFC 6749 §2.3.1).
WEIRD_CLIENT_ID: Final = "weird id:é+&"
WEIRD_CLIENT_SECRET: Final = "s3cr%t:+&= é"
CLIENTS: Final = {CLIENT_ID: CLIENT_SECRET, WEIRD_CLIENT_ID: WEIRD_CLIENT_SECRET}

DEFAULT_AUDIENCE: Final = "test-api"
DEFAULT_SCOPE: Final = "urn:default"
HUGE_BODY_BYTES: Final = 2 * 1024 * 1024
FAULTS: Final = frozenset(
    {
        "none",
        "500",
        "503",
        "429",
        "bad_json",
        "html",
        "array",
        "missing_token",
        "empty_token",
        "invalid_client",
        "invalid_scope",
        "unauthorized_client",
        "invalid_grant",
        "401_empty",
        "403_empty",
        "huge",
        "redirect",
        "close",
        "bad_gzip",
    }
)
DISCOVERY_FAULTS: Final = frozenset({"none", "nested", "bad_gzip"})
NESTED_DEPTH: Final = 30_000  # far beyond any JSON parser's recursion limit, and still under 64 KiB


class ExpiresIn(enum.Enum):
    DEFAULT = "default"  # send the configured lifetime
    OMIT = "omit"  # leave expires_in out of the response


@dataclasses.dataclass(frozen=True)
class Config:
    lifetime: int = 3600
    expires_in: Any = ExpiresIn.DEFAULT
    delay: float = 0.0
    fault: str = "none"
    fault_count: int | None = None
    token_type: str = "Bearer"
    grant_scope: str | None = None
    jwt_lifetime: int | None = None  # the JWT's exp, in seconds from now; None: the same as lifetime
    discovery_fault: str = "none"
    # Like servers that cache per client: while a token issued to the same client for the same
    # scope and audience has a whole second left, issue it again (same access_token), with
    # expires_in = the whole seconds it has left (rounded down).
    reissue: bool = False

    def updated(self, changes: object) -> Config:
        if not isinstance(changes, dict):
            raise TypeError("config must be a JSON object")
        types: dict[str, tuple[type, ...]] = {
            "lifetime": (int,),
            "delay": (int, float),
            "fault": (str,),
            "fault_count": (int, type(None)),
            "token_type": (str,),
            "grant_scope": (str, type(None)),
            "jwt_lifetime": (int, type(None)),
            "discovery_fault": (str,),
            "reissue": (bool,),
        }
        for name, value in changes.items():
            if name == "expires_in":
                continue  # any JSON value, sent verbatim
            if name not in types:
                raise ValueError(f"unknown config key {name!r}")
            if (isinstance(value, bool) and bool not in types[name]) or not isinstance(value, types[name]):
                raise TypeError(f"bad type for {name}: {value!r}")
        if changes.get("fault", "none") not in FAULTS:
            raise ValueError(f"unknown fault {changes['fault']!r}; known: {sorted(FAULTS)}")
        if changes.get("discovery_fault", "none") not in DISCOVERY_FAULTS:
            known = sorted(DISCOVERY_FAULTS)
            raise ValueError(f"unknown discovery_fault {changes['discovery_fault']!r}; known: {known}")
        if (changes.get("fault_count") or 0) < 0:
            raise ValueError("fault_count must be >= 0")
        changes = dict(changes)
        if "expires_in" in changes and changes["expires_in"] is None:
            changes["expires_in"] = ExpiresIn.OMIT
        # A newly set fault lasts forever unless the same call limits it.
        if "fault" in changes:
            changes.setdefault("fault_count", None)
        return dataclasses.replace(self, **changes)

    def as_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if self.expires_in is ExpiresIn.DEFAULT:
            del data["expires_in"]
        elif self.expires_in is ExpiresIn.OMIT:
            data["expires_in"] = None
        return data


class State:
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.config = Config()
        self.token_requests = 0
        self.discovery_requests = 0
        self.jwks_requests = 0
        self.elsewhere_requests = 0
        self.requests: deque[dict[str, Any]] = deque(maxlen=1000)
        self.issued: dict[tuple[str, str, str], tuple[str, float, str]] = {}  # → (token, expiry, scope)
        # The secrets each client may authenticate with: /_control/clients changes them (rotation).
        self.clients: dict[str, tuple[str, ...]] = {client: (secret,) for client, secret in CLIENTS.items()}

    def take_fault(self) -> str:
        fault, count = self.config.fault, self.config.fault_count
        if count is None:
            return fault
        if count <= 1:
            self.config = dataclasses.replace(self.config, fault="none", fault_count=None)
        else:
            self.config = dataclasses.replace(self.config, fault_count=count - 1)
        return fault if count >= 1 else "none"


def _not_gzip() -> Response:
    """A 200 that claims a gzip body but is not one: a client cannot decode it."""
    return Response(b"this is not gzip", 200, media_type="application/json", headers={"Content-Encoding": "gzip"})


def _basic_credentials(header: str) -> tuple[str, str]:
    scheme, _, param = header.strip().partition(" ")
    if scheme.lower() != "basic":
        raise ValueError("not Basic")
    decoded = base64.b64decode(param.strip(), validate=True).decode("utf-8")
    raw_id, sep, raw_secret = decoded.partition(":")
    if not sep:
        raise ValueError("no ':' in Basic credentials")
    return unquote_plus(raw_id, errors="strict"), unquote_plus(raw_secret, errors="strict")


@dataclasses.dataclass
class TokenRequest:
    form: dict[str, str]
    auth: str  # "basic" | "post" | "none"
    client_id: str | None = None
    client_secret: str | None = None
    problem: OAuthError | None = None  # first thing found wrong, reported after any fault

    @classmethod
    def read(cls, headers: Headers, body: bytes) -> TokenRequest:
        form, form_problem = _parse_form(headers.get("content-type", ""), body)
        req = cls(form, "none")
        if form_problem:
            req.problem = OAuthError(400, "invalid_request", form_problem)
        if (authorization := headers.get("authorization")) is not None:
            req.auth = "basic"
            try:
                req.client_id, req.client_secret = _basic_credentials(authorization)
            except ValueError:
                req.problem = req.problem or OAuthError(401, "invalid_client", "malformed Basic credentials")
            if "client_secret" in form:
                req.problem = req.problem or OAuthError(
                    400, "invalid_request", "more than one client authentication method"
                )
        elif "client_id" in form:
            req.auth = "post"
            req.client_id, req.client_secret = form["client_id"], form.get("client_secret")
        return req

    def authenticated_client(self, clients: dict[str, tuple[str, ...]]) -> str:
        if self.problem:
            raise self.problem
        accepted = clients.get(self.client_id or "", ())
        secret = (self.client_secret or "").encode()
        # every accepted secret compared, so the time taken does not say which one matched
        matches = [hmac.compare_digest(expected.encode(), secret) for expected in accepted]
        if self.client_id is None or self.client_secret is None or not any(matches):
            raise OAuthError(401, "invalid_client", "client authentication failed")
        return self.client_id


class AuthServer:
    def __init__(self, issuer: str, tls_url: str | None = None) -> None:
        self.issuer = issuer.rstrip("/")
        self.tls_url = tls_url  # the HTTPS listener (client certificates): mtls_endpoint_aliases
        self.keys = SigningKeys()
        self.state = State()
        self.keyless = KeylessClients()  # tests/authserver_keyless.py: private_key_jwt, tls_client_auth
        self.codes = CodeFlow(self.issuer, self.keys, self._known_client)
        self.app = Starlette(
            routes=[
                Route("/.well-known/openid-configuration", self.discovery),
                Route("/jwks", self.jwks_endpoint),
                Route("/oauth/token", self.token, methods=["POST"]),
                Route("/revoke", self.revoke, methods=["POST"]),
                *self.codes.routes(),
                Route("/elsewhere", self.elsewhere, methods=["GET", "POST"]),
                Route("/_control/config", self.control_config, methods=["POST"]),
                Route("/_control/clients", self.control_clients, methods=["POST"]),
                Route("/_control/keyless", self.control_keyless, methods=["POST"]),
                Route("/_control/stats", self.control_stats),
                Route("/_control/reset", self.control_reset, methods=["POST"]),
                Route("/_control/health", self.control_health),
            ]
        )

    def _known_client(self, client_id: str) -> bool:
        return client_id in self.state.clients or self.keyless.knows(client_id)

    def _authenticated_client(self, req: TokenRequest, request: Request) -> str:
        """The client a token or revocation request authenticated as: a keyless method, else a secret."""
        if req.problem:
            raise req.problem
        base = self.tls_url if request.url.scheme == "https" and self.tls_url else self.issuer
        client_id = self.keyless.authenticate(
            req.form,
            basic=req.auth == "basic",
            certificate=peer_certificate(request),
            endpoint=f"{base}{request.url.path}",
        )
        return client_id if client_id is not None else req.authenticated_client(self.state.clients)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> str | None:
        await self.app(scope, receive, send)
        if scope.get(_CLOSE_KEY):
            # uvicorn closes the transport without answering when the app returns non-None.
            return "fault=close: connection dropped on purpose"
        return None

    async def discovery(self, request: Request) -> Response:
        self.state.discovery_requests += 1
        document = {
            "issuer": self.issuer,
            "token_endpoint": f"{self.issuer}/oauth/token",
            "jwks_uri": f"{self.issuer}/jwks",
            "grant_types_supported": ["client_credentials"],
            "token_endpoint_auth_methods_supported": [
                "client_secret_basic",
                "client_secret_post",
                "private_key_jwt",
                *(["tls_client_auth"] if self.tls_url else []),
            ],
            "token_endpoint_auth_signing_alg_values_supported": ["RS256", "PS256", "ES256"],
        }
        document |= self.codes.discovery()
        if self.tls_url:
            document["mtls_endpoint_aliases"] = {
                "token_endpoint": f"{self.tls_url}/oauth/token",
                "revocation_endpoint": f"{self.tls_url}/revoke",
            }
        match self.state.config.discovery_fault:
            case "nested":
                # A valid JSON document with one member nested NESTED_DEPTH arrays deep.
                head = JSONResponse(document).body[:-1]
                nested = b"[" * NESTED_DEPTH + b"]" * NESTED_DEPTH
                return Response(head + b', "x": ' + nested + b"}", 200, media_type="application/json")
            case "bad_gzip":
                return _not_gzip()
        return _json(document)

    async def jwks_endpoint(self, request: Request) -> Response:
        self.state.jwks_requests += 1
        return _json(self.keys.jwks())

    async def elsewhere(self, request: Request) -> Response:
        # Answers like a token endpoint so that a client wrongly following the redirect shows up.
        self.state.elsewhere_requests += 1
        return _json({"access_token": "followed-redirect", "token_type": "Bearer"})

    async def token(self, request: Request) -> Response:
        arrival = time.time()
        state = self.state
        state.token_requests += 1
        config = state.config
        fault = state.take_fault()
        req = TokenRequest.read(request.headers, await request.body())
        certificate = peer_certificate(request)
        record: dict[str, Any] = {
            "scope": req.form.get("scope"),
            "auth": self.keyless.method(req.form, certificate) or req.auth,
            "client_cert": certificate.subject.rfc4514_string() if certificate else None,
            "url": str(request.url),
            "client_id": req.client_id,
            "form": {k: v for k, v in req.form.items() if k != "client_secret"},
            # the secret the client sent (this is the test server: rotation tests count by it)
            "secret": req.client_secret,
            "status": None,  # the answer's status, once given
            "t": arrival,
        }
        state.requests.append(record)
        if config.delay > 0:
            await asyncio.sleep(config.delay)
        if fault != "none":
            response = self._fault(fault)
        else:
            try:
                client_id = self._authenticated_client(req, request)
                if req.form.get("grant_type") in CODE_GRANT_TYPES:
                    response = await self.codes.token(client_id, req.form, self._access_settings(config))
                else:
                    response = self._issue(client_id, req.form, config)
            except OAuthError as exc:
                response = exc.response()
        record["status"] = response.status_code
        return response

    @staticmethod
    def _access_settings(config: Config) -> AccessSettings:
        expires_in: dict[str, Any] = {}
        if config.expires_in is ExpiresIn.DEFAULT:
            expires_in["expires_in"] = config.lifetime
        elif config.expires_in is not ExpiresIn.OMIT:
            expires_in["expires_in"] = config.expires_in
        jwt_lifetime = config.lifetime if config.jwt_lifetime is None else config.jwt_lifetime
        return AccessSettings(config.lifetime, jwt_lifetime, config.token_type, DEFAULT_AUDIENCE, expires_in)

    async def revoke(self, request: Request) -> Response:
        """RFC 7009 token revocation (tests/authserver_code.py); clients authenticate as at /oauth/token."""
        req = TokenRequest.read(request.headers, await request.body())
        try:
            return self.codes.revoke(self._authenticated_client(req, request), req.form)
        except OAuthError as exc:
            return exc.response()

    def _issue(self, client_id: str, form: dict[str, str], config: Config) -> Response:
        grant_type = form.get("grant_type")
        if grant_type is None:
            raise OAuthError(400, "invalid_request", "missing grant_type")
        if grant_type != "client_credentials":
            raise OAuthError(400, "unsupported_grant_type", f"unsupported: {grant_type!r}")
        requested = form.get("scope", "")
        scopes = requested.split()
        if bad := [s for s in scopes if not s.startswith("urn:")]:
            raise OAuthError(400, "invalid_scope", f"scope not allowed: {' '.join(bad)}")
        scope = requested if scopes else DEFAULT_SCOPE
        granted = config.grant_scope if config.grant_scope is not None else scope
        audience = form.get("audience", DEFAULT_AUDIENCE)

        now = time.time()
        issued_key = (client_id, scope, audience)
        if config.reissue and (earlier := self.state.issued.get(issued_key)) and earlier[1] - now >= 1:
            token, expiry, granted = earlier
            left = math.floor(expiry - now)
            return _json({"access_token": token, "token_type": config.token_type, "expires_in": left, "scope": granted})
        jwt_lifetime = config.lifetime if config.jwt_lifetime is None else config.jwt_lifetime
        claims = {
            "iss": self.issuer,
            "sub": client_id,
            "client_id": client_id,
            "aud": audience,
            "scope": granted,
            "iat": int(now),
            # Rounded up: exp is never earlier than expires_in says (the broker takes the earlier).
            "exp": math.ceil(now + jwt_lifetime),
            "jti": uuid.uuid4().hex,
        }
        header = {"alg": "RS256", "kid": self.keys.current.kid, "typ": "at+jwt"}
        body: dict[str, Any] = {
            "access_token": jwt.encode(header, claims, self.keys.current),
            "token_type": config.token_type,
        }
        if config.expires_in is ExpiresIn.DEFAULT:
            body["expires_in"] = config.lifetime
        elif config.expires_in is not ExpiresIn.OMIT:
            body["expires_in"] = config.expires_in
        body["scope"] = granted
        if config.reissue:
            self.state.issued[issued_key] = (body["access_token"], now + config.lifetime, granted)
        return _json(body)

    def _fault(self, fault: str) -> Response:
        retry_after = {"Retry-After": "1"}
        match fault:
            case "500":
                return PlainTextResponse("internal server error", 500)
            case "503":
                return PlainTextResponse("service unavailable", 503, headers=retry_after)
            case "429":
                return PlainTextResponse("too many requests", 429, headers=retry_after)
            case "bad_json":
                return Response('{"access_token": ', 200, media_type="application/json")
            case "html":
                return HTMLResponse("<html><body><h1>502 Bad Gateway</h1></body></html>")
            case "array":
                return _json([])
            case "missing_token":
                return _json({"token_type": "Bearer", "expires_in": 3600})
            case "empty_token":
                return _json({"access_token": "", "token_type": "Bearer", "expires_in": 3600})
            case "invalid_client":
                return OAuthError(401, fault, "injected fault").response()
            case "invalid_scope" | "unauthorized_client" | "invalid_grant":
                return OAuthError(400, fault, "injected fault").response()
            case "401_empty":
                return Response(b"", 401)
            case "403_empty":
                return Response(b"", 403)
            case "huge":
                return _json(
                    {
                        "access_token": "huge",
                        "token_type": "Bearer",
                        "expires_in": 3600,
                        "padding": "x" * HUGE_BODY_BYTES,
                    }
                )
            case "redirect":
                return RedirectResponse(f"{self.issuer}/elsewhere", 302)
            case "close":
                return _CloseConnection()
            case "bad_gzip":
                return _not_gzip()
        raise AssertionError(f"unhandled fault {fault!r}")

    async def control_config(self, request: Request) -> Response:
        try:
            changes = await control_body(request)
        except ValueError as exc:
            return JSONResponse({"error": str(exc)}, 400)
        if not isinstance(changes, dict):
            return JSONResponse({"error": "config must be a JSON object"}, 400)
        # The code flow's keys go to its own config (tests/authserver_code.py CodeConfig).
        code_changes = {name: value for name, value in changes.items() if CodeConfig.owns(name)}
        try:
            config = self.state.config.updated({k: v for k, v in changes.items() if k not in code_changes})
            code_config = self.codes.config.updated(code_changes)
        except (ValueError, TypeError) as exc:
            return JSONResponse({"error": str(exc)}, 400)
        self.state.config, self.codes.config = config, code_config
        return JSONResponse(self._config_json())

    def _config_json(self) -> dict[str, Any]:
        return {**self.state.config.as_json(), **self.codes.config.as_json()}

    async def control_clients(self, request: Request) -> Response:
        """{"client_id": …, "secrets": […]}: the secrets that client may authenticate with from now
        on (an empty list: none). The answer lists each client with how many secrets it has."""
        body = await request.json()
        client_id, secrets = body.get("client_id"), body.get("secrets")
        if (
            not isinstance(client_id, str)
            or not isinstance(secrets, list)
            or not all(isinstance(s, str) and s for s in secrets)
        ):
            return JSONResponse({"error": "want {client_id: str, secrets: [non-empty str, …]}"}, 400)
        self.state.clients[client_id] = tuple(secrets)
        return JSONResponse({client: len(accepted) for client, accepted in self.state.clients.items()})

    async def control_keyless(self, request: Request) -> Response:
        """Register a client's public keys (private_key_jwt) or certificate subject (tls_client_auth):
        tests/authserver_keyless.py KeylessClients.register."""
        try:
            return JSONResponse(self.keyless.register(await control_body(request)))
        except ValueError as exc:
            return JSONResponse({"error": str(exc)}, 400)

    async def control_stats(self, request: Request) -> Response:
        state = self.state
        return JSONResponse(
            {
                "token_requests": state.token_requests,
                "discovery_requests": state.discovery_requests,
                "jwks_requests": state.jwks_requests,
                "elsewhere_requests": state.elsewhere_requests,
                "assertion_replays": self.keyless.replays,
                "requests": list(state.requests),
                **self.codes.stats(),
            }
        )

    async def control_reset(self, request: Request) -> Response:
        self.state.reset()
        self.codes.reset()
        self.keyless.reset()
        return JSONResponse(self._config_json())

    async def control_health(self, request: Request) -> Response:
        return PlainTextResponse("ok")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    # an HTTPS listener beside it, for tls_client_auth (tests/authserver_keyless.py)
    parser.add_argument("--tls-port", type=int)
    parser.add_argument("--tls-cert", help="the HTTPS listener's certificate (PEM)")
    parser.add_argument("--tls-key", help="its private key (PEM)")
    parser.add_argument("--client-ca", help="the CA client certificates must chain to (PEM)")
    args = parser.parse_args(argv)
    tls_url = f"https://{args.host}:{args.tls_port}" if args.tls_port else None
    server = AuthServer(f"http://{args.host}:{args.port}", tls_url)
    if args.tls_port:
        _serve_with_tls(
            server, args.host, args.port, TlsListener(args.tls_port, args.tls_cert, args.tls_key, args.client_ca)
        )
        return
    uvicorn.run(
        server,
        host=args.host,
        port=args.port,
        log_level="warning",
        access_log=False,
        lifespan="off",
        timeout_graceful_shutdown=1,
    )


if __name__ == "__main__":
    main()
