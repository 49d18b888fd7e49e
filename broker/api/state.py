"""What the lifespan opens and every request shares: typed, no module globals."""

from __future__ import annotations

from dataclasses import dataclass

from broker.audit import AuditTrail
from broker.clock import Clock
from broker.jwks import SigningKeys
from broker.logins import Logins
from broker.ratelimit import RateLimiter
from broker.settings import Settings
from broker.store import Store
from broker.tokens import TokenService
from broker.vault.models import CredentialSettings
from broker.vault.registry import Registry
from broker.vault.sync import VaultSync

__all__ = ["Broker", "Health"]


@dataclass
class Health:
    redis_seen: bool = False  # Redis has answered at least once since start


@dataclass
class Broker:
    settings: Settings  # the static config; credentials and callers: `registry.snapshot`
    registry: Registry
    vault: VaultSync
    tokens: TokenService
    store: Store
    health: Health
    clock: Clock
    audit: AuditTrail
    keys: SigningKeys  # the upstreams' JWK Sets, for the OAuth facade
    limiter: RateLimiter  # per-caller rate limits (spec §6.6)
    logins: Logins  # users who log in (spec §5)

    def credential(self, name: str) -> CredentialSettings | None:
        """The one place the API reads a credential by name: the live registry's snapshot."""
        return self.registry.snapshot.credentials.get(name)
