"""Keyless client authentication at the test authorization server, really verified.

- `private_key_jwt` (RFC 7523 §2.2, §3; OIDC Core §9): the client assertion's signature against
  the public keys registered for the client (a JWK Set), an algorithm allow-list (RS256, PS256,
  ES256: never `none` or HS*), `iss` = `sub` = the client id (and the form's `client_id`, when
  given), `aud` = the URL of the endpoint the request came to, `exp` in the future and at most
  60 s after `iat`, `iat` not in the future, a `jti` never seen before (a replay is refused).
- `tls_client_auth` (RFC 8705 §2.1): the client certificate of the TLS connection, chain-checked
  by the HTTPS listener against the client CA (uvicorn, CERT_OPTIONAL), and its subject DN
  (RFC 4514) equal to the one registered for the client (`tls_client_auth_subject_dn`, §2.1.2).

Every refusal is 401 `invalid_client` with a description saying which check failed (this is the
test server: a real one says less). Registered through `/_control/keyless` (tests/support.py
AuthServerProcess.register_keyless). Imports nothing from tests/authserver.py (see
tests/authserver_http.py for why).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import uvicorn
from cryptography import x509
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import ECKey, KeySet, RSAKey
from starlette.requests import Request
from uvicorn.protocols.http.h11_impl import H11Protocol

from tests.authserver_http import OAuthError

ASSERTION_TYPE: Final = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
ALGORITHMS: Final = ("RS256", "PS256", "ES256")
MAX_ASSERTION_LIFETIME: Final = 60
LEEWAY: Final = 5  # seconds of clock difference tolerated for iat and exp
PEER_CERT_KEY: Final = "authserver.peer_certificate"  # in the request's state: DER bytes, or None
KEYLESS_METHODS: Final = ("private_key_jwt", "tls_client_auth")


class PeerCertificateProtocol(H11Protocol):
    """uvicorn's h11 protocol, putting the TLS client certificate into every request's state."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        ssl_object = transport.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        self.app_state = {**self.app_state, PEER_CERT_KEY: der}  # this connection's copy


def peer_certificate(request: Request) -> x509.Certificate | None:
    der = request.scope.get("state", {}).get(PEER_CERT_KEY)
    return x509.load_der_x509_certificate(der) if der else None


def _invalid_client(description: str) -> OAuthError:
    return OAuthError(401, "invalid_client", description)


def _unverified(part: str) -> dict[str, Any]:
    try:
        value = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    except (ValueError, binascii.Error) as exc:
        raise _invalid_client("the client assertion is not a JWT") from exc
    if not isinstance(value, dict):
        raise _invalid_client("the client assertion is not a JWT")
    return value


class KeylessClients:
    """Who may authenticate how, and the assertions already used."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.jwks: dict[str, KeySet] = {}
        self.subjects: dict[str, str] = {}
        self.seen_jti: dict[str, float] = {}  # jti → exp: forgotten once the assertion expired
        self.replays = 0

    def knows(self, client_id: str) -> bool:
        return client_id in self.jwks or client_id in self.subjects

    def register(self, body: Any) -> dict[str, Any]:
        """{"client_id": …, "jwks": {"keys": [public JWKs]} | null, "tls_client_auth_subject_dn":
        "CN=…" | null}: replaces what was registered for the client (null: that method off)."""
        if not isinstance(body, dict) or not isinstance(body.get("client_id"), str):
            raise ValueError(  # noqa: TRY004 - the control endpoint answers every ValueError with a 400
                "want {client_id: str, jwks?: {keys: [...]}|null, tls_client_auth_subject_dn?: str|null}"
            )
        client_id = body["client_id"]
        if "jwks" in body:
            jwks = body["jwks"]
            if jwks is None:
                self.jwks.pop(client_id, None)
            else:
                keys = [_public_key(k) for k in jwks.get("keys", [])] if isinstance(jwks, dict) else None
                if not keys:
                    raise ValueError("jwks must be {keys: [one or more public RSA or EC JWKs]}")
                self.jwks[client_id] = KeySet(keys)
        if "tls_client_auth_subject_dn" in body:
            subject = body["tls_client_auth_subject_dn"]
            if subject is None:
                self.subjects.pop(client_id, None)
            elif isinstance(subject, str) and subject:
                self.subjects[client_id] = subject
            else:
                raise ValueError("tls_client_auth_subject_dn must be a non-empty string or null")
        return {
            "jwks": {c: len(ks.keys) for c, ks in self.jwks.items()},
            "tls_client_auth_subject_dn": dict(self.subjects),
        }

    @staticmethod
    def method(form: Mapping[str, str], certificate: x509.Certificate | None) -> str | None:
        """The keyless method a token request uses, if any (for the request log)."""
        if "client_assertion" in form or "client_assertion_type" in form:
            return "private_key_jwt"
        if certificate is not None and "client_secret" not in form:
            return "tls_client_auth"
        return None

    def authenticate(
        self, form: Mapping[str, str], *, basic: bool, certificate: x509.Certificate | None, endpoint: str
    ) -> str | None:
        """The client a keyless method authenticated, None when the request uses none (a secret
        method then decides), OAuthError when it fails."""
        if "client_assertion" in form or "client_assertion_type" in form:
            if basic or "client_secret" in form:
                raise OAuthError(400, "invalid_request", "more than one client authentication method")
            return self._assertion(form, endpoint)
        client_id = form.get("client_id")
        if basic or "client_secret" in form or client_id not in self.subjects:
            return None
        return self._certificate(client_id, certificate)

    def _assertion(self, form: Mapping[str, str], endpoint: str) -> str:
        if form.get("client_assertion_type") != ASSERTION_TYPE:
            raise _invalid_client(f"client_assertion_type must be {ASSERTION_TYPE}")
        assertion = form.get("client_assertion", "")
        parts = assertion.split(".")
        if len(parts) != 3:
            raise _invalid_client("the client assertion is not a JWS compact serialization")
        header, unverified = _unverified(parts[0]), _unverified(parts[1])
        alg = header.get("alg")
        if alg not in ALGORITHMS:
            raise _invalid_client(f"assertion algorithm {alg!r} is not allowed (allowed: {', '.join(ALGORITHMS)})")
        client_id = unverified.get("iss")
        keys = self.jwks.get(client_id) if isinstance(client_id, str) else None
        if keys is None or not isinstance(client_id, str):
            raise _invalid_client(f"no keys registered for the assertion's iss {client_id!r}")
        claims = _verified(assertion, keys, alg, header.get("kid"))
        self._check_claims(claims, client_id, form, endpoint)
        now = time.time()
        self.seen_jti = {jti: exp for jti, exp in self.seen_jti.items() if exp + LEEWAY > now}
        jti = claims["jti"]
        if jti in self.seen_jti:
            self.replays += 1
            raise _invalid_client(f"the client assertion was replayed (jti {jti!r} already used)")
        self.seen_jti[jti] = float(claims["exp"])
        return client_id

    @staticmethod
    def _check_claims(claims: dict[str, Any], client_id: str, form: Mapping[str, str], endpoint: str) -> None:
        if claims.get("sub") != client_id:
            raise _invalid_client("the assertion's sub must be its iss (the client id)")
        if "client_id" in form and form["client_id"] != client_id:
            raise _invalid_client("the form's client_id is not the assertion's iss")
        aud = claims.get("aud")
        audiences = aud if isinstance(aud, list) else [aud]
        if endpoint not in audiences:
            raise _invalid_client(f"the assertion's aud {aud!r} is not this endpoint ({endpoint})")
        jti, iat, exp = claims.get("jti"), claims.get("iat"), claims.get("exp")
        if not isinstance(jti, str) or not jti:
            raise _invalid_client("the assertion has no jti")
        if not _number(iat) or not _number(exp):
            raise _invalid_client("the assertion needs numeric iat and exp")
        now = time.time()
        if exp <= now - LEEWAY:
            raise _invalid_client("the client assertion has expired")
        if iat > now + LEEWAY:
            raise _invalid_client("the client assertion was issued in the future")
        if exp - iat > MAX_ASSERTION_LIFETIME:
            raise _invalid_client(f"the client assertion lives longer than {MAX_ASSERTION_LIFETIME} s")

    def _certificate(self, client_id: str, certificate: x509.Certificate | None) -> str:
        if certificate is None:
            raise _invalid_client("tls_client_auth: no client certificate on the connection")
        subject = certificate.subject.rfc4514_string()
        if subject != self.subjects[client_id]:
            raise _invalid_client(f"tls_client_auth: the certificate's subject {subject!r} is not the registered one")
        return client_id


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _public_key(jwk: Any) -> RSAKey | ECKey:
    if not isinstance(jwk, dict) or jwk.get("kty") not in ("RSA", "EC") or "d" in jwk:
        raise ValueError("each key must be a public RSA or EC JWK")
    return RSAKey.import_key(jwk) if jwk["kty"] == "RSA" else ECKey.import_key(jwk)


def _verified(assertion: str, keys: KeySet, alg: str, kid: Any) -> dict[str, Any]:
    """The assertion's claims once its signature verifies with one of the client's keys."""
    candidates = [k for k in keys.keys if kid is None or k.kid == kid]
    for key in candidates:
        try:
            claims: dict[str, Any] = jwt.decode(assertion, key, algorithms=[alg]).claims
        except (JoseError, ValueError, TypeError):
            continue
        return claims
    raise _invalid_client("the client assertion's signature does not verify with the registered keys")


@dataclass(frozen=True)
class TlsListener:
    """The HTTPS listener: its certificate and key, and the CA client certificates must chain to."""

    port: int
    cert_file: str
    key_file: str
    client_ca_file: str


def serve(app: Any, host: str, port: int, tls: TlsListener) -> None:
    """Serve `app` over HTTP on `port` and HTTPS (client certificates optional) on `tls.port`."""
    common: dict[str, Any] = {
        "host": host,
        "log_level": "warning",
        "access_log": False,
        "lifespan": "off",
        "timeout_graceful_shutdown": 1,
    }
    plain = uvicorn.Config(app, port=port, **common)
    secure = uvicorn.Config(
        app,
        port=tls.port,
        ssl_certfile=tls.cert_file,
        ssl_keyfile=tls.key_file,
        ssl_ca_certs=tls.client_ca_file,
        ssl_cert_reqs=ssl.CERT_OPTIONAL,
        http=PeerCertificateProtocol,
        **common,
    )

    async def both() -> None:
        await asyncio.gather(uvicorn.Server(plain).serve(), uvicorn.Server(secure).serve())

    asyncio.run(both())
