"""Configuration: one TOML file, environment overrides, validated once at start (spec §2).

Every problem found is reported as one line naming its key; `load_settings` raises
`ConfigError` with all of them, never a traceback.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit

from broker import redis_client
from broker import scopes as scopes_mod
from broker.errors import ConfigError, InvalidRequest
from broker.secret import Secret
from broker.vault.keyring import KeyRing, KeyRingError

__all__ = [
    "AUTH_METHODS",
    "CacheSettings",
    "CallerSettings",
    "CredentialSettings",
    "RedisSettings",
    "ServerSettings",
    "Settings",
    "UpstreamSettings",
    "VaultSettings",
    "load_settings",
]

AUTH_METHODS = ("client_secret_basic", "client_secret_post")
_PLANNED_AUTH_METHODS = ("private_key_jwt", "tls_client_auth")
_SHA256_HEX = frozenset("0123456789abcdef")
_KEY_PREFIX = re.compile(r"[A-Za-z0-9._\-]{1,32}")
_NAME = re.compile(r"[A-Za-z0-9._\-]{1,64}")  # credential and caller names: URL path segments, Redis hash tags

T = TypeVar("T")


@dataclass(frozen=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 1
    public_url: str | None = None
    access_log: bool = False
    request_deadline_seconds: float = 10.0  # a caller never waits longer than this
    max_body_bytes: int = 16_384


@dataclass(frozen=True)
class RedisSettings:
    url: str | None = None  # None: start an embedded redis-server (spec §7.1); forms: broker/redis_client.py
    tls_ca_file: str | None = None  # rediss: CA bundle the server certificate must chain to (else the system's)
    tls_cert_file: str | None = None  # rediss: client certificate, for servers that require one
    tls_key_file: str | None = None  # its private key, unless tls_cert_file holds it too
    key_prefix: str = "tb"  # every key and the events channel start with it: one per deployment

    def __repr__(self) -> str:
        return (
            f"RedisSettings(url={redact_url(self.url)!r}, tls_ca_file={self.tls_ca_file!r},"
            f" tls_cert_file={self.tls_cert_file!r}, tls_key_file={self.tls_key_file!r},"
            f" key_prefix={self.key_prefix!r})"
        )


@dataclass(frozen=True)
class CacheSettings:
    skew_seconds: float = 30.0
    refresh_at: tuple[float, float] = (0.6, 0.8)
    default_expires_in: float = 300.0
    l1_max_entries: int = 10_000
    lock_ttl_seconds: float = 5.0  # shorter than the request deadline; renewed while fetching
    negative_ttl_seconds: float = 5.0  # how long an upstream refusal is remembered per (credential, scope set)
    invalidate_min_interval_seconds: float = 10.0  # a token younger than this is dropped at most once per interval


@dataclass(frozen=True)
class UpstreamSettings:
    connect_timeout_seconds: float = 3.0
    timeout_seconds: float = 5.0
    max_attempts: int = 3
    discovery_ttl_seconds: float = 3600.0
    breaker_failures: int = 5  # consecutive transient failures that open a credential's circuit
    breaker_cooldown_seconds: float = 5.0  # open this long before one probe; doubles while probes fail


@dataclass(frozen=True)
class VaultSettings:
    encryption_keys_file: str | None = None  # `kid:key,…`; BROKER_ENCRYPTION_KEYS takes precedence


@dataclass(frozen=True)
class CredentialSettings:
    name: str
    client_id: str
    client_secret: Secret
    token_url: str | None = None
    issuer: str | None = None
    auth_method: str = "client_secret_basic"
    scopes: tuple[str, ...] = ()
    default_scopes: tuple[str, ...] = ()
    audience: str | None = None
    resource: str | None = None
    extra_params: Mapping[str, str] = field(default_factory=dict)
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
        ]
        digest = hashlib.sha256(json.dumps(fields).encode()).hexdigest()[:16]
        object.__setattr__(self, "shape", digest)


@dataclass(frozen=True)
class CallerSettings:
    name: str
    key_sha256: str  # lowercase hex; the key itself is never stored
    grants: Mapping[str, frozenset[str]] = field(default_factory=dict)


@dataclass(frozen=True)
class Settings:
    server: ServerSettings = field(default_factory=ServerSettings)
    redis: RedisSettings = field(default_factory=RedisSettings)
    cache: CacheSettings = field(default_factory=CacheSettings)
    upstream: UpstreamSettings = field(default_factory=UpstreamSettings)
    vault: VaultSettings = field(default_factory=VaultSettings)
    credentials: Mapping[str, CredentialSettings] = field(default_factory=dict)
    callers: Mapping[str, CallerSettings] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()
    keyring: KeyRing | None = None  # None: no encryption key given (plaintext only with the insecure flag)


def redact_url(url: str | None) -> str | None:
    """The URL with any password replaced, for logs and reprs."""
    if url is None:
        return None
    parts = urlsplit(url)
    if parts.password is not None:
        parts = parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@", 1))
    if parts.query:
        query = [(k, "***" if k.lower().endswith("password") else v) for k, v in parse_qsl(parts.query, True)]
        parts = parts._replace(query=urlencode(query, safe="*"))
    return parts.geturl()


class _Reader:
    """Reads typed values out of TOML tables, collecting one problem line per bad key."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env
        self.problems: list[str] = []
        self.warnings: list[str] = []

    def problem(self, key: str, message: str) -> None:
        self.problems.append(f"{key}: {message}")

    def table(self, parent: Mapping[str, Any], name: str, key: str) -> dict[str, Any]:
        value = parent.get(name, {})
        if not isinstance(value, dict):
            self.problem(key, "must be a table")
            return {}
        return value

    def unknown(self, table: Mapping[str, Any], known: set[str], prefix: str) -> None:
        for name in sorted(set(table) - known):
            self.problem(f"{prefix}.{name}", "unknown key")

    def value(
        self,
        table: Mapping[str, Any],
        name: str,
        key: str,
        convert: Callable[[Any], T],
        default: T,
        expected: str,
    ) -> T:
        if name not in table:
            return default
        try:
            return convert(table[name])
        except (TypeError, ValueError, OverflowError):
            self.problem(key, f"must be {expected}, got {table[name]!r}")
            return default

    def secret(self, table: Mapping[str, Any], name: str, key: str) -> Secret | None:
        ref = table.get(name)
        if ref is None:
            self.problem(key, "is required")
            return None
        if isinstance(ref, str):
            if not ref:
                self.problem(key, "must not be empty")
                return None
            self.warnings.append(
                f'{key}: a literal secret in the config file; prefer {{ env = "…" }} or {{ file = "…" }}'
            )
            return Secret(ref, "literal")
        if not isinstance(ref, dict) or len(ref) != 1 or next(iter(ref)) not in ("env", "file"):
            self.problem(key, 'must be { env = "NAME" }, { file = "/path" } or a string')
            return None
        kind, where = next(iter(ref.items()))
        if not isinstance(where, str) or not where:
            self.problem(key, f"{kind} must be a non-empty string")
            return None
        if kind == "env":
            env_value = self.env.get(where)
            if not env_value:
                self.problem(key, f"environment variable {where} is not set or empty")
                return None
            return Secret(env_value, f"env:{where}")
        try:
            file_value = Path(where).read_text(encoding="utf-8").strip()
        except OSError as exc:
            self.problem(key, f"cannot read secret file {where}: {exc.strerror or exc}")
            return None
        if not file_value:
            self.problem(key, f"secret file {where} is empty")
            return None
        return Secret(file_value, f"file:{where}")


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in (
        "1",
        "true",
        "yes",
        "on",
        "0",
        "false",
        "no",
        "off",
    ):
        return value.lower() in ("1", "true", "yes", "on")
    raise ValueError(value)


def _to_int(value: Any) -> int:
    if isinstance(value, bool | float):
        raise TypeError(value)
    return int(value)


def _to_float(value: Any) -> float:
    if isinstance(value, bool):
        raise TypeError(value)
    result = float(value)
    if not math.isfinite(result):
        raise ValueError(value)
    return result


def _to_str(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(value)
    return value


def _to_pair(value: Any) -> tuple[float, float]:
    if isinstance(value, str):
        value = [v for v in value.split(",") if v.strip()]
    if not isinstance(value, list | tuple) or len(value) != 2:
        raise ValueError(value)
    low, high = (_to_float(v) for v in value)
    return (low, high)


def _check_url(reader: _Reader, key: str, url: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        reader.problem(key, f"must be an http(s) URL with a host, got {url!r}")
    elif key.endswith("issuer") and (parts.query or parts.fragment):
        reader.problem(key, "must not carry a query or fragment")


def _scope_list(reader: _Reader, table: Mapping[str, Any], name: str, key: str) -> tuple[str, ...]:
    raw = table.get(name, [])
    if not isinstance(raw, list) or not all(isinstance(s, str) for s in raw):
        reader.problem(key, "must be a list of strings")
        return ()
    try:
        return scopes_mod.parse(" ".join(raw))
    except InvalidRequest as exc:
        reader.problem(key, exc.description)
        return ()


# Variables in the override namespace that are not config keys: BROKER_REDIS_SERVER names the
# embedded redis-server binary (broker/embedded_redis.py).
_NOT_OVERRIDES = frozenset({"BROKER_REDIS_SERVER"})


def _env_overrides(data: dict[str, Any], env: Mapping[str, str]) -> None:
    """BROKER_<SECTION>_<KEY> overrides [section] key for server, redis, cache and upstream."""
    for section in ("server", "redis", "cache", "upstream", "vault"):
        prefix = f"BROKER_{section.upper()}_"
        for name, value in env.items():
            if name.startswith(prefix) and len(name) > len(prefix) and name not in _NOT_OVERRIDES:
                table = data.setdefault(section, {})
                if isinstance(table, dict):
                    table[name[len(prefix) :].lower()] = value


_CONVERTERS: dict[str, tuple[Callable[[Any], Any], str]] = {
    "str": (_to_str, "a string"),
    "str | None": (_to_str, "a string"),
    "int": (_to_int, "an integer"),
    "float": (_to_float, "a number"),
    "bool": (_to_bool, "true or false"),
    "tuple[float, float]": (_to_pair, "two numbers [low, high]"),
}

# Inclusive bounds per key: one line each instead of a hand-written check per field.
_BOUNDS: dict[str, tuple[float, float]] = {
    "server.port": (0, 65535),
    "server.workers": (1, 64),
    "server.request_deadline_seconds": (0.5, 300),
    "server.max_body_bytes": (1024, 1_048_576),
    "cache.skew_seconds": (0, 3600),
    "cache.default_expires_in": (2, 366 * 24 * 3600),
    "cache.l1_max_entries": (1, 10_000_000),
    "cache.lock_ttl_seconds": (0.5, 60),
    "cache.negative_ttl_seconds": (0, 300),
    "cache.invalidate_min_interval_seconds": (0, 3600),
    "upstream.connect_timeout_seconds": (0.05, 60),
    "upstream.timeout_seconds": (0.05, 300),
    "upstream.max_attempts": (1, 10),
    "upstream.discovery_ttl_seconds": (0, 7 * 24 * 3600),
    "upstream.breaker_failures": (1, 1000),
    "upstream.breaker_cooldown_seconds": (0.1, 600),
}

S = TypeVar("S")


def _section(r: _Reader, t: Mapping[str, Any], cls: type[S], name: str) -> S:
    """Read the flat section `[name]` into the dataclass `cls`: types from its fields, bounds from _BOUNDS."""
    r.unknown(t, set(cls.__dataclass_fields__), name)  # type: ignore[attr-defined]
    defaults = cls()
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        key = f"{name}.{f.name}"
        convert, expected = _CONVERTERS[str(f.type)]
        value = r.value(t, f.name, key, convert, getattr(defaults, f.name), expected)
        bounds = _BOUNDS.get(key)
        if bounds is not None and not bounds[0] <= value <= bounds[1]:
            r.problem(key, f"must be between {bounds[0]:g} and {bounds[1]:g}, got {value}")
            value = getattr(defaults, f.name)
        values[f.name] = value
    return cls(**values)


def _server(r: _Reader, t: Mapping[str, Any]) -> ServerSettings:
    s = _section(r, t, ServerSettings, "server")
    if s.public_url is not None:
        _check_url(r, "server.public_url", s.public_url)
    return s


def _redis(r: _Reader, t: Mapping[str, Any]) -> RedisSettings:
    redis = _section(r, {k: v for k, v in t.items() if v != ""}, RedisSettings, "redis")  # "" means embedded
    tls = False
    if redis.url is not None:
        try:
            tls = redis_client.parse_url(redis.url).tls
        except redis_client.RedisURLError as exc:
            r.problem("redis.url", str(exc))
            tls = True  # the file keys are still checked below
    files = {"tls_ca_file": redis.tls_ca_file, "tls_cert_file": redis.tls_cert_file, "tls_key_file": redis.tls_key_file}
    for name, path in files.items():
        if path is None:
            continue
        if not tls:
            scheme = "an embedded server" if redis.url is None else f"{urlsplit(redis.url).scheme}://"
            r.problem(f"redis.{name}", f"is only used with a TLS URL (rediss://…), not with {scheme}")
        elif not Path(path).is_file():
            r.problem(f"redis.{name}", f"no such file: {path}")
        elif not os.access(path, os.R_OK):
            r.problem(f"redis.{name}", f"cannot read {path}")
    if not _KEY_PREFIX.fullmatch(redis.key_prefix):
        r.problem("redis.key_prefix", "must be 1-32 letters, digits, '.', '_' or '-'")
    if redis.tls_key_file is not None and redis.tls_cert_file is None:
        r.problem("redis.tls_key_file", "needs redis.tls_cert_file (the client certificate it belongs to)")
    return redis


def _cache(r: _Reader, t: Mapping[str, Any]) -> CacheSettings:
    c = _section(r, t, CacheSettings, "cache")
    low, high = c.refresh_at
    if not 0 < low <= high < 1:
        r.problem("cache.refresh_at", f"must satisfy 0 < low <= high < 1, got [{low}, {high}]")
    return c


def _keyring(r: _Reader, vault: VaultSettings, env: Mapping[str, str]) -> KeyRing | None:
    """The encryption keys (spec §6.1), from BROKER_ENCRYPTION_KEYS or [vault] encryption_keys_file."""
    key = "BROKER_ENCRYPTION_KEYS"
    text = env.get(key)
    if not text and vault.encryption_keys_file:
        key = "vault.encryption_keys_file"
        try:
            text = Path(vault.encryption_keys_file).read_text(encoding="utf-8")
        except OSError as exc:
            r.problem(key, f"cannot read {vault.encryption_keys_file}: {exc.strerror or exc}")
            return None
    if not text:
        return None
    try:
        return KeyRing.parse(text)
    except KeyRingError as exc:
        r.problem(key, str(exc))
        return None


def _upstream(r: _Reader, t: Mapping[str, Any]) -> UpstreamSettings:
    return _section(r, t, UpstreamSettings, "upstream")


_CREDENTIAL_KEYS = {
    "issuer",
    "token_url",
    "client_id",
    "client_secret",
    "auth_method",
    "scopes",
    "default_scopes",
    "audience",
    "resource",
    "extra_params",
}
_RESERVED_FORM_FIELDS = {
    "grant_type",
    "scope",
    "client_id",
    "client_secret",
    "audience",
    "resource",
}


def _credential(r: _Reader, name: str, t: Mapping[str, Any]) -> CredentialSettings | None:
    key = f"credentials.{name}"
    r.unknown(t, _CREDENTIAL_KEYS, key)
    token_url = r.value(t, "token_url", f"{key}.token_url", _to_str, None, "a URL string")
    issuer = r.value(t, "issuer", f"{key}.issuer", _to_str, None, "a URL string")
    if (token_url is None) == (issuer is None):
        r.problem(key, "needs exactly one of issuer (OIDC discovery) or token_url")
    for k, url in (("token_url", token_url), ("issuer", issuer)):
        if url is not None:
            _check_url(r, f"{key}.{k}", url)
    client_id = r.value(t, "client_id", f"{key}.client_id", _to_str, "", "a string")
    if not client_id:
        r.problem(f"{key}.client_id", "is required")
    auth_method = r.value(t, "auth_method", f"{key}.auth_method", _to_str, "client_secret_basic", "a string")
    if auth_method in _PLANNED_AUTH_METHODS:
        r.problem(
            f"{key}.auth_method",
            f"{auth_method} is not supported yet; use one of {', '.join(AUTH_METHODS)}",
        )
    elif auth_method not in AUTH_METHODS:
        r.problem(f"{key}.auth_method", f"must be one of {', '.join(AUTH_METHODS)}, got {auth_method!r}")
    secret = r.secret(t, "client_secret", f"{key}.client_secret")
    allowed = _scope_list(r, t, "scopes", f"{key}.scopes")
    defaults = _scope_list(r, t, "default_scopes", f"{key}.default_scopes")
    for scope in defaults:
        if scope not in allowed:
            r.problem(f"{key}.default_scopes", f"scope {scope!r} is not in {key}.scopes")
    extra = r.table(t, "extra_params", f"{key}.extra_params")
    for field_name, v in extra.items():
        if not isinstance(v, str):
            r.problem(f"{key}.extra_params.{field_name}", "must be a string")
        elif field_name in _RESERVED_FORM_FIELDS:
            r.problem(f"{key}.extra_params.{field_name}", "is set by the broker itself")
    if secret is None:
        return None
    return CredentialSettings(
        name=name,
        client_id=client_id,
        client_secret=secret,
        token_url=token_url,
        issuer=issuer.rstrip("/") if issuer else None,
        auth_method=auth_method,
        scopes=allowed,
        default_scopes=defaults,
        audience=r.value(t, "audience", f"{key}.audience", _to_str, None, "a string"),
        resource=r.value(t, "resource", f"{key}.resource", _to_str, None, "a string"),
        extra_params={k: v for k, v in extra.items() if isinstance(v, str)},
    )


def _caller(r: _Reader, name: str, t: Mapping[str, Any], credentials: Mapping[str, Any]) -> CallerSettings:
    key = f"callers.{name}"
    r.unknown(t, {"key_sha256", "grants"}, key)
    digest = r.value(t, "key_sha256", f"{key}.key_sha256", _to_str, "", "a string").lower()
    if len(digest) != 64 or not set(digest) <= _SHA256_HEX:
        r.problem(f"{key}.key_sha256", "must be 64 hex characters (token-broker caller-key prints it)")
    grants: dict[str, frozenset[str]] = {}
    for credential, scopes in r.table(t, "grants", f"{key}.grants").items():
        gkey = f"{key}.grants.{credential}"
        if credential not in credentials:
            r.problem(gkey, f"unknown credential {credential!r}")
            continue
        granted = _scope_list(r, {"s": scopes}, "s", gkey)
        cred = credentials[credential]
        if isinstance(cred, dict):
            allowed = set(_scope_list(_Reader(r.env), cred, "scopes", ""))
            for scope in granted:
                if scope not in allowed:
                    r.problem(gkey, f"scope {scope!r} is not allowed by credentials.{credential}.scopes")
        grants[credential] = frozenset(granted)
    return CallerSettings(name=name, key_sha256=digest, grants=grants)


def parse_settings(data: dict[str, Any], env: Mapping[str, str]) -> Settings:
    """Validate a parsed TOML document (with env overrides applied to it)."""
    _env_overrides(data, env)
    r = _Reader(env)
    r.unknown(data, {"server", "redis", "cache", "upstream", "vault", "credentials", "callers"}, "config")
    server = _server(r, r.table(data, "server", "server"))
    redis = _redis(r, r.table(data, "redis", "redis"))
    cache = _cache(r, r.table(data, "cache", "cache"))
    upstream = _upstream(r, r.table(data, "upstream", "upstream"))
    vault = _section(r, r.table(data, "vault", "vault"), VaultSettings, "vault")
    keyring = _keyring(r, vault, env)
    raw_credentials = r.table(data, "credentials", "credentials")
    credentials: dict[str, CredentialSettings] = {}
    for name, table in raw_credentials.items():
        if not _NAME.fullmatch(name):
            r.problem(f"credentials.{name}", "a credential name is 1-64 letters, digits, '.', '_' or '-'")
            continue
        if not isinstance(table, dict):
            r.problem(f"credentials.{name}", "must be a table")
            continue
        cred = _credential(r, name, table)
        if cred is not None:
            credentials[name] = cred
    callers: dict[str, CallerSettings] = {}
    for name, table in r.table(data, "callers", "callers").items():
        if not _NAME.fullmatch(name):
            r.problem(f"callers.{name}", "a caller name is 1-64 letters, digits, '.', '_' or '-'")
            continue
        if not isinstance(table, dict):
            r.problem(f"callers.{name}", "must be a table")
            continue
        callers[name] = _caller(r, name, table, raw_credentials)
    seen: dict[str, str] = {}
    for caller in callers.values():
        if caller.key_sha256 and caller.key_sha256 in seen:
            r.problem(
                f"callers.{caller.name}.key_sha256",
                f"is the same as callers.{seen[caller.key_sha256]}'s",
            )
        seen[caller.key_sha256] = caller.name
    if r.problems:
        raise ConfigError(r.problems)
    return Settings(
        server=server,
        redis=redis,
        cache=cache,
        upstream=upstream,
        vault=vault,
        credentials=credentials,
        callers=callers,
        warnings=tuple(r.warnings),
        keyring=keyring,
    )


def load_settings(path: str | Path | None = None, env: Mapping[str, str] | None = None) -> Settings:
    """Load and validate the config file named by `path` or BROKER_CONFIG."""
    env = os.environ if env is None else env
    location = path or env.get("BROKER_CONFIG")
    if not location:
        raise ConfigError(["config: no config file given (use --config FILE or BROKER_CONFIG)"])
    try:
        with open(location, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigError([f"config: cannot read {location}: {exc.strerror or exc}"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"config: {location} is not valid TOML: {exc}"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"config: {location} is not UTF-8 text"]) from None
    return parse_settings(data, env)
