"""A small demo authorization server for `token-broker dev`: client credentials grant,
RS256 JWT access tokens, a JWKS and an OIDC discovery document. Not for production."""

from __future__ import annotations

import base64
import hmac
import secrets
import time
import uuid
from urllib.parse import parse_qsl, unquote_plus

from joserfc import jwt
from joserfc.jwk import KeySet, RSAKey
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

__all__ = ["DEMO_CLIENT_ID", "DEMO_SCOPES", "create_demo_authserver"]

DEMO_CLIENT_ID = "demo-client"
DEMO_SCOPES = ("urn:demo:claims.read", "urn:demo:claims.write")


def _client_from(request: Request, form: dict[str, str]) -> tuple[str, str] | None:
    header = request.headers.get("authorization", "")
    if header.lower().startswith("basic "):
        try:
            raw = base64.b64decode(header[6:], validate=True).decode()
        except ValueError:
            return None
        client_id, sep, secret = raw.partition(":")
        return (unquote_plus(client_id), unquote_plus(secret)) if sep else None
    if "client_id" in form and "client_secret" in form:
        return form["client_id"], form["client_secret"]
    return None


def create_demo_authserver(issuer: str, client_secret: str, lifetime: int = 3600) -> Starlette:
    key = RSAKey.generate_key(2048, parameters={"kid": secrets.token_hex(4), "use": "sig", "alg": "RS256"})

    def oauth_error(code: str, description: str, status: int = 400) -> JSONResponse:
        return JSONResponse({"error": code, "error_description": description}, status_code=status)

    async def token(request: Request) -> JSONResponse:
        form = dict(parse_qsl((await request.body()).decode("utf-8", "replace")))
        client = _client_from(request, form)
        if client is None or client[0] != DEMO_CLIENT_ID or not hmac.compare_digest(client[1], client_secret):
            return oauth_error("invalid_client", "Client authentication failed.", 401)
        if form.get("grant_type") != "client_credentials":
            return oauth_error("unsupported_grant_type", "Only client_credentials is supported.")
        requested = form.get("scope", "").split() or [DEMO_SCOPES[0]]
        if any(s not in DEMO_SCOPES for s in requested):
            return oauth_error("invalid_scope", "A requested scope is not known.")
        now = int(time.time())
        claims = {
            "iss": issuer,
            "sub": DEMO_CLIENT_ID,
            "aud": form.get("audience", "demo-api"),
            "scope": " ".join(requested),
            "iat": now,
            "exp": now + lifetime,
            "jti": uuid.uuid4().hex,
        }
        access_token = jwt.encode({"alg": "RS256", "kid": key.kid}, claims, key)
        return JSONResponse(
            {
                "access_token": access_token,
                "token_type": "Bearer",
                "expires_in": lifetime,
                "scope": " ".join(requested),
            },
            headers={"Cache-Control": "no-store"},
        )

    async def discovery(request: Request) -> JSONResponse:
        return JSONResponse(
            {
                "issuer": issuer,
                "token_endpoint": f"{issuer}/oauth/token",
                "jwks_uri": f"{issuer}/jwks",
                "grant_types_supported": ["client_credentials"],
                "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
            }
        )

    async def jwks(request: Request) -> JSONResponse:
        return JSONResponse(KeySet([key]).as_dict(private=False))

    return Starlette(
        routes=[
            Route("/oauth/token", token, methods=["POST"]),
            Route("/.well-known/openid-configuration", discovery),
            Route("/jwks", jwks),
        ]
    )
