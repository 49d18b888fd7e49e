"""Cache entries: a token as this worker holds it, a remembered refusal, and their stored forms.

A token's times are this process's `time.monotonic()` values, never another host's wall clock
(spec §4.3): a copy read from Redis is bounded by the key's own PTTL and by the deadline sealed
with it, both on Redis's clock (the one clock every broker shares) and read in the same round
trip, so no replica judges freshness by a clock it does not share. The stored form keeps
durations relative to the fetch:

    v3|<fence>|<fingerprint>|<window ms>|<deadline>|<kid>.<sealed payload>   encrypted (spec §6.1)
    v2|<fence>|<fingerprint>|<window ms>|<deadline>|<payload>                --insecure-plaintext-cache

    payload = {"t": token, "s": scope, "l": life, "r": refresh, "e": expires_at}

    v3|<deadline>|<kid>.<sealed refusal>     a remembered refusal, until its deadline

`fence` orders writes (it comes with the fetch lock, spec §4.4); `window` is the cached window
(the key's TTL when written) and `deadline` its end on Redis's clock (ms since the epoch): the
key's TTL is not part of the value, so a TTL lengthened in Redis cannot lengthen a token's life.
`l` is the token's lifetime and `r` its refresh-ahead point, in ms from the fetch. `e`, the
writer's wall-clock expiry, is only for what callers are told (`expires_at`: the same string from
every worker); `expires_in` comes from the monotonic bound. The fence, fingerprint, window and
deadline stay readable in front of the payload so the Lua scripts need neither JSON nor the key;
they are also the associated data of the encryption, with the Redis key, so a value copied to
another key or with an edited field does not decrypt. A tombstone (`v2|<fence>|-|0|0|`) keeps the
fence of a dropped token for as long as the token would have been cached. With encryption on,
plaintext values are not trusted: a Redis client that can write cannot plant a token.
Fingerprints are HMACs under a key derived from the encryption key.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from broker.vault.keyring import KeyRing

__all__ = ["TOMBSTONE_FP", "CachedToken", "Codec", "Rejection", "fingerprint"]

PLAIN, SEALED = "v2", "v3"
TOMBSTONE_FP = "-"


def fingerprint(access_token: str) -> str:
    """A short, non-reversible name for a token, without an encryption key (plaintext mode)."""
    return hashlib.sha256(access_token.encode()).hexdigest()[:16]


def _ms(seconds: float) -> int:
    return max(0, round(seconds * 1000))


@dataclass(frozen=True, slots=True)
class CachedToken:
    access_token: str
    scope: str  # as granted by the authorization server
    expires_at: float  # wall clock: only for what the caller is told (`expires_at`)
    expires: float  # monotonic: the token's real expiry
    fresh_until: float  # monotonic: handed out only before this (expiry minus effective skew)
    refresh_at: float  # monotonic: refresh-ahead point, before fresh_until
    fetched_at: float  # monotonic
    fingerprint: str
    fence: int = 0  # the fetch lock's fence it was written under; 0: fetched without the lock

    def __repr__(self) -> str:
        return f"CachedToken(fp={self.fingerprint}, scope={self.scope!r}, fence={self.fence})"

    @property
    def lifetime(self) -> float:
        return self.expires - self.fetched_at


@dataclass(frozen=True, slots=True)
class Rejection:
    """A terminal refusal by the authorization server, remembered briefly (negative cache)."""

    description: str
    upstream_error: str | None
    upstream_status: int


class Codec:
    """Stored forms of entries, sealed with the key ring (or plaintext without one)."""

    def __init__(self, keyring: KeyRing | None) -> None:
        self.keyring = keyring

    def fingerprint(self, access_token: str) -> str:
        return self.keyring.fingerprint(access_token) if self.keyring else fingerprint(access_token)

    def fingerprints(self, access_token: str) -> list[str]:
        """Under every key of the ring: another worker may have stored one made under another."""
        return self.keyring.fingerprints(access_token) if self.keyring else [fingerprint(access_token)]

    # -- tokens -----------------------------------------------------------------------------------

    def encode_token(self, entry: CachedToken, key: str, deadline_ms: int) -> bytes:
        """The stored form of `entry` under `key`, its cached window ending at `deadline_ms` on
        Redis's clock."""
        payload = json.dumps(
            {
                "t": entry.access_token,
                "s": entry.scope,
                "l": _ms(entry.expires - entry.fetched_at),
                "r": _ms(entry.refresh_at - entry.fetched_at),
                "e": entry.expires_at,
            },
            separators=(",", ":"),
        )
        window = _ms(entry.fresh_until - entry.fetched_at)
        if self.keyring is None:
            return f"{PLAIN}|{entry.fence}|{entry.fingerprint}|{window}|{deadline_ms}|{payload}".encode()
        head = f"{SEALED}|{entry.fence}|{entry.fingerprint}|{window}|{deadline_ms}"
        return f"{head}|{self.keyring.seal(payload.encode(), _aad(key, head))}".encode()

    def decode_token(self, raw: bytes, key: str, pttl_ms: int, read_at: float, redis_now_ms: int) -> CachedToken | None:
        """The entry as of a read sent at monotonic `read_at` that found `raw` with `pttl_ms` left
        on its key at `redis_now_ms` on Redis's clock. None for a tombstone, a value that does not
        decrypt, or anything unreadable."""
        try:
            version, fence, fp, window, deadline, body = raw.decode().split("|", 5)
            if fp == TOMBSTONE_FP:
                return None
            payload = self._open(version, f"{version}|{fence}|{fp}|{window}|{deadline}", body, key)
            if payload is None:
                return None
            left_ms = min(pttl_ms, int(deadline) - redis_now_ms)
            if left_ms <= 0:
                return None
            d = json.loads(payload)
            # The cached window ends at the earlier of the two: measured from when we asked, that
            # bound is conservative, and it is ours, whatever the writer's clock said.
            fresh_until = read_at + left_ms / 1000
            fetched_at = fresh_until - int(window) / 1000
            return CachedToken(
                access_token=str(d["t"]),
                scope=str(d["s"]),
                expires_at=float(d["e"]),
                expires=fetched_at + int(d["l"]) / 1000,
                fresh_until=fresh_until,
                refresh_at=fetched_at + int(d["r"]) / 1000,
                fetched_at=fetched_at,
                fingerprint=fp,
                fence=int(fence),
            )
        except (ValueError, KeyError, TypeError, UnicodeDecodeError, RecursionError):
            return None  # unreadable entries are treated as a miss and overwritten

    def rewrap(self, raw: bytes, key: str) -> bytes | None:
        """`raw` sealed under the primary key (`token-broker rotate-key`), or None when it is
        already, is a tombstone, or cannot be opened (left to expire as a miss)."""
        if self.keyring is None:
            return None
        text = raw.decode(errors="replace")
        if ":tok:" in key:
            parts = text.split("|", 5)
            if len(parts) < 6 or parts[2] == TOMBSTONE_FP or self._is_current(parts[0], parts[5]):
                return None
            payload = self._open(parts[0], "|".join(parts[:5]), parts[5], key)
            if payload is None:
                return None
            fp = self.keyring.fingerprint(str(json.loads(payload)["t"]))  # re-made under the primary too
            head = f"{SEALED}|{parts[1]}|{fp}|{parts[3]}|{parts[4]}"
            return f"{head}|{self.keyring.seal(payload.encode(), _aad(key, head))}".encode()
        if ":neg:" in key:
            parts = text.split("|", 2)
            if len(parts) < 3 or self._is_current(parts[0], parts[2]):
                return None
            payload = self._open(parts[0], "|".join(parts[:2]), parts[2], key)
            if payload is None:
                return None
            head = f"{SEALED}|{parts[1]}"
            return f"{head}|{self.keyring.seal(payload.encode(), _aad(key, head))}".encode()
        version, _, body = text.partition("|")
        if self._is_current(version, body):
            return None
        opened = self.open(raw, key)
        return self.seal(opened, key) if opened is not None else None

    def _is_current(self, version: str, body: str) -> bool:
        return self.keyring is not None and version == SEALED and not self.keyring.needs_rewrap(body)

    # -- refusals ---------------------------------------------------------------------------------

    def encode_rejection(self, rejection: Rejection, key: str, deadline_ms: int) -> bytes:
        """`v3|<deadline>|<sealed>`: remembered until `deadline_ms` on Redis's clock, whatever
        the key's TTL says (it is not part of the value)."""
        fields = {"d": rejection.description, "e": rejection.upstream_error, "s": rejection.upstream_status}
        payload = json.dumps(fields)
        if self.keyring is None:
            return f"{PLAIN}|{deadline_ms}|{payload}".encode()
        head = f"{SEALED}|{deadline_ms}"
        return f"{head}|{self.keyring.seal(payload.encode(), _aad(key, head))}".encode()

    def decode_rejection(self, raw: bytes, key: str, redis_now_ms: int) -> Rejection | None:
        try:
            version, deadline, body = raw.decode().split("|", 2)
            if int(deadline) <= redis_now_ms:
                return None
            payload = self._open(version, f"{version}|{deadline}", body, key)
            if payload is None:
                return None
            d = json.loads(payload)
            return Rejection(description=str(d["d"]), upstream_error=d["e"], upstream_status=int(d["s"]))
        except (ValueError, KeyError, TypeError, UnicodeDecodeError, RecursionError):
            return None

    # -- any sealed document (the vault's) --------------------------------------------------------

    def seal(self, payload: bytes, key: str) -> bytes:
        if self.keyring is None:
            return f"{PLAIN}|".encode() + payload
        return f"{SEALED}|{self.keyring.seal(payload, _aad(key, SEALED))}".encode()

    def open(self, raw: bytes, key: str) -> bytes | None:
        try:
            version, body = raw.decode().split("|", 1)
        except (ValueError, UnicodeDecodeError):
            return None
        payload = self._open(version, version, body, key)
        return payload.encode() if payload is not None else None

    def _open(self, version: str, head: str, body: str, key: str) -> str | None:
        if self.keyring is None:
            return body if version == PLAIN else None  # a sealed value needs the key
        if version != SEALED:
            return None  # plaintext is not trusted once values are encrypted
        opened = self.keyring.open(body, _aad(key, head))
        return opened.decode() if opened is not None else None


def _aad(key: str, head: str) -> bytes:
    return f"{key}|{head}".encode()
