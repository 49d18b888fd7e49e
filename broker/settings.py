"""Configuration: one TOML file, environment overrides, validated once at start (spec §2).

Every problem found is reported as one line naming its key; `load_settings` raises
`ConfigError` with all of them, never a traceback.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from broker import redis_client
from broker.errors import ConfigError
from broker.reader import Reader, check_url, to_bool, to_float, to_int, to_pair, to_str
from broker.redis_client import redact_url
from broker.vault.keyring import KeyRing, KeyRingError
from broker.vault.models import (
    AdminSettings,
    CallerIssuerSettings,
    CallerSettings,
    CredentialSettings,
)
from broker.vault.tables import read_entries

__all__ = [
    "CacheSettings",
    "FacadeSettings",
    "RedisSettings",
    "ServerSettings",
    "Settings",
    "UpstreamSettings",
    "VaultSettings",
    "load_settings",
    "parse_settings",
]

_KEY_PREFIX = re.compile(r"[A-Za-z0-9._\-]{1,32}")

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
class FacadeSettings:
    """The OAuth 2.0 token-endpoint facade (spec §3.5); it is on when [server] public_url is set."""

    # Client libraries renew early by their own skew (30-60 s): the facade asks the cache for a
    # token with this much left (capped at half the token's lifetime, like min_ttl).
    min_ttl_seconds: float = 120.0


@dataclass(frozen=True)
class Settings:
    server: ServerSettings = field(default_factory=ServerSettings)
    redis: RedisSettings = field(default_factory=RedisSettings)
    cache: CacheSettings = field(default_factory=CacheSettings)
    upstream: UpstreamSettings = field(default_factory=UpstreamSettings)
    vault: VaultSettings = field(default_factory=VaultSettings)
    facade: FacadeSettings = field(default_factory=FacadeSettings)
    credentials: Mapping[str, CredentialSettings] = field(default_factory=dict)
    callers: Mapping[str, CallerSettings] = field(default_factory=dict)
    admins: Mapping[str, AdminSettings] = field(default_factory=dict)
    caller_issuers: Mapping[str, CallerIssuerSettings] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()
    keyring: KeyRing | None = None  # None: no encryption key given (plaintext only with the insecure flag)


# Variables in the override namespace that are not config keys: BROKER_REDIS_SERVER names the
# embedded redis-server binary (broker/embedded_redis.py).
_NOT_OVERRIDES = frozenset({"BROKER_REDIS_SERVER"})


def _env_overrides(data: dict[str, Any], env: Mapping[str, str]) -> None:
    """BROKER_<SECTION>_<KEY> overrides [section] key for server, redis, cache, upstream, vault and facade."""
    for section in ("server", "redis", "cache", "upstream", "vault", "facade"):
        prefix = f"BROKER_{section.upper()}_"
        for name, value in env.items():
            if name.startswith(prefix) and len(name) > len(prefix) and name not in _NOT_OVERRIDES:
                table = data.setdefault(section, {})
                if isinstance(table, dict):
                    table[name[len(prefix) :].lower()] = value


_CONVERTERS: dict[str, tuple[Callable[[Any], Any], str]] = {
    "str": (to_str, "a string"),
    "str | None": (to_str, "a string"),
    "int": (to_int, "an integer"),
    "float": (to_float, "a number"),
    "bool": (to_bool, "true or false"),
    "tuple[float, float]": (to_pair, "two numbers [low, high]"),
}

# Inclusive bounds per key: one line each instead of a hand-written check per field.
_BOUNDS: dict[str, tuple[float, float]] = {
    "server.port": (0, 65535),
    "server.workers": (1, 64),
    "server.request_deadline_seconds": (0.5, 300),
    "server.max_body_bytes": (1024, 1_048_576),
    "cache.skew_seconds": (0, 3600),
    "cache.default_expires_in": (2, 366 * 24 * 3600),
    "cache.l1_max_entries": (0, 10_000_000),
    "cache.lock_ttl_seconds": (0.5, 60),
    "cache.negative_ttl_seconds": (0, 300),
    "cache.invalidate_min_interval_seconds": (0, 3600),
    "upstream.connect_timeout_seconds": (0.05, 60),
    "upstream.timeout_seconds": (0.05, 300),
    "upstream.max_attempts": (1, 10),
    "upstream.discovery_ttl_seconds": (0, 7 * 24 * 3600),
    "upstream.breaker_failures": (1, 1000),
    "upstream.breaker_cooldown_seconds": (0.1, 600),
    "facade.min_ttl_seconds": (0, 24 * 3600),
}

S = TypeVar("S")


def _section(r: Reader, t: Mapping[str, Any], cls: type[S], name: str) -> S:
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


def _server(r: Reader, t: Mapping[str, Any]) -> ServerSettings:
    s = _section(r, t, ServerSettings, "server")
    if s.public_url is not None:
        check_url(r, "server.public_url", s.public_url)
        parts = urlsplit(s.public_url)
        if parts.query or parts.fragment:
            r.problem("server.public_url", "must not carry a query or fragment")
        # The facade's issuers are public_url + "/oauth2/NAME", compared byte for byte by clients.
        s = dataclasses.replace(s, public_url=s.public_url.rstrip("/"))
    return s


def _redis(r: Reader, t: Mapping[str, Any]) -> RedisSettings:
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


def _cache(r: Reader, t: Mapping[str, Any]) -> CacheSettings:
    c = _section(r, t, CacheSettings, "cache")
    low, high = c.refresh_at
    if not 0 < low <= high < 1:
        r.problem("cache.refresh_at", f"must satisfy 0 < low <= high < 1, got [{low}, {high}]")
    return c


def _keyring(r: Reader, vault: VaultSettings, env: Mapping[str, str]) -> KeyRing | None:
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


def _upstream(r: Reader, t: Mapping[str, Any]) -> UpstreamSettings:
    return _section(r, t, UpstreamSettings, "upstream")


def parse_settings(data: dict[str, Any], env: Mapping[str, str]) -> Settings:
    """Validate a parsed TOML document (with env overrides applied to it)."""
    _env_overrides(data, env)
    r = Reader(env)
    known = {"server", "redis", "cache", "upstream", "vault", "facade", "credentials", "callers", "admins"}
    r.unknown(data, known | {"caller_issuers"}, "config")
    server = _server(r, r.table(data, "server", "server"))
    redis = _redis(r, r.table(data, "redis", "redis"))
    cache = _cache(r, r.table(data, "cache", "cache"))
    upstream = _upstream(r, r.table(data, "upstream", "upstream"))
    vault = _section(r, r.table(data, "vault", "vault"), VaultSettings, "vault")
    keyring = _keyring(r, vault, env)
    facade = _section(r, r.table(data, "facade", "facade"), FacadeSettings, "facade")
    entries = read_entries(
        r,
        r.table(data, "credentials", "credentials"),
        r.table(data, "callers", "callers"),
        r.table(data, "admins", "admins"),
        r.table(data, "caller_issuers", "caller_issuers"),
    )
    if r.problems:
        raise ConfigError(r.problems)
    return Settings(
        server=server,
        redis=redis,
        cache=cache,
        upstream=upstream,
        vault=vault,
        facade=facade,
        credentials=entries.credentials,
        callers=entries.callers,
        admins=entries.admins,
        caller_issuers=entries.caller_issuers,
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
