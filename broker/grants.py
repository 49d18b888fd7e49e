"""How a token is fetched: the grant strategies of the one token path (spec §4, §5.4).

    client credentials ─▶ POST grant_type=client_credentials (retried while transient)
    a subject's grant  ─▶ spend its refresh token, under the fetch lock, rotation-safe:

        read the grant ─▶ mark it "pending" (CAS on its version, only while our lock holds)
            ─▶ POST grant_type=refresh_token ─▶ write the rotated refresh token (CAS) ─▶ token
        "pending" under another scope set's lock, still held: that refresh is out; wait for it, read again
        invalid_grant: re-read; another process rotated it → adopt its token; else the grant is dead
        answer lost (maybe spent): stays "pending"; the next try retries within
            rotation_grace_seconds of the first sending, else the grant is dead (reauthorization_required)

So no two processes ever send the same refresh token (the authorization server would revoke
the whole grant, RFC 9700 §4.14), and the rotated refresh token is in Redis before the access
token it came with is handed out.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Protocol

import structlog

from broker.clock import Clock, SystemClock
from broker.errors import ReauthorizationRequired, UpstreamRejected, UpstreamUnavailable
from broker.store import Lock, Store, TokenKeys
from broker.upstream.client import UpstreamClient
from broker.upstream.response import FetchedToken
from broker.upstream.users import UserGrants
from broker.vault.models import CredentialSettings

__all__ = ["GRANT_TTL", "AdoptStored", "ClientCredentials", "Grant", "SubjectRefresh"]

log = structlog.get_logger("broker.grants")

GRANT_TTL = 90 * 24 * 3600.0  # a subject's grant record, renewed on every refresh and login
_WAIT_FIRST, _WAIT_MAX = 0.05, 0.5  # polling a refresh of the same grant under another scope set's lock


class AdoptStored(Exception):
    """Another process rotated the grant first: the token it stored is the one to use."""


class Grant(Protocol):
    # Redis unreachable: refuse rather than fetch without the fleet's lock (a refresh token
    # spent twice revokes the user's grant); client credentials fetch anyway (spec §4.3).
    fail_closed: bool

    async def fetch(
        self, credential: CredentialSettings, scope_set: str, keys: TokenKeys, deadline: float, lock: Lock | None
    ) -> FetchedToken: ...


class ClientCredentials:
    fail_closed = False

    def __init__(self, upstream: UpstreamClient) -> None:
        self.upstream = upstream

    async def fetch(
        self, credential: CredentialSettings, scope_set: str, keys: TokenKeys, deadline: float, lock: Lock | None
    ) -> FetchedToken:
        return await self.upstream.fetch(credential, scope_set, deadline)


class SubjectRefresh:
    fail_closed = True

    def __init__(self, upstream: UpstreamClient, store: Store, clock: Clock | None = None) -> None:
        self.users = UserGrants(upstream)
        self.store = store
        self.clock = clock or SystemClock()

    async def fetch(
        self, credential: CredentialSettings, scope_set: str, keys: TokenKeys, deadline: float, lock: Lock | None
    ) -> FetchedToken:
        if lock is None:  # never: fail_closed keeps unlocked fetches away
            raise UpstreamUnavailable("A user's refresh token is spent only under the fleet's lock.", retry_after=1)
        while True:
            version, record = await self._settled(keys, deadline)
            pending_since = self.clock.now()
            if record.get("status") == "pending":
                pending_since = float(record.get("pending_since", 0))
                if self.clock.now() - pending_since > credential.rotation_grace_seconds:
                    # An earlier refresh was sent and its answer never came back: the refresh token
                    # may be spent. Sending it again could revoke the whole grant; stop here.
                    await self._mark_dead(keys, version, record, "a refresh answer was lost", lock)
                    raise ReauthorizationRequired(
                        "A refresh of this user's token was lost on its way back: they must log in again."
                    )
                # A retry within the grace keeps the first sending time: the server's grace runs from
                # the first use of this refresh token, however many answers were lost since.
            # The holder's lock in the record: a refresh of another scope set (another lock) that
            # finds it still held waits for it instead of taking it for a lost answer.
            pending = {
                **record,
                "status": "pending",
                "pending_since": pending_since,
                "pending_lock": [lock.key, lock.value],
            }
            written = await self.store.put_grant(keys, version, pending, GRANT_TTL, lock)
            if written == -1:
                raise UpstreamUnavailable("The fetch lock was lost before the refresh token was spent.", retry_after=1)
            if written == 1:
                break
            # 0: changed since we read it (a new login, another scope set's refresh): read it again
            if time.monotonic() >= deadline:
                raise UpstreamUnavailable("This user's grant kept changing: try again.", retry_after=1)
        version += 1
        try:
            fetched = await self.users.refresh(credential, str(record["refresh_token"]), scope_set, deadline)
        except UpstreamRejected as exc:
            if exc.upstream_error != "invalid_grant":
                await self.store.put_grant(keys, version, record, GRANT_TTL, lock)  # nothing was spent
                raise
            now_version, _ = await self.store.get_grant(keys)
            if now_version != version:
                raise AdoptStored from exc  # a lost race, not a dead grant
            await self._mark_dead(keys, version, record, "invalid_grant", lock)
            raise ReauthorizationRequired(
                "The authorization server no longer accepts this user's grant: they must log in again."
            ) from exc
        except UpstreamUnavailable as exc:
            if not exc.maybe_sent:
                await self.store.put_grant(keys, version, record, GRANT_TTL, lock)  # it never left
            raise  # maybe spent: "pending" stays, the next try decides (rotation_grace_seconds)
        rotated = {
            **record,
            "status": "active",
            "refresh_token": fetched.refresh_token or record["refresh_token"],  # absent: the old one stays
            "refreshed_at": self.clock.now(),
        }
        rotated.pop("pending_since", None)
        rotated.pop("pending_lock", None)
        if await self.store.put_grant(keys, version, rotated, GRANT_TTL, lock) != 1:
            # The rotated refresh token cannot be kept: its access token must not go out either.
            raise ReauthorizationRequired("This user's grant changed while it was being refreshed: log in again.")
        return fetched

    async def _settled(self, keys: TokenKeys, deadline: float) -> tuple[int, dict[str, Any]]:
        """(version, the grant record) once no refresh of it is out under another live lock: the
        fetch lock is per scope set, the grant per subject, and a refresh of one scope set must not
        take the refresh of another, still at work, for one whose answer was lost."""
        delay = _WAIT_FIRST
        while True:
            version, record = await self.store.get_grant(keys)
            if record is None or record.get("status") == "reauth" or not record.get("refresh_token"):
                raise ReauthorizationRequired("This user's grant is gone: they must log in again.")
            holder = record.get("pending_lock")
            if (
                record.get("status") != "pending"
                or not isinstance(holder, list)
                or len(holder) != 2
                or holder[0] == keys.lock  # our own lock's key: we hold it now, its earlier holder is gone
                or not await self.store.lock_is_held(str(holder[0]), str(holder[1]))
            ):
                return version, record
            if time.monotonic() + delay >= deadline:
                raise UpstreamUnavailable(
                    "This user's token is being refreshed for another scope set: try again.", retry_after=1
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, _WAIT_MAX)

    async def _mark_dead(self, keys: TokenKeys, version: int, record: dict[str, Any], reason: str, lock: Lock) -> None:
        log.warning("grants.reauthorization_required", reason=reason)
        dead = {**record, "status": "reauth", "refresh_token": None, "reason": reason}
        await self.store.put_grant(keys, version, dead, GRANT_TTL, lock)
