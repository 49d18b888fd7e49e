"""Redis: key names, cached token values, the fetch lock and the events channel (spec §4.1-§4.4).

Nothing else in the broker knows a key name or a Redis command (the Lua scripts are beside it, in
broker/redis_scripts.py). Every cache key written has a TTL; the vault's two keys are data.
Redis errors are translated here: StoreUnavailable (an outage) or StoreBusy (no free connection).

Keys, all hash-tagged by credential so one credential's keys share a cluster slot (a caller's
rate limit has a tag of its own; `rl:` cannot start a credential name):

    {prefix}:{<credential>}:tok:<id>     the cached token (broker/entries.py), TTL = cached window
    {prefix}:{<credential>}:lock:<id>    the fetch lock: "<owner>|<fence>", renewed by its holder
    {prefix}:{<credential>}:fence:<id>   the fence counter: every lock taken gets a higher number
    {prefix}:{<credential>}:neg:<id>     a remembered refusal (negative cache)
    {prefix}:{<credential>}:inv:<id>     set for a while after an invalidation (throttles the next)
    {prefix}:{<credential>}:secret:<sid> the fingerprint of the client secret that works (spec §6.5)
    {prefix}:events                      the pub/sub channel of writes, drops and vault changes
    {prefix}:{rl:<caller>}:gcra          a caller's rate limit state (GCRA), TTL ≤ burst / rate + 1 s
    {prefix}:{:vault}:document|version    the admin API's credentials and callers, sealed (no TTL)

`<id>` = sha256(credential shape, scope set)[:32]: the shape is a fingerprint of everything in the
credential that shapes a token (client id, endpoint, auth method, audience, resource, extra
params), so a changed credential or another deployment never reads these tokens (spec §4.1).
`<sid>` = sha256(the fingerprints of the credential's client_secrets, in order)[:32]: a changed
list of secrets never reads what was remembered for another.
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

from broker import redis_scripts as scripts
from broker.clock import Clock, SystemClock
from broker.entries import CachedToken, Codec, Rejection
from broker.errors import StoreBusy, StoreUnavailable
from broker.redis_client import (
    PoolExhausted,
    connect,  # re-exported: the client for any topology
)

__all__ = [
    "DEFAULT_PREFIX",
    "Keys",
    "Lock",
    "Store",
    "TokenKeys",
    "connect",
]

log = structlog.get_logger("broker.store")

DEFAULT_PREFIX = "tb"
_FENCE_TTL_MS = 24 * 3600 * 1000  # the counter outlives any lock; stored values carry their own fence
_NOT_SEALED = (":lock:", ":fence:", ":inv:", ":secret:", ":{rl:")  # key kinds whose values are not secret
_WORKING_SECRET_TTL_S = 24 * 3600  # written again by every fetch that uses a fallback secret
_VAULT_VERSION_DIGITS = 15  # what VAULT_PUT counts exactly (below 2^53); more was never written by it


@dataclass(frozen=True, slots=True)
class TokenKeys:
    """Every key of one (credential, scope set)."""

    token: str
    lock: str
    fence: str
    refusal: str
    invalidated: str
    grant: str = ""  # a subject's token (spec §5.4): the key of the subject's grant record


class Keys:
    """Builds key names; the only place that knows them."""

    def __init__(self, prefix: str = DEFAULT_PREFIX) -> None:
        self.prefix = prefix
        self.events = f"{prefix}:events"
        # The vault document and its version: the broker's own data, not a cache, so no TTL. Their
        # hash tags start with ':', which no credential name can (a credential named "vault" must
        # never share, or purge, them).
        self.vault_document = f"{prefix}:{{:vault}}:document"
        self.vault_version = f"{prefix}:{{:vault}}:version"

    def rate_limit(self, caller: str) -> str:
        return f"{self.prefix}:{{rl:{caller}}}:gcra"

    def credential_pattern(self, credential: str) -> str:
        """Every key of one credential (SCAN MATCH): a deleted credential leaves nothing behind."""
        return f"{self.prefix}:{{{credential}}}:*"

    def working_secret(self, credential: str, secrets_id: str) -> str:
        return f"{self.prefix}:{{{credential}}}:secret:{secrets_id}"

    def subject_pattern(self, credential: str, subject: str = "*") -> str:
        """Every key of one subject of a credential, or of all of its subjects (SCAN MATCH)."""
        return f"{self.prefix}:{{{credential}/{subject}}}:*"

    @staticmethod
    def subject_id(shape: str, subject: str) -> str:
        """A subject's name in keys: a hash (a `sub` is personal data), of the credential's shape
        too, so a changed client never spends a refresh token issued to the old one."""
        return hashlib.sha256(f"{shape}\n{subject}".encode()).hexdigest()[:24]

    def for_token(self, credential: str, shape: str, scope_set: str, subject: str | None = None) -> TokenKeys:
        ident = hashlib.sha256(f"{shape}\n{scope_set}".encode()).hexdigest()[:32]
        # Subjects are hash-tagged by credential and subject: one slot per user, not per credential.
        tag = credential if subject is None else f"{credential}/{self.subject_id(shape, subject)}"
        base = f"{self.prefix}:{{{tag}}}:"
        return TokenKeys(
            token=f"{base}tok:{ident}",
            lock=f"{base}lock:{ident}",
            fence=f"{base}fence:{ident}",
            refusal=f"{base}neg:{ident}",
            invalidated=f"{base}inv:{ident}",
            grant=f"{base}grant" if subject is not None else "",
        )

    def login(self, state: str) -> str:
        """A login in progress, by its `state` (spec §5.2): single use, short-lived."""
        return f"{self.prefix}:{{:login}}:{hashlib.sha256(state.encode()).hexdigest()[:32]}"


@dataclass(frozen=True, slots=True)
class Lock:
    """A fetch lock held: its Redis value and the fence that orders the holder's write."""

    key: str
    value: str
    fence: int


class Store:
    """Redis access. After a connection failure, calls fail fast (no I/O) for a short while so a
    dead Redis costs callers nothing; `ping` always goes through and tells when it is back.

    A full connection pool is load, not an outage: it raises StoreBusy and changes nothing else.
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        prefix: str = DEFAULT_PREFIX,
        codec: Codec | None = None,
        clock: Clock | None = None,
        retry_after: float = 1.0,
    ) -> None:
        self.redis = redis
        self.keys = Keys(prefix)
        self.codec = codec or Codec(None)
        self.clock = clock or SystemClock()
        self.retry_after = retry_after
        self.reachable = True
        self._down_until = 0.0
        self._redis_offset: float | None = None  # Redis's clock minus our monotonic clock, seconds
        self._get = redis.register_script(scripts.GET)
        self._put = redis.register_script(scripts.PUT)
        self._acquire = redis.register_script(scripts.ACQUIRE)
        self._drop_if = redis.register_script(scripts.DROP_IF)
        self._release = redis.register_script(scripts.RELEASE)
        self._renew = redis.register_script(scripts.RENEW)
        self._rewrap = redis.register_script(scripts.REWRAP)
        self._vault_put = redis.register_script(scripts.VAULT_PUT)
        self._grant_put = redis.register_script(scripts.GRANT_PUT)
        self._take_rate = redis.register_script(scripts.TAKE_RATE)

    async def _call(self, command: Callable[..., Awaitable[Any]], *args: Any, probe: bool = False, **kw: Any) -> Any:
        if not probe and not self.reachable and time.monotonic() < self._down_until:
            raise StoreUnavailable("Redis is unreachable.")
        try:
            try:
                result = await command(*args, **kw)
            except PoolExhausted:
                raise
            except (ConnectionError, RedisConnectionError):
                if not self.reachable:
                    raise
                # A pooled connection may predate a Redis restart and fail once: the pool has
                # dropped it, so one more try runs on a fresh connection. Every command here is
                # safe to repeat (the lock script recognises its own owner).
                result = await command(*args, **kw)
        except PoolExhausted as exc:
            raise StoreBusy("No Redis connection was free in time: the broker is overloaded.") from exc
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

    # -- tokens -----------------------------------------------------------------------------------

    async def get(self, keys: TokenKeys) -> CachedToken | None:
        read_at = self.clock.monotonic()
        found = await self._call(self._get, keys=[keys.token])
        if not found:
            return None
        raw, pttl, seconds, micros = found
        redis_now_ms = int(seconds) * 1000 + int(micros) // 1000
        self._learn_redis_clock(redis_now_ms)
        return self.codec.decode_token(raw, keys.token, int(pttl), read_at, redis_now_ms)

    async def put(self, keys: TokenKeys, entry: CachedToken) -> bool:
        """Store `entry` until its cached window ends, unless the stored value was written under a
        later fence. False: refused, or nothing left to store."""
        if entry.fresh_until - self.clock.monotonic() < 0.001:
            return False
        # The window's end on Redis's clock, sealed with the value: its TTL alone is not part of it.
        deadline_ms = int((entry.fresh_until + await self._redis_clock_offset()) * 1000)
        value = self.codec.encode_token(entry, keys.token, deadline_ms)
        args = [entry.fence, value, deadline_ms, self.keys.events, entry.fingerprint]
        return bool(await self._call(self._put, keys=[keys.token], args=args))

    def _learn_redis_clock(self, redis_now_ms: int) -> None:
        # Taken when the answer is in: Redis read its clock before that, so the offset is never
        # larger than the real one (a deadline made from it is early by a round trip at most).
        self._redis_offset = redis_now_ms / 1000 - self.clock.monotonic()

    async def _redis_clock_offset(self) -> float:
        """Redis's clock minus our monotonic clock (seconds), as of the last read."""
        if self._redis_offset is None:
            seconds, micros = await self._call(self.redis.time)
            self._learn_redis_clock(int(seconds) * 1000 + int(micros) // 1000)
        assert self._redis_offset is not None  # noqa: S101 - set just above
        return self._redis_offset

    async def drop_if(self, keys: TokenKeys, access_token: str, min_interval: float) -> int:
        """Drop the stored token if it is `access_token` → its fence; 0 if another token (or
        none) is stored; -1 if it is too young to drop again so soon after the last drop."""
        args = [self.keys.events, int(min_interval * 1000), *self.codec.fingerprints(access_token)]
        return int(await self._call(self._drop_if, keys=[keys.token, keys.invalidated], args=args))

    # -- the fetch lock ---------------------------------------------------------------------------

    async def acquire_lock(self, keys: TokenKeys, owner: str, ttl_seconds: float) -> Lock | None:
        args = [owner, int(ttl_seconds * 1000), _FENCE_TTL_MS]
        fence = int(await self._call(self._acquire, keys=[keys.lock, keys.fence, keys.token], args=args))
        return Lock(keys.lock, f"{owner}|{fence}", fence) if fence > 0 else None

    async def renew_lock(self, lock: Lock, ttl_seconds: float) -> bool:
        return bool(await self._call(self._renew, keys=[lock.key], args=[lock.value, int(ttl_seconds * 1000)]))

    async def release_lock(self, lock: Lock) -> None:
        await self._call(self._release, keys=[lock.key], args=[lock.value])

    async def lock_held(self, keys: TokenKeys) -> bool:
        return bool(await self._call(self.redis.exists, keys.lock))

    async def lock_is_held(self, key: str, value: str) -> bool:
        """The lock `key` (a Lock's) is still held by the holder whose value is `value`."""
        held = await self._call(self.redis.get, key)
        return (held.decode(errors="replace") if isinstance(held, bytes) else held) == value

    # -- refusals ---------------------------------------------------------------------------------

    async def put_rejection(self, keys: TokenKeys, rejection: Rejection, ttl_seconds: float) -> None:
        ttl_ms = max(1, int(ttl_seconds * 1000))
        deadline_ms = int((self.clock.monotonic() + await self._redis_clock_offset()) * 1000) + ttl_ms
        value = self.codec.encode_rejection(rejection, keys.refusal, deadline_ms)
        await self._call(self.redis.set, keys.refusal, value, px=ttl_ms)

    async def get_rejection(self, keys: TokenKeys) -> Rejection | None:
        found = await self._call(self._get, keys=[keys.refusal])  # the value and Redis's clock
        if not found:
            return None
        raw, _, seconds, micros = found
        redis_now_ms = int(seconds) * 1000 + int(micros) // 1000
        self._learn_redis_clock(redis_now_ms)
        return self.codec.decode_rejection(raw, keys.refusal, redis_now_ms)

    # -- client secret rotation (spec §6.5) ------------------------------------------------------

    async def get_working_secret(self, credential: str, secrets_id: str) -> str | None:
        """The fingerprint of the secret that worked last for this list of secrets, or None."""
        raw = await self._call(self.redis.get, self.keys.working_secret(credential, secrets_id))
        return raw.decode(errors="replace") if isinstance(raw, bytes) else raw

    async def put_working_secret(self, credential: str, secrets_id: str, fingerprint: str) -> None:
        key = self.keys.working_secret(credential, secrets_id)
        await self._call(self.redis.set, key, fingerprint, ex=_WORKING_SECRET_TTL_S)

    # -- rate limits (spec §6.6) ------------------------------------------------------------------

    async def take_rate(self, caller: str, per_second: float, burst: int, want: int) -> tuple[int, float]:
        """Up to `want` units of the caller's rate limit → (units granted, seconds until the next
        unit is free). Shared by every worker of every replica; Redis's clock decides."""
        args = [repr(float(per_second)), burst, want]
        granted, wait_ms = await self._call(self._take_rate, keys=[self.keys.rate_limit(caller)], args=args)
        return int(granted), int(wait_ms) / 1000

    # -- encryption keys --------------------------------------------------------------------------

    async def rewrap_all(self) -> tuple[int, int]:
        """Seal every stored value under the primary key → (values re-sealed, values seen)."""
        rewrapped = seen = 0
        async for name in self.redis.scan_iter(match=f"{self.keys.prefix}:*", count=500):
            key = name.decode() if isinstance(name, bytes) else str(name)
            if any(kind in key for kind in _NOT_SEALED) or key == self.keys.vault_version:
                continue
            raw = await self._call(self.redis.get, key)
            if not raw:
                continue
            seen += 1
            fresh = self.codec.rewrap(raw, key)
            if fresh is not None and await self._call(self._rewrap, keys=[key], args=[raw, fresh]):
                rewrapped += 1
        return rewrapped, seen

    # -- the vault document (spec §3.6) -------------------------------------------------------------

    async def vault_version(self) -> int:
        return _vault_version(await self._call(self.redis.get, self.keys.vault_version))

    async def get_vault(self) -> tuple[int, bytes | None]:
        """(version, the opened document) — None when there is none, or it does not open."""
        version, raw = await self._call(self.redis.mget, [self.keys.vault_version, self.keys.vault_document])
        if not raw:
            return _vault_version(version), None
        return _vault_version(version), self.codec.open(raw, self.keys.vault_document)

    async def put_vault(self, expected_version: int, document: bytes) -> int:
        """Write the document if the stored version is still `expected_version` → the new version,
        or 0 when another writer was first."""
        sealed = self.codec.seal(document, self.keys.vault_document)
        args = [expected_version, sealed, self.keys.events]
        keys = [self.keys.vault_document, self.keys.vault_version]
        return int(await self._call(self._vault_put, keys=keys, args=args))

    async def purge_credential(self, credential: str) -> int:
        """Delete everything cached for a credential → how many keys."""
        deleted = 0
        async for name in self.redis.scan_iter(match=self.keys.credential_pattern(credential), count=500):
            deleted += int(await self._call(self.redis.delete, name))
        return deleted

    # -- subjects: grants and logins (spec §5) -----------------------------------------------------

    async def get_grant(self, keys: TokenKeys) -> tuple[int, dict[str, Any] | None]:
        """(version, the subject's grant record) — (0, None) when there is none; a record that
        does not open is (its version, None)."""
        raw = await self._call(self.redis.get, keys.grant)
        if not raw:
            return 0, None
        # The version as GRANT_PUT reads it (0 when there is none): a record edited in Redis is
        # one that does not open, and the next login replaces it.
        head, _, rest = bytes(raw).partition(b"|")
        digits, sep, body = rest.partition(b"|")
        if head != b"g1" or not digits.isdigit() or not sep:
            return 0, None
        opened = self.codec.open(body, f"{keys.grant}|{digits.decode()}")
        try:
            record = json.loads(opened) if opened is not None else None
        except ValueError:
            record = None
        return int(digits), record if isinstance(record, dict) else None

    async def put_grant(
        self, keys: TokenKeys, expected_version: int, record: dict[str, Any], ttl: float, lock: Lock | None = None
    ) -> int:
        """Write the grant record if its version is still `expected_version` (and, given `lock`,
        only while that lock is ours) → 1; 0 when another write came first; -1 when the lock is
        gone (its holder may not redeem a refresh token)."""
        version = expected_version + 1
        sealed = self.codec.seal(json.dumps(record).encode(), f"{keys.grant}|{version}")
        value = f"g1|{version}|".encode() + sealed
        args = [expected_version, value, max(1, int(ttl * 1000)), lock.value if lock else ""]
        return int(await self._call(self._grant_put, keys=[keys.grant, lock.key if lock else keys.lock], args=args))

    async def put_login(self, state: str, record: dict[str, Any], ttl: float) -> None:
        key = self.keys.login(state)
        await self._call(self.redis.set, key, self.codec.seal(json.dumps(record).encode(), key), px=int(ttl * 1000))

    async def take_login(self, state: str) -> dict[str, Any] | None:
        """The login started with `state`, consumed: a second look finds nothing."""
        key = self.keys.login(state)
        raw = await self._call(self.redis.getdel, key)
        opened = self.codec.open(raw, key) if raw else None
        return json.loads(opened) if opened is not None else None

    async def purge_subject(self, credential: str, subject_keys: TokenKeys) -> int:
        """Forget a subject: its grant and every token, each drop announced so L1 copies go too,
        and the grant's too (cached tokens or not), so no worker goes on by what it remembered."""
        tag = subject_keys.grant.removesuffix(":grant")
        deleted = 0
        async for name in self.redis.scan_iter(match=f"{tag}:*", count=500):
            key = name.decode() if isinstance(name, bytes) else str(name)
            deleted += int(await self._call(self.redis.delete, key))
            if ":tok:" in key:
                await self._call(self.redis.publish, self.keys.events, f"drop|-|{key}")
        await self._call(self.redis.publish, self.keys.events, f"drop|-|{subject_keys.grant}")
        return deleted


def _vault_version(raw: bytes | None) -> int:
    """The vault version as stored: 0 for none, -1 for one no broker wrote (edited in Redis). -1
    differs from every version a broker holds, so each one reloads the document; the next change
    writes a fresh version (VAULT_PUT)."""
    if not raw:
        return 0
    return int(raw) if raw.isdigit() and len(raw) <= _VAULT_VERSION_DIGITS else -1
