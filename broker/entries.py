"""Cache entries: a token as this worker holds it, a remembered refusal, and their stored forms.

A token's times are this process's `time.monotonic()` values, never another host's wall clock
(spec §4.3): a copy read from Redis is bounded by the key's own PTTL, read in the same round trip,
so no replica judges freshness by a clock it does not share. The stored form keeps durations
relative to the fetch:

    v2|<fence>|<fingerprint>|<window ms>|{"t": token, "s": scope, "l": life, "r": refresh, "e": expires_at}

`fence` orders writes (it comes with the fetch lock, spec §4.4); `window` is the cached window
(the key's TTL when written); `l` the token's lifetime and `r` its refresh-ahead point, in ms
from the fetch. `e`, the writer's wall-clock expiry, is only for what callers are told
(`expires_at`: the same string from every worker); `expires_in` comes from the monotonic bound.
The fence, fingerprint and window stay readable in front of the payload so the Lua scripts need
no JSON (and, once payloads are encrypted, no key). A tombstone (`v2|<fence>|-|0|`) keeps the
fence of a dropped token for as long as the token would have been cached.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

__all__ = ["TOMBSTONE_FP", "CachedToken", "Rejection", "fingerprint"]

VERSION = "v2"
TOMBSTONE_FP = "-"


def fingerprint(access_token: str) -> str:
    """A short, non-reversible name for a token: safe for logs, events and audit."""
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

    def encode(self) -> bytes:
        body = json.dumps(
            {
                "t": self.access_token,
                "s": self.scope,
                "l": _ms(self.expires - self.fetched_at),
                "r": _ms(self.refresh_at - self.fetched_at),
                "e": self.expires_at,
            },
            separators=(",", ":"),
        )
        window = _ms(self.fresh_until - self.fetched_at)
        return f"{VERSION}|{self.fence}|{self.fingerprint}|{window}|{body}".encode()

    @classmethod
    def decode(cls, raw: bytes, pttl_ms: int, read_at: float) -> CachedToken | None:
        """The entry as of a read sent at monotonic `read_at` that found `raw` with `pttl_ms` left
        on its key. None for a tombstone or anything unreadable."""
        try:
            version, fence, fp, window, body = raw.decode().split("|", 4)
            if version != VERSION or fp == TOMBSTONE_FP or pttl_ms <= 0:
                return None
            d = json.loads(body)
            # The key expires when the cached window ends: measured from when we asked, that
            # bound is conservative, and it is ours, whatever the writer's clock said.
            fresh_until = read_at + pttl_ms / 1000
            fetched_at = fresh_until - int(window) / 1000
            expires = fetched_at + int(d["l"]) / 1000
            return cls(
                access_token=str(d["t"]),
                scope=str(d["s"]),
                expires_at=float(d["e"]),
                expires=expires,
                fresh_until=fresh_until,
                refresh_at=fetched_at + int(d["r"]) / 1000,
                fetched_at=fetched_at,
                fingerprint=fp,
                fence=int(fence),
            )
        except (ValueError, KeyError, TypeError, UnicodeDecodeError, RecursionError):
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
        except (ValueError, KeyError, TypeError, RecursionError):
            return None
