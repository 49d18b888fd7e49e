"""Caller (and admin) authentication and grants (spec §3, §3.6, §6.2).

Keys are random (256 bits), shown once, stored only as SHA-256. A presented key is hashed and
looked up by digest, then compared with `hmac.compare_digest`: the lookup is keyed by a hash
of a 256-bit secret, so its timing reveals nothing usable about any key.

The OAuth facade's clients present a caller name and key (`client_id`, `client_secret`): the key
is looked up the same way and the name must then match, so an unknown name costs exactly what a
wrong key costs (the name is never looked up by itself).

Callers may send a JWT from a trusted issuer instead (spec §6.3): it is told from a key by its
dots, verified by `broker.caller_jwt` (a token verified before costs one SHA-256), and its
subject names the caller (`jwt_subjects`). One entry point, `CallerRegistry.authenticate`, for
the fast path and the middleware alike; `authenticate_async` fetches a key set when needed.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Iterable, Mapping
from typing import Generic, Protocol, TypeVar

from broker.caller_jwt import CallerJWTs, KeysNeeded
from broker.errors import AccessDenied, InsufficientScope, InvalidCallerToken, JWTRefused
from broker.vault.models import CallerIssuerSettings, CallerSettings

__all__ = ["KEY_PREFIX", "CallerRegistry", "KeyIndex", "hash_key", "new_caller_key"]

KEY_PREFIX = "tbk_"
_KEY_SHAPE = re.compile(r"[A-Za-z0-9_\-]{16,256}")


def new_caller_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class _Keyed(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def key_sha256(self) -> str: ...


K = TypeVar("K", bound=_Keyed)


class KeyIndex(Generic[K]):
    """Entries (callers, or admins) found by the SHA-256 of their key."""

    def __init__(self, entries: Iterable[K] | Mapping[str, K], *, what: str = "caller") -> None:
        values = entries.values() if isinstance(entries, Mapping) else entries
        # digest → (entry, its digest, its name in UTF-8): nothing is decoded per request
        self._by_digest: dict[bytes, tuple[K, bytes, bytes]] = {}
        for e in values:
            if e.key_sha256:
                digest = bytes.fromhex(e.key_sha256)
                self._by_digest[digest] = (e, digest, e.name.encode())
        self.what = what
        self._a_key = f"{'an' if what[0] in 'aeiou' else 'a'} {what} key"

    def authenticate(self, authorization: str | None) -> K:
        """The entry named by an `Authorization: Bearer <key>` header, or InvalidCallerToken."""
        if not authorization:
            raise InvalidCallerToken(f"{self._a_key.capitalize()} is required: send Authorization: Bearer <key>.")
        scheme, _, key = authorization.partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not _KEY_SHAPE.fullmatch(key):
            raise InvalidCallerToken(f"The Authorization header must be Bearer followed by {self._a_key}.")
        return self.by_key(key)

    def by_key(self, key: str) -> K:
        digest = hashlib.sha256(key.encode()).digest()
        found = self._by_digest.get(digest)
        if found is None or not hmac.compare_digest(digest, found[1]):
            raise InvalidCallerToken(f"The {self.what} key is not valid.")
        return found[0]


class CallerRegistry(KeyIndex[CallerSettings]):
    """Callers by key hash, and by the subject of their JWTs from the trusted `issuers`."""

    def __init__(
        self,
        entries: Iterable[CallerSettings] | Mapping[str, CallerSettings],
        *,
        issuers: Iterable[CallerIssuerSettings] = (),
        jwts: CallerJWTs | None = None,
    ) -> None:
        callers: list[CallerSettings] = list(entries.values() if isinstance(entries, Mapping) else entries)
        super().__init__(callers)
        self.issuers = {issuer.issuer: issuer for issuer in issuers}  # by `iss`
        self.jwts = jwts or CallerJWTs()
        # (issuer name, sub) → caller; issuer None: the subject from any trusted issuer
        self._by_subject: dict[tuple[str | None, str], CallerSettings] = {
            (s.issuer, s.subject): c for c in callers for s in c.jwt_subjects
        }

    def authenticate(self, authorization: str | None, *, may_fetch: bool = True) -> CallerSettings:
        """The caller of an `Authorization: Bearer <caller key or JWT>` header, or
        InvalidCallerToken; KeysNeeded when only fetching a key set can tell (`authenticate_async`)."""
        if authorization is not None:
            scheme, _, token = authorization.partition(" ")
            token = token.strip()
            if "." in token and scheme.lower() == "bearer":  # a JWT: a caller key has no dot
                digest = hashlib.sha256(token.encode("latin-1")).digest()
                verified = self.jwts.verify(token, digest, self.issuers, may_fetch=may_fetch)
                caller = self._by_subject.get((verified.issuer.name, verified.subject))
                if caller is None:
                    caller = self._by_subject.get((None, verified.subject))
                if caller is None:
                    raise JWTRefused("unknown_subject", issuer=verified.issuer.name, sub=verified.subject[:200])
                return caller
        return super().authenticate(authorization)

    async def authenticate_async(self, authorization: str | None) -> CallerSettings:
        """`authenticate`, fetching the issuer's key set once if that is what it takes."""
        try:
            return self.authenticate(authorization)
        except KeysNeeded as need:
            await self.jwts.fetch(need)
        return self.authenticate(authorization, may_fetch=False)

    def authenticate_client(self, name: str, key: str) -> CallerSettings:
        """The caller `name` if `key` is its caller key (the facade's client_id and client_secret),
        or InvalidCallerToken, with one answer for an unknown name and a wrong key."""
        if _KEY_SHAPE.fullmatch(key):
            digest = hashlib.sha256(key.encode()).digest()
            found = self._by_digest.get(digest)
            if (
                found is not None
                and hmac.compare_digest(digest, found[1])
                and hmac.compare_digest(found[2], name.encode("utf-8", "replace"))
            ):
                return found[0]
        raise InvalidCallerToken(
            "The client credentials are not valid (client_id: a caller name, client_secret: its caller key)."
        )

    @staticmethod
    def granted_scopes(caller: CallerSettings, credential: str) -> frozenset[str]:
        """The scopes `caller` may request of `credential`; AccessDenied without a grant.

        The answer is the same whether or not the credential exists.
        """
        granted = caller.grants.get(credential)
        if granted is None:
            raise AccessDenied()
        return granted

    @staticmethod
    def check_scopes(granted: frozenset[str], requested: tuple[str, ...]) -> None:
        refused = [s for s in requested if s not in granted]
        if refused:
            raise InsufficientScope(refused)
