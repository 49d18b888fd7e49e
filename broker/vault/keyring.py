"""Encryption at rest (spec §6.1): AES-256-GCM keys by id, the first encrypts, all decrypt.

Keys come as `kid:key[,kid:key…]`, `key` being 32 random bytes in base64 (standard or URL-safe
alphabet, padding optional), from `BROKER_ENCRYPTION_KEYS` or `[vault] encryption_keys_file`.

    sealed = "<kid>.<base64url(nonce ‖ ciphertext ‖ tag)>"     nonce: 96 random bits per value

The associated data binds a value to where it lives (the Redis key) and to every cleartext field
stored beside it, so a value copied to another key, or an edited expiry, does not decrypt.
Fingerprints (of tokens, secrets) are HMAC-SHA256 under a key derived from the encryption key
(HKDF), never bare hashes: a fingerprint in a log line cannot be checked against a guessed token.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
import secrets

import structlog
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

__all__ = ["KeyRing", "KeyRingError", "new_key"]

log = structlog.get_logger("broker.vault")

_KID = re.compile(r"[A-Za-z0-9_\-]{1,32}")
_NONCE_BYTES = 12
_FINGERPRINT_INFO = b"token-broker fingerprint v1"
_FINGERPRINT_HEX = 16


class KeyRingError(ValueError):
    """The key list is malformed; the message says what is wrong and never shows a key."""


def _key_bytes(kid: str, text: str) -> bytes:
    cleaned = text.strip()
    padded = cleaned + "=" * (-len(cleaned) % 4)
    try:
        raw = base64.b64decode(padded.replace("-", "+").replace("_", "/"), validate=True)
    except (binascii.Error, ValueError):
        raise KeyRingError(f"key {kid!r} is not base64") from None
    if len(raw) != 32:
        raise KeyRingError(f"key {kid!r} is {len(raw)} bytes; AES-256 needs 32 (e.g. `openssl rand -base64 32`)")
    return raw


def new_key() -> str:
    """A fresh key in the format `kid:key` expects (for `dev` and for operators)."""
    return base64.b64encode(os.urandom(32)).decode("ascii")


class KeyRing:
    def __init__(self, keys: list[tuple[str, bytes]]) -> None:
        if not keys:
            raise KeyRingError("no encryption key given")
        self.kids = [kid for kid, _ in keys]
        if len(set(self.kids)) != len(self.kids):
            raise KeyRingError("a key id appears twice")
        self._aead = {kid: AESGCM(raw) for kid, raw in keys}
        self._fingerprint_keys = [self._derive(raw) for _, raw in keys]
        self.primary = self.kids[0]
        self._warned: set[str] = set()

    @classmethod
    def parse(cls, text: str) -> KeyRing:
        keys: list[tuple[str, bytes]] = []
        for raw_item in text.replace("\n", ",").split(","):
            item = raw_item.strip()
            if not item or item.startswith("#"):
                continue
            kid, sep, key = item.partition(":")
            if not sep or not _KID.fullmatch(kid.strip()):
                raise KeyRingError("each key must be `kid:base64key`, kid being 1-32 letters, digits, '_' or '-'")
            keys.append((kid.strip(), _key_bytes(kid.strip(), key)))
        return cls(keys)

    @classmethod
    def ephemeral(cls) -> KeyRing:
        return cls([("dev", secrets.token_bytes(32))])

    def __repr__(self) -> str:
        return f"KeyRing(kids={self.kids!r})"

    @staticmethod
    def _derive(raw: bytes) -> bytes:
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_FINGERPRINT_INFO).derive(raw)

    # -- values -----------------------------------------------------------------------------------

    def seal(self, plaintext: bytes, aad: bytes) -> str:
        nonce = os.urandom(_NONCE_BYTES)
        sealed = self._aead[self.primary].encrypt(nonce, plaintext, aad)
        return f"{self.primary}.{base64.urlsafe_b64encode(nonce + sealed).decode('ascii')}"

    def open(self, sealed: str, aad: bytes) -> bytes | None:
        """The plaintext, or None: unknown key id, tampered value, wrong place (logged once per kid)."""
        kid, _, body = sealed.partition(".")
        aead = self._aead.get(kid)
        if aead is None:
            self._warn(kid, "unknown key id")
            return None
        try:
            raw = base64.urlsafe_b64decode(body)
            return aead.decrypt(raw[:_NONCE_BYTES], raw[_NONCE_BYTES:], aad)
        except (InvalidTag, binascii.Error, ValueError):
            self._warn(kid, "does not decrypt (tampered, moved or truncated)")
            return None

    def needs_rewrap(self, sealed: str) -> bool:
        return not sealed.startswith(f"{self.primary}.")

    def _warn(self, kid: str, reason: str) -> None:
        if kid not in self._warned:
            self._warned.add(kid)
            log.warning("vault.undecryptable_value", kid=kid[:32], reason=reason, note="treated as a miss")

    # -- fingerprints -----------------------------------------------------------------------------

    def fingerprint(self, value: str) -> str:
        """The fingerprint under the primary key: what is stored, published and logged."""
        return self._hmac(self._fingerprint_keys[0], value)

    def fingerprints(self, value: str) -> list[str]:
        """The value's fingerprint under every key: during a key rotation, another worker may
        have stored one made under a key that is not our primary."""
        return [self._hmac(key, value) for key in self._fingerprint_keys]

    @staticmethod
    def _hmac(key: bytes, value: str) -> str:
        return hmac.new(key, value.encode(), hashlib.sha256).hexdigest()[:_FINGERPRINT_HEX]
