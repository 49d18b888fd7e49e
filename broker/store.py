"""Redis: key names, cached token values, the fetch lock and the event channel's name (spec §4.1-§4.4).

Nothing else in the broker knows a key name or a Redis command. Every key written has a TTL.
Redis errors are translated here into StoreUnavailable.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
import structlog
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from broker.errors import StoreUnavailable
from broker.redis_client import connect  # re-exported: the client for any topology
from broker.scopes import scope_set_id

__all__ = [
    "EVENTS_CHANNEL",
    "CachedToken",
    "Rejection",
    "Store",
    "connect",
    "fingerprint",
    "rejection_key",
]

log = structlog.get_logger("broker.store")

PREFIX = "tb:"
EVENTS_CHANNEL = "tb:events"
_VERSION = "v1"


def token_key(credential: str, scope_set: str) -> str:
    # Hash tag {credential}: one credential's keys share a cluster slot.
    return f"{PREFIX}{{{credential}}}:tok:{scope_set_id(scope_set)}"


def lock_key(credential: str, scope_set: str) -> str:
    return f"{PREFIX}{{{credential}}}:lock:{scope_set_id(scope_set)}"


def rejection_key(credential: str, scope_set: str) -> str:
    return f"{PREFIX}{{{credential}}}:neg:{scope_set_id(scope_set)}"


def fingerprint(access_token: str) -> str:
    """A short, non-reversible name for a token: safe for logs, events and audit."""
    return hashlib.sha256(access_token.encode()).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class CachedToken:
    access_token: str
    scope: str  # as granted by the authorization server
    expires_at: float  # the token's real expiry (epoch seconds)
    fresh_until: float  # expires_at - effective skew: handed out only before this
    refresh_at: float  # refresh-ahead point, before fresh_until
    fetched_at: float
    fingerprint: str

    def __repr__(self) -> str:
        return f"CachedToken(fp={self.fingerprint}, scope={self.scope!r}, expires_at={self.expires_at})"

    def encode(self) -> bytes:
        # The expiry and fingerprint stay readable in front of the payload so the Lua scripts
        # can compare without parsing JSON (and once tokens are encrypted, without the key).
        body = json.dumps(
            {
                "t": self.access_token,
                "s": self.scope,
                "e": self.expires_at,
                "f": self.fresh_until,
                "r": self.refresh_at,
                "a": self.fetched_at,
            },
            separators=(",", ":"),
        )
        return f"{_VERSION}|{int(self.expires_at * 1000)}|{self.fingerprint}|{body}".encode()

    @classmethod
    def decode(cls, raw: bytes) -> CachedToken | None:
        try:
            version, _, fp, body = raw.decode().split("|", 3)
            if version != _VERSION:
                return None
            d = json.loads(body)
            return cls(
                access_token=d["t"],
                scope=d["s"],
                expires_at=float(d["e"]),
                fresh_until=float(d["f"]),
                refresh_at=float(d["r"]),
                fetched_at=float(d["a"]),
                fingerprint=fp,
            )
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            return None  # unreadable entries are treated as a miss and overwritten


@dataclass(frozen=True, slots=True)
class Rejection:
    """A terminal refusal by the authorization server, remembered briefly (negative cache)."""

    description: str
    upstream_error: str | None
    upstream_status: int

    def encode(self) -> bytes:
        return json.dumps({"d": self.description, "e": self.upstream_error, "s": self.upstream_status}).encode()

    @classmethod
    def decode(cls, raw: bytes) -> Rejection | None:
        try:
            d = json.loads(raw)
            return cls(description=str(d["d"]), upstream_error=d["e"], upstream_status=int(d["s"]))
        except (ValueError, KeyError, TypeError):
            return None


# Write only if nothing stored expires later; publish so every worker can update its L1.
_PUT = """
local cur = redis.call('GET', KEYS[1])
if cur then
  local exp = tonumber(string.match(cur, '^v1|(%d+)|'))
  if exp and exp > tonumber(ARGV[1]) then return 0 end
end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
redis.call('PUBLISH', ARGV[4], 'set|' .. ARGV[5] .. '|' .. KEYS[1])
return 1
"""

# Drop only the token that was reported, so a report about a replaced token is a no-op.
_DROP_IF = """
local cur = redis.call('GET', KEYS[1])
if not cur then return 0 end
if string.match(cur, '^v1|%d+|(%x+)|') ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
redis.call('PUBLISH', ARGV[2], 'drop|' .. ARGV[1] .. '|' .. KEYS[1])
return 1
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""


class Store:
    """Redis access. After a connection failure, calls fail fast (no I/O) for a short while so a
    dead Redis costs callers nothing; `ping` always goes through and tells when it is back."""

    def __init__(self, redis: aioredis.Redis, *, retry_after: float = 1.0) -> None:
        self.redis = redis
        self.retry_after = retry_after
        self.reachable = True
        self._down_until = 0.0
        self._put = redis.register_script(_PUT)
        self._drop_if = redis.register_script(_DROP_IF)
        self._release = redis.register_script(_RELEASE)
        self._renew = redis.register_script(_RENEW)

    async def _call(self, command: Callable[..., Awaitable[Any]], *args: Any, probe: bool = False, **kw: Any) -> Any:
        if not probe and not self.reachable and time.monotonic() < self._down_until:
            raise StoreUnavailable("Redis is unreachable.")
        try:
            try:
                result = await command(*args, **kw)
            except (ConnectionError, RedisConnectionError):
                if not self.reachable:
                    raise
                # A pooled connection may predate a Redis restart and fail once: the pool has
                # dropped it, so one more try runs on a fresh connection.
                result = await command(*args, **kw)
        except (ConnectionError, TimeoutError, OSError, RedisConnectionError, RedisTimeoutError) as exc:
            self._mark(reachable=False)
            raise StoreUnavailable(f"Redis is unreachable ({type(exc).__name__}).") from exc
        except RedisError as exc:
            raise StoreUnavailable(f"Redis refused a command ({type(exc).__name__}).") from exc
        if not self.reachable:
            self._mark(reachable=True)
        return result

    def _mark(self, *, reachable: bool) -> None:
        if reachable != self.reachable:
            if reachable:
                log.info("redis.reachable_again")
            else:
                log.warning("redis.unreachable", note="serving L1 copies and fetching in-process until it is back")
        self.reachable = reachable
        if not reachable:
            self._down_until = time.monotonic() + self.retry_after

    def answered(self) -> None:
        """Redis answered on another connection (e.g. the events subscription came back)."""
        if not self.reachable:
            self._mark(reachable=True)

    async def ping(self) -> bool:
        return bool(await self._call(self.redis.ping, probe=True))

    async def get(self, key: str) -> CachedToken | None:
        raw = await self._call(self.redis.get, key)
        return CachedToken.decode(raw) if raw else None

    async def put(self, key: str, entry: CachedToken, ttl_seconds: float) -> bool:
        """Store `entry` unless a token that expires later is already there."""
        ttl_ms = max(1, int(ttl_seconds * 1000))
        args = [int(entry.expires_at * 1000), entry.encode(), ttl_ms, EVENTS_CHANNEL, entry.fingerprint]
        return bool(await self._call(self._put, keys=[key], args=args))

    async def drop_if(self, key: str, fp: str) -> bool:
        return bool(await self._call(self._drop_if, keys=[key], args=[fp, EVENTS_CHANNEL]))

    async def acquire_lock(self, key: str, owner: str, ttl_seconds: float) -> bool:
        return bool(await self._call(self.redis.set, key, owner, nx=True, px=int(ttl_seconds * 1000)))

    async def renew_lock(self, key: str, owner: str, ttl_seconds: float) -> bool:
        return bool(await self._call(self._renew, keys=[key], args=[owner, int(ttl_seconds * 1000)]))

    async def release_lock(self, key: str, owner: str) -> None:
        await self._call(self._release, keys=[key], args=[owner])

    async def lock_held(self, key: str) -> bool:
        return bool(await self._call(self.redis.exists, key))

    async def put_rejection(self, key: str, rejection: Rejection, ttl_seconds: float) -> None:
        await self._call(self.redis.set, key, rejection.encode(), px=max(1, int(ttl_seconds * 1000)))

    async def get_rejection(self, key: str) -> Rejection | None:
        raw = await self._call(self.redis.get, key)
        return Rejection.decode(raw) if raw else None
