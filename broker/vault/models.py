"""Credentials, callers, admins and caller issuers: the entries of the credential vault.

What an entry is. How one is read and checked from its table is in broker/vault/credential_fields.py
(credentials), broker/vault/caller_fields.py (callers, admins, caller issuers) and
broker/vault/tables.py (a whole set of tables): one check of each field, used by the config file
loader and by the admin API alike (spec §2, §3.6).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from broker.client_cert import ClientCertificate
from broker.client_key import ClientKey
from broker.secret import Secret
from broker.vault.keyless import KEYLESS_METHODS

__all__ = [
    "AUTH_METHODS",
    "CALLER_JWT_ALGORITHMS",
    "MAX_RATE_LIMIT_BURST",
    "MAX_RATE_LIMIT_PER_SECOND",
    "MIN_RATE_LIMIT_PER_SECOND",
    "NAME",
    "SECRET_METHODS",
    "AdminSettings",
    "CallerIssuerSettings",
    "CallerSettings",
    "CredentialSettings",
    "Entries",
    "JWTSubject",
    "RateLimit",
]

SECRET_METHODS = ("client_secret_basic", "client_secret_post")
AUTH_METHODS = (*SECRET_METHODS, *KEYLESS_METHODS)
NAME = re.compile(r"[A-Za-z0-9._\-]{1,64}")  # credential, caller, admin names: URL path segments, Redis hash tags
MIN_RATE_LIMIT_PER_SECOND = 0.001  # one request per 1000 s; slower is no rate limit but a quota
MAX_RATE_LIMIT_PER_SECOND = 1_000_000
MAX_RATE_LIMIT_BURST = 1_000_000
# Asymmetric signatures only (spec §6.3): with `none` or HS*, an issuer's public key could act as
# an HMAC secret, or no key at all would be needed.
CALLER_JWT_ALGORITHMS = (
    "RS256",
    "RS384",
    "RS512",
    "PS256",
    "PS384",
    "PS512",
    "ES256",
    "ES384",
    "ES512",
    "EdDSA",
    "Ed25519",
)


@dataclass(frozen=True)
class CredentialSettings:
    name: str
    client_id: str
    # `client_secret`, or `client_secrets` in the order to try them (spec §6.5); none for the
    # keyless methods. Not part of the shape: rotating a secret keeps the cached tokens.
    client_secrets: tuple[Secret, ...]
    token_url: str | None = None
    issuer: str | None = None
    auth_method: str = "client_secret_basic"
    scopes: tuple[str, ...] = ()
    default_scopes: tuple[str, ...] = ()
    audience: str | None = None
    resource: str | None = None
    extra_params: Mapping[str, str] = field(default_factory=dict)
    grant: str = "client_credentials"  # or "authorization_code": users log in (spec §5)
    return_to_allow: tuple[str, ...] = ()  # URL prefixes a login may send the browser back to
    rotation_grace_seconds: float = 0.0  # a refresh whose answer was lost is retried only this long
    # The keyless methods' key and certificate (spec §6.7). Not part of the shape either: rotating
    # a key or certificate file keeps the cached tokens.
    private_key: ClientKey | None = None  # private_key_jwt
    tls_client: ClientCertificate | None = None  # tls_client_auth
    # A fingerprint of every field that shapes a token: part of every Redis key of the credential,
    # so a changed credential (or another deployment's) never serves the old one's tokens.
    shape: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        fields = [
            self.client_id,
            self.token_url,
            self.issuer,
            self.auth_method,
            self.audience,
            self.resource,
            sorted(self.extra_params.items()),
            self.grant,
        ]
        digest = hashlib.sha256(json.dumps(fields).encode()).hexdigest()[:16]
        object.__setattr__(self, "shape", digest)

    @property
    def client_secret(self) -> Secret:
        """The first secret: the one to use unless the authorization server refuses it."""
        return self.client_secrets[0]


@dataclass(frozen=True, slots=True)
class RateLimit:
    """A caller's token requests across the fleet (spec §6.6): `per_second` on average, up to
    `burst` at once (broker/ratelimit.py)."""

    per_second: float
    burst: int


@dataclass(frozen=True)
class JWTSubject:
    """A `sub` a caller is known by, from the caller issuer named (None: from any of them)."""

    subject: str
    issuer: str | None = None


@dataclass(frozen=True)
class CallerSettings:
    name: str
    key_sha256: str  # lowercase hex, "" for a caller known by its JWTs only; the key is never stored
    grants: Mapping[str, frozenset[str]] = field(default_factory=dict)
    # authorization_code credentials: whose users' tokens this caller may read (spec §5.1)
    subjects: Mapping[str, str] = field(default_factory=dict)  # credential → "own" | "any"
    jwt_subjects: tuple[JWTSubject, ...] = ()  # spec §6.3: the `sub`s of the caller's own JWTs

    def may_read_subject(self, credential: str, owners: frozenset[str]) -> bool:
        """ "own": subjects who logged in through this caller; "any": every subject of it."""
        return self.subjects.get(credential, "own") == "any" or self.name in owners

    rate_limit: RateLimit | None = None  # None: unlimited


@dataclass(frozen=True)
class CallerIssuerSettings:
    """A trusted issuer of caller JWTs (spec §6.3), e.g. a Kubernetes cluster's service accounts."""

    name: str
    issuer: str  # the `iss` its tokens carry, exactly
    audience: str  # tokens must name it in `aud`
    jwks_uri: str | None = None  # None: from the issuer's discovery document
    algorithms: tuple[str, ...] = CALLER_JWT_ALGORITHMS


@dataclass(frozen=True)
class AdminSettings:
    name: str
    key_sha256: str  # lowercase hex; the key itself is never stored


@dataclass(frozen=True)
class Entries:
    credentials: Mapping[str, CredentialSettings]
    callers: Mapping[str, CallerSettings]
    admins: Mapping[str, AdminSettings]
    caller_issuers: Mapping[str, CallerIssuerSettings] = field(default_factory=dict)
