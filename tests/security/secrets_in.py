"""What "a secret in clear" means for these tests: the value itself, or any base64 form of it.

A secret inside a larger base64 text (a Basic header, a sealed value) shows up as a run of
characters that depends on where it starts modulo 3 bytes: `encoded_forms` gives, for each of
the three offsets and both alphabets, the run that is fixed by the secret alone.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterable, Mapping

import redis

__all__ = ["bare_fingerprint", "encoded_forms", "find_secrets", "redis_contents"]


def encoded_forms(secret: str | bytes) -> set[bytes]:
    raw = secret.encode() if isinstance(secret, str) else secret
    forms = {raw}
    for offset in range(3):
        encoded = base64.b64encode(b"\0" * offset + raw)
        start = -(-8 * offset // 6)  # the first character made of the secret's bits only
        end = 8 * (offset + len(raw)) // 6
        run = encoded[start:end]
        if len(run) >= 8:  # shorter runs would match random base64 by chance
            forms.add(run)
            forms.add(run.replace(b"+", b"-").replace(b"/", b"_"))
    return forms


def bare_fingerprint(value: str) -> str:
    """What a fingerprint would be without a key (spec §6.1 wants HMACs instead)."""
    return hashlib.sha256(value.encode()).hexdigest()[:16]


def find_secrets(blobs: Mapping[str, bytes], secrets: Mapping[str, Iterable[str | bytes]]) -> list[str]:
    """'<kind> in <where>' for every secret (or base64 form of one) found in a blob."""
    found = []
    for kind, values in secrets.items():
        for value in values:
            forms = encoded_forms(value)
            for where, blob in blobs.items():
                if any(form in blob for form in forms):
                    found.append(f"{kind} {value[:6]!r}… in {where}")
    return found


def redis_contents(url: str) -> dict[str, bytes]:
    """Every key of the database → its name and value (every member, for non-string types)."""
    contents: dict[str, bytes] = {}
    with redis.Redis.from_url(url) as client:
        for name in client.scan_iter(count=1000):
            kind = client.type(name).decode()
            if kind == "string":
                value = client.get(name) or b""
            elif kind == "hash":
                value = b"\n".join(k + b"=" + v for k, v in client.hgetall(name).items())
            elif kind == "list":
                value = b"\n".join(client.lrange(name, 0, -1))
            elif kind == "set":
                value = b"\n".join(client.smembers(name))
            elif kind == "zset":
                value = b"\n".join(client.zrange(name, 0, -1))
            elif kind == "stream":
                value = repr(client.xrange(name)).encode()
            else:
                value = b""  # expired between SCAN and TYPE
            contents[name.decode()] = name + b"\n" + value
    return contents
