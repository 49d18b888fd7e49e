"""A caller's, an admin's and a caller issuer's fields (spec §3, §6.3, §6.6): read and checked, once."""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from typing import Any

from broker.reader import Reader, check_url, scope_list, to_float, to_int, to_str
from broker.vault.models import (
    CALLER_JWT_ALGORITHMS,
    MAX_RATE_LIMIT_BURST,
    MAX_RATE_LIMIT_PER_SECOND,
    MIN_RATE_LIMIT_PER_SECOND,
    AdminSettings,
    CallerIssuerSettings,
    CallerSettings,
    JWTSubject,
    RateLimit,
)

__all__ = ["read_admin", "read_caller", "read_caller_issuer"]

_SHA256_HEX = frozenset("0123456789abcdef")
_MAX_SUBJECT = 1024


def _key_digest(r: Reader, t: Mapping[str, Any], key: str, command: str) -> str:
    digest = r.value(t, "key_sha256", f"{key}.key_sha256", to_str, "", "a string").lower()
    if len(digest) != 64 or not set(digest) <= _SHA256_HEX:
        r.problem(f"{key}.key_sha256", f"must be 64 hex characters ({command} prints it)")
    return digest


# Its discovery and key set say who a caller is: read over plain HTTP, anyone on the path could
# swap the keys and mint caller identities.
_KEYS_IN_CLEAR = "its key set says who a caller is, and anyone on the way could replace it"


def read_caller_issuer(r: Reader, name: str, t: Mapping[str, Any]) -> CallerIssuerSettings:
    key = f"caller_issuers.{name}"
    r.unknown(t, {"issuer", "jwks_uri", "audience", "algorithms"}, key)
    issuer = r.value(t, "issuer", f"{key}.issuer", to_str, "", "a URL string")
    if not issuer:
        r.problem(f"{key}.issuer", "is required (the `iss` of its tokens)")
    else:
        check_url(r, f"{key}.issuer", issuer, https=_KEYS_IN_CLEAR)
    jwks_uri = r.value(t, "jwks_uri", f"{key}.jwks_uri", to_str, None, "a URL string")
    if jwks_uri is not None:
        check_url(r, f"{key}.jwks_uri", jwks_uri, https=_KEYS_IN_CLEAR)
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
