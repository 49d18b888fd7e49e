"""Client secret rotation (spec §6.5): which of a credential's `client_secrets` to send.

The first, unless the authorization server refused it with `invalid_client` and a later one
worked: from then on the one that works, remembered in Redis for the whole fleet, so one refusal
tells every worker of every replica. The memory is keyed by the fingerprints of the list as it
is now: a changed list (reordered, a secret added or removed, a secret file rewritten) starts
again from the first. Redis unreachable: each worker remembers for itself.

    plan ──▶ the remembered secret, else the first
         ──invalid_client──▶ each other one, first to last (never after a timeout, 5xx, …)
         ──a token──▶ remember it (TTL a day, renewed while a fallback is in use), the metric;
                      one log line when a refusal started or ended a fallback
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import structlog

from broker.errors import StoreBusy, StoreUnavailable
from broker.metrics import client_secret_in_use
from broker.secret import Secret
from broker.vault.models import CredentialSettings

__all__ = ["SecretPlan", "SecretRotation", "WorkingSecrets"]

log = structlog.get_logger("broker.upstream")


class WorkingSecrets(Protocol):
    """Where the fleet remembers the secret that works (broker.store.Store)."""

    async def get_working_secret(self, credential: str, secrets_id: str) -> str | None: ...

    async def put_working_secret(self, credential: str, secrets_id: str, fingerprint: str) -> None: ...


@dataclass
class SecretPlan:
    """The secrets of one token request, in the order to try them, as they were when it began
    (a file secret that changes meanwhile is used from the next request on)."""

    secrets: tuple[Secret, ...]
    order: list[int]
    fingerprints: list[str] = field(default_factory=list)
    secrets_id: str = ""
    remembered: int | None = None  # the position the memory named
    refused: list[int] = field(default_factory=list)
    _at: int = 0

    @property
    def index(self) -> int:
        """The position in client_secrets of the secret to send now."""
        return self.order[self._at]

    @property
    def secret(self) -> Secret | None:
        """The secret to send now; None for a keyless credential (private_key_jwt, tls_client_auth)."""
        return self.secrets[self.index] if self.secrets else None

    @property
    def rotating(self) -> bool:
        return len(self.secrets) > 1

    def fall_back(self) -> bool:
        """The current secret was refused with invalid_client: move on to the next, if any."""
        if self._at + 1 >= len(self.order):
            return False
        self.refused.append(self.index)
        self._at += 1
        return True


class SecretRotation:
    def __init__(self, store: WorkingSecrets | None, fingerprint: Callable[[str], str]) -> None:
        self.store = store
        self.fingerprint = fingerprint
        self._local: dict[str, tuple[str, str]] = {}  # credential → (secrets_id, fingerprint)

    def forget(self, credentials: set[str]) -> None:
        for name in credentials:
            self._local.pop(name, None)

    async def plan(self, credential: CredentialSettings, deadline: float) -> SecretPlan:
        secrets = tuple(Secret(s.reveal(), s.source) for s in credential.client_secrets)
        if len(secrets) <= 1:  # one secret, or none (a keyless method): nothing to rotate
            return SecretPlan(secrets, [0])
        fingerprints = [self.fingerprint(s.reveal()) for s in secrets]
        secrets_id = hashlib.sha256("\n".join(fingerprints).encode()).hexdigest()[:32]
        known = await self._recall(credential.name, secrets_id, deadline)
        remembered = fingerprints.index(known) if known in fingerprints else None
        start = remembered or 0
        order = [start, *(i for i in range(len(secrets)) if i != start)]
        return SecretPlan(secrets, order, fingerprints, secrets_id, remembered=remembered)

    async def _recall(self, credential: str, secrets_id: str, deadline: float) -> str | None:
        known: str | None = None
        if self.store is not None:
            try:
                async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                    known = await self.store.get_working_secret(credential, secrets_id)
            except (StoreUnavailable, StoreBusy, TimeoutError):
                known = None
        if known is None:
            # Redis unreachable, or it never heard of this list (written while it was down).
            local = self._local.get(credential)
            known = local[1] if local is not None and local[0] == secrets_id else None
        return known

    async def worked(self, credential: CredentialSettings, plan: SecretPlan, deadline: float) -> None:
        """A token came back for the plan's current secret: remember it, show it."""
        if not plan.rotating:
            return
        name, index = credential.name, plan.index
        fingerprint = plan.fingerprints[index]
        self._local[name] = (plan.secrets_id, fingerprint)
        client_secret_in_use(name, index)
        if self.store is not None and (index != plan.remembered or index > 0):
            try:
                async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                    await self.store.put_working_secret(name, plan.secrets_id, fingerprint)
            except (StoreUnavailable, StoreBusy, TimeoutError):
                pass  # this worker remembers it; the others find out for themselves
        if not plan.refused:
            return
        refused = [f"client_secrets[{i}]" for i in plan.refused]
        if index > 0:
            log.warning(
                "upstream.client_secret_fallback",
                credential=name,
                using=f"client_secrets[{index}]",
                using_from=plan.secrets[index].source,
                refused=refused,
                note="the authorization server refused the first secret: finish the rotation",
            )
        else:
            log.info(
                "upstream.client_secret_fallback_ended", credential=name, using="client_secrets[0]", refused=refused
            )
