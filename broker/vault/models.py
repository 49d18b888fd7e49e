"""Credentials, callers and admins: the entries of the credential vault, and their validation.

One definition of each field and one check of it, used by the config file loader and by the
admin API alike (spec §2, §3.6): a problem reads the same wherever the entry came from.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from broker.client_cert import ClientCertificate
from broker.client_key import ClientKey
from broker.reader import Reader, check_url, scope_list, to_float, to_int, to_str
from broker.secret import Secret
from broker.vault.keyless import KEYLESS_FIELDS, KEYLESS_METHODS, read_keyless

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
    "read_admin",
    "read_caller",
    "read_caller_issuer",
    "read_credential",
    "read_entries",
]

SECRET_METHODS = ("client_secret_basic", "client_secret_post")
AUTH_METHODS = (*SECRET_METHODS, *KEYLESS_METHODS)
_SHA256_HEX = frozenset("0123456789abcdef")
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
_MAX_SUBJECT = 1024


MAX_CLIENT_SECRETS = 8


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


def _key_digest(r: Reader, t: Mapping[str, Any], key: str, command: str) -> str:
    digest = r.value(t, "key_sha256", f"{key}.key_sha256", to_str, "", "a string").lower()
    if len(digest) != 64 or not set(digest) <= _SHA256_HEX:
        r.problem(f"{key}.key_sha256", f"must be 64 hex characters ({command} prints it)")
    return digest


def read_caller_issuer(r: Reader, name: str, t: Mapping[str, Any]) -> CallerIssuerSettings:
    key = f"caller_issuers.{name}"
    r.unknown(t, {"issuer", "jwks_uri", "audience", "algorithms"}, key)
    issuer = r.value(t, "issuer", f"{key}.issuer", to_str, "", "a URL string")
    if not issuer:
        r.problem(f"{key}.issuer", "is required (the `iss` of its tokens)")
    else:
        check_url(r, f"{key}.issuer", issuer)
    jwks_uri = r.value(t, "jwks_uri", f"{key}.jwks_uri", to_str, None, "a URL string")
    if jwks_uri is not None:
        check_url(r, f"{key}.jwks_uri", jwks_uri)
    audience = r.value(t, "audience", f"{key}.audience", to_str, "", "a string")
    if not audience:
        r.problem(f"{key}.audience", "is required: tokens meant for another audience are refused")
    algorithms = CALLER_JWT_ALGORITHMS
    if "algorithms" in t:
        raw = t["algorithms"]
        if not isinstance(raw, list) or not raw or not all(isinstance(a, str) for a in raw):
            r.problem(f"{key}.algorithms", "must be a non-empty list of strings")
        elif refused := [a for a in raw if a not in CALLER_JWT_ALGORITHMS]:
            r.problem(
                f"{key}.algorithms",
                f"{', '.join(map(repr, refused))} not allowed: asymmetric only, some of"
                f" {', '.join(CALLER_JWT_ALGORITHMS)}",
            )
        else:
            algorithms = tuple(dict.fromkeys(raw))
    return CallerIssuerSettings(name, issuer, audience, jwks_uri, algorithms)


def _jwt_subjects(r: Reader, t: Mapping[str, Any], key: str, issuers: Collection[str]) -> tuple[JWTSubject, ...]:
    raw = t.get("jwt_subjects", [])
    if not isinstance(raw, list):
        r.problem(key, 'must be a list of subjects: "sub" or { issuer = "NAME", subject = "sub" }')
        return ()
    found: list[JWTSubject] = []
    for i, item in enumerate(raw):
        item_key = f"{key}[{i}]"
        if isinstance(item, str):
            subject, issuer = item, None
        elif isinstance(item, dict) and set(item) == {"issuer", "subject"}:
            subject, issuer = item["subject"], item["issuer"]
            if not isinstance(issuer, str) or issuer not in issuers:
                r.problem(item_key, f"unknown caller issuer {issuer!r} (a [caller_issuers.NAME] table)")
                continue
        else:
            r.problem(item_key, 'must be "sub" or { issuer = "NAME", subject = "sub" }')
            continue
        if not isinstance(subject, str) or not 0 < len(subject) <= _MAX_SUBJECT:
            r.problem(item_key, f"a subject is a string of 1-{_MAX_SUBJECT} characters")
            continue
        found.append(JWTSubject(subject, issuer))
    return tuple(dict.fromkeys(found))


_CREDENTIAL_KEYS = {
    "issuer",
    "token_url",
    "client_id",
    "client_secret",
    "client_secrets",
    "auth_method",
    "scopes",
    "default_scopes",
    "audience",
    "resource",
    "extra_params",
    "grant",
    "return_to_allow",
    "rotation_grace_seconds",
    *KEYLESS_FIELDS,
}
GRANTS = ("client_credentials", "authorization_code")
_RESERVED_FORM_FIELDS = {
    "grant_type",
    "scope",
    "client_id",
    "client_secret",
    "client_assertion",
    "client_assertion_type",
    "audience",
    "resource",
}


def read_credential(r: Reader, name: str, t: Mapping[str, Any]) -> CredentialSettings | None:
    key = f"credentials.{name}"
    r.unknown(t, _CREDENTIAL_KEYS, key)
    token_url = r.value(t, "token_url", f"{key}.token_url", to_str, None, "a URL string")
    issuer = r.value(t, "issuer", f"{key}.issuer", to_str, None, "a URL string")
    if (token_url is None) == (issuer is None):
        r.problem(key, "needs exactly one of issuer (OIDC discovery) or token_url")
    for k, url in (("token_url", token_url), ("issuer", issuer)):
        if url is not None:
            check_url(r, f"{key}.{k}", url)
    client_id = r.value(t, "client_id", f"{key}.client_id", to_str, "", "a string")
    if not client_id:
        r.problem(f"{key}.client_id", "is required")
    auth_method = r.value(t, "auth_method", f"{key}.auth_method", to_str, "client_secret_basic", "a string")
    if auth_method not in AUTH_METHODS:
        r.problem(f"{key}.auth_method", f"must be one of {', '.join(AUTH_METHODS)}, got {auth_method!r}")
    secrets: tuple[Secret, ...] = ()
    if auth_method in KEYLESS_METHODS:
        what = "a private key" if auth_method == "private_key_jwt" else "a TLS client certificate"
        for field_name in ("client_secret", "client_secrets"):
            if field_name in t:
                r.problem(f"{key}.{field_name}", f'is not used with auth_method = "{auth_method}": it uses {what}')
    else:
        secrets = _client_secrets(r, t, key)
    keyless = read_keyless(r, key, t, auth_method, token_url)
    allowed = scope_list(r, t, "scopes", f"{key}.scopes")
    defaults = scope_list(r, t, "default_scopes", f"{key}.default_scopes")
    for scope in defaults:
        if scope not in allowed:
            r.problem(f"{key}.default_scopes", f"scope {scope!r} is not in {key}.scopes")
    extra = r.table(t, "extra_params", f"{key}.extra_params")
    for field_name, v in extra.items():
        if not isinstance(v, str):
            r.problem(f"{key}.extra_params.{field_name}", "must be a string")
        elif field_name in _RESERVED_FORM_FIELDS:
            r.problem(f"{key}.extra_params.{field_name}", "is set by the broker itself")
    grant, return_to_allow, grace = _user_login(r, key, t, issuer)
    if not (secrets or auth_method in KEYLESS_METHODS) or not keyless.usable:
        return None
    return CredentialSettings(
        name=name,
        client_id=client_id,
        client_secrets=secrets,
        token_url=token_url,
        issuer=issuer.rstrip("/") if issuer else None,
        auth_method=auth_method,
        scopes=allowed,
        default_scopes=defaults,
        audience=r.value(t, "audience", f"{key}.audience", to_str, None, "a string"),
        resource=r.value(t, "resource", f"{key}.resource", to_str, None, "a string"),
        extra_params={k: v for k, v in extra.items() if isinstance(v, str)},
        grant=grant,
        return_to_allow=return_to_allow,
        rotation_grace_seconds=grace,
        private_key=keyless.private_key,
        tls_client=keyless.certificate,
    )


def _user_login(r: Reader, key: str, t: Mapping[str, Any], issuer: str | None) -> tuple[str, tuple[str, ...], float]:
    """The authorization code grant's fields (spec §5.1): grant, return_to_allow, rotation grace."""
    grant = r.value(t, "grant", f"{key}.grant", to_str, "client_credentials", "a string")
    if grant not in GRANTS:
        r.problem(f"{key}.grant", f"must be one of {', '.join(GRANTS)}, got {grant!r}")
    code = grant == "authorization_code"
    if code and issuer is None:
        r.problem(f"{key}.issuer", 'is required for grant = "authorization_code" (OIDC discovery, id_token issuer)')
    none: list[str] = []
    allow = r.value(t, "return_to_allow", f"{key}.return_to_allow", _string_list, none, "a list of URL prefixes")
    for prefix in allow:
        check_url(r, f"{key}.return_to_allow", prefix)
    grace = r.value(t, "rotation_grace_seconds", f"{key}.rotation_grace_seconds", to_float, 0.0, "a number")
    if not 0 <= grace <= 3600:
        r.problem(f"{key}.rotation_grace_seconds", f"must be between 0 and 3600, got {grace}")
    for field_name in ("return_to_allow", "rotation_grace_seconds"):
        if field_name in t and not code:
            r.problem(f"{key}.{field_name}", 'is only used with grant = "authorization_code"')
    return grant, tuple(allow), grace


def _string_list(value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise TypeError(value)
    return value


def _client_secrets(r: Reader, t: Mapping[str, Any], key: str) -> tuple[Secret, ...]:
    """`client_secret`, or the `client_secrets` list (rotation): () after a problem."""
    if "client_secrets" not in t:
        secret = r.secret(t, "client_secret", f"{key}.client_secret")
        return (secret,) if secret is not None else ()
    if "client_secret" in t:
        r.problem(key, "needs exactly one of client_secret or client_secrets (a list, while rotating)")
        return ()
    refs, lkey = t["client_secrets"], f"{key}.client_secrets"
    if not isinstance(refs, list):
        r.problem(lkey, 'must be a list of secrets: [{ env = "NEW" }, { env = "OLD" }]')
        return ()
    if not refs or len(refs) > MAX_CLIENT_SECRETS:
        r.problem(lkey, f"must hold 1 to {MAX_CLIENT_SECRETS} secrets, got {len(refs)}")
        return ()
    found: list[tuple[int, Secret]] = []
    for i, ref in enumerate(refs):
        item = f"{lkey}[{i}]"
        secret = r.secret({"s": ref}, "s", item) if ref is not None else None
        if ref is None:
            r.problem(item, 'must be { env = "NAME" }, { file = "/path" } or a string')
        if secret is None:
            continue
        same = next((j for j, earlier in found if earlier == secret), None)
        if same is not None:
            r.problem(item, f"is the same secret as client_secrets[{same}]")
        found.append((i, secret))
    return tuple(secret for _, secret in found) if len(found) == len(refs) else ()


def read_caller(
    r: Reader,
    name: str,
    t: Mapping[str, Any],
    credentials: Mapping[str, Mapping[str, Any]],
    issuers: Collection[str] = (),
) -> CallerSettings:
    key = f"callers.{name}"
    r.unknown(t, {"key_sha256", "grants", "jwt_subjects", "rate_limit_per_second", "rate_limit_burst"}, key)
    jwt_subjects = _jwt_subjects(r, t, f"{key}.jwt_subjects", issuers)
    digest = ""
    if "key_sha256" in t:
        digest = _key_digest(r, t, key, "token-broker caller-key")
    elif "jwt_subjects" not in t:
        r.problem(key, "needs key_sha256 (token-broker caller-key prints it), jwt_subjects, or both")
    elif t["jwt_subjects"] == []:
        r.problem(f"{key}.jwt_subjects", "must name at least one subject when there is no key_sha256")
    grants: dict[str, frozenset[str]] = {}
    subjects: dict[str, str] = {}
    for credential, grant in r.table(t, "grants", f"{key}.grants").items():
        gkey = f"{key}.grants.{credential}"
        if credential not in credentials:
            r.problem(gkey, f"unknown credential {credential!r}")
            continue
        scopes = grant
        if isinstance(grant, Mapping):  # { scopes = [...], subjects = "own" | "any" }
            r.unknown(grant, {"scopes", "subjects"}, gkey)
            scopes = grant.get("scopes", [])
            whose = r.value(grant, "subjects", f"{gkey}.subjects", to_str, "own", "a string")
            if whose not in ("own", "any"):
                r.problem(f"{gkey}.subjects", f'must be "own" or "any", got {whose!r}')
            elif credentials[credential].get("grant", "client_credentials") != "authorization_code":
                r.problem(
                    f"{gkey}.subjects", f"credentials.{credential} has no users (grant is not authorization_code)"
                )
            subjects[credential] = whose
        granted = scope_list(r, {"s": scopes}, "s", gkey)
        cred = credentials[credential]
        if isinstance(cred, Mapping):
            allowed = set(scope_list(Reader(r.env), cred, "scopes", ""))
            for scope in granted:
                if scope not in allowed:
                    r.problem(gkey, f"scope {scope!r} is not allowed by credentials.{credential}.scopes")
        grants[credential] = frozenset(granted)
    return CallerSettings(
        name=name,
        key_sha256=digest,
        grants=grants,
        subjects=subjects,
        rate_limit=_rate_limit(r, t, key),
        jwt_subjects=jwt_subjects,
    )


def _rate_limit(r: Reader, t: Mapping[str, Any], key: str) -> RateLimit | None:
    """Both keys optional; a burst needs a rate; the burst defaults to one second's worth."""
    rate_range = f"{MIN_RATE_LIMIT_PER_SECOND:g} to {MAX_RATE_LIMIT_PER_SECOND}"
    per_second = r.value(
        t, "rate_limit_per_second", f"{key}.rate_limit_per_second", to_float, None, f"a number ({rate_range})"
    )
    if per_second is not None and not MIN_RATE_LIMIT_PER_SECOND <= per_second <= MAX_RATE_LIMIT_PER_SECOND:
        given = t["rate_limit_per_second"]
        r.problem(f"{key}.rate_limit_per_second", f"must be {rate_range} token requests per second, got {given!r}")
        per_second = None
    burst = r.value(t, "rate_limit_burst", f"{key}.rate_limit_burst", to_int, None, "a whole number of requests")
    if burst is not None and not 1 <= burst <= MAX_RATE_LIMIT_BURST:
        r.problem(f"{key}.rate_limit_burst", f"must be 1 to {MAX_RATE_LIMIT_BURST} requests, got {burst}")
        burst = None
    if "rate_limit_burst" in t and "rate_limit_per_second" not in t:
        r.problem(f"{key}.rate_limit_burst", "needs rate_limit_per_second: a burst alone limits nothing")
    if per_second is None:
        return None
    return RateLimit(per_second, burst if burst is not None else max(1, math.ceil(per_second)))


def read_admin(r: Reader, name: str, t: Mapping[str, Any]) -> AdminSettings:
    key = f"admins.{name}"
    r.unknown(t, {"key_sha256"}, key)
    return AdminSettings(name=name, key_sha256=_key_digest(r, t, key, "token-broker caller-key --admin"))


@dataclass(frozen=True)
class Entries:
    credentials: Mapping[str, CredentialSettings]
    callers: Mapping[str, CallerSettings]
    admins: Mapping[str, AdminSettings]
    caller_issuers: Mapping[str, CallerIssuerSettings] = field(default_factory=dict)


def read_entries(
    r: Reader,
    credentials: Mapping[str, Any],
    callers: Mapping[str, Any],
    admins: Mapping[str, Any],
    caller_issuers: Mapping[str, Any] | None = None,
    *,
    known_credentials: Mapping[str, Mapping[str, Any]] | None = None,
    known_digests: Mapping[str, str] | None = None,
    known_issuers: Mapping[str, CallerIssuerSettings] | None = None,
    known_callers: Mapping[str, CallerSettings] | None = None,
) -> Entries:
    """Read the `[credentials.*]`, `[callers.*]`, `[admins.*]` and `[caller_issuers.*]` tables.
    The known_* arguments are the config file's entries, for the admin API's: raw credential
    tables a caller's grants may also name, key hashes already in use (digest → "callers.NAME"
    or "admins.NAME"), caller issuers a subject may name, callers whose subjects are taken."""
    found_credentials: dict[str, CredentialSettings] = {}
    tables: dict[str, Mapping[str, Any]] = dict(known_credentials or {})
    for name, table in _named_tables(r, credentials, "credentials", "credential"):
        tables[name] = table
        credential = read_credential(r, name, table)
        if credential is not None:
            found_credentials[name] = credential
    found_issuers = {
        name: read_caller_issuer(r, name, table)
        for name, table in _named_tables(r, caller_issuers or {}, "caller_issuers", "caller issuer")
    }
    issuers = {**found_issuers, **(known_issuers or {})}
    _unique_issuers(r, found_issuers, known_issuers or {})
    found_callers = {
        name: read_caller(r, name, table, tables, issuers)
        for name, table in _named_tables(r, callers, "callers", "caller")
    }
    found_admins = {name: read_admin(r, name, table) for name, table in _named_tables(r, admins, "admins", "admin")}
    seen: dict[str, str] = dict(known_digests or {})
    keyed: list[tuple[str, str]] = [(f"callers.{c.name}", c.key_sha256) for c in found_callers.values()]
    keyed += [(f"admins.{a.name}", a.key_sha256) for a in found_admins.values()]
    for owner, digest in keyed:
        if digest and digest in seen:
            r.problem(f"{owner}.key_sha256", f"is the same as {seen[digest]}'s")
        seen.setdefault(digest, owner)
    _unique_subjects(r, found_callers, known_callers or {})
    return Entries(found_credentials, found_callers, found_admins, found_issuers)


def _unique_issuers(
    r: Reader, found: Mapping[str, CallerIssuerSettings], known: Mapping[str, CallerIssuerSettings]
) -> None:
    """One table per `iss`: a token names its issuer, and must find one audience and key set."""
    seen = {issuer.issuer: name for name, issuer in known.items()}
    for name, issuer in found.items():
        other = seen.setdefault(issuer.issuer, name)
        if other != name and issuer.issuer:
            r.problem(f"caller_issuers.{name}.issuer", f"is the same as caller_issuers.{other}'s")


def _unique_subjects(r: Reader, found: Mapping[str, CallerSettings], known: Mapping[str, CallerSettings]) -> None:
    """A subject (from an issuer) identifies one caller: a subject two callers claim is a problem."""
    claimed: dict[str, list[tuple[str | None, str]]] = {}
    for caller in known.values():
        for s in caller.jwt_subjects:
            claimed.setdefault(s.subject, []).append((s.issuer, caller.name))
    for caller in found.values():
        for i, s in enumerate(caller.jwt_subjects):
            owners = claimed.setdefault(s.subject, [])
            for issuer, owner in owners:
                if owner != caller.name and (issuer is None or s.issuer is None or issuer == s.issuer):
                    r.problem(f"callers.{caller.name}.jwt_subjects[{i}]", f"{s.subject!r} is also callers.{owner}'s")
                    break
            owners.append((s.issuer, caller.name))


def _named_tables(r: Reader, tables: Mapping[str, Any], section: str, what: str) -> list[tuple[str, Mapping[str, Any]]]:
    named: list[tuple[str, Mapping[str, Any]]] = []
    for name, table in tables.items():
        if not NAME.fullmatch(name):
            r.problem(f"{section}.{name}", f"a {what} name is 1-64 letters, digits, '.', '_' or '-'")
        elif not isinstance(table, dict):
            r.problem(f"{section}.{name}", "must be a table")
        else:
            named.append((name, table))
    return named
