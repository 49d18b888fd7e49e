"""The live registry of credentials, callers and admins (spec §3.6).

One versioned snapshot, seeded by the config file and changed through the admin API, swapped
atomically: caller authentication, the fast path, the routes and the admin API all read
`registry.snapshot` (never a copy of their own), so a change is seen by the next request.

    config file ──▶ seed ─┐
                          ├──▶ Snapshot(version, credentials, callers, admins, caller issuers) ──▶ every reader
    vault document ──────┘     (the document's version; names unique across both sources)

What outlives a snapshot is the caller JWTs' state (`CallerJWTs`: verified tokens, the issuers'
key sets), which every snapshot's `callers` shares.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal

import structlog

from broker.caller_jwt import CallerJWTs
from broker.callers import CallerRegistry, KeyIndex
from broker.vault.models import AdminSettings, CallerIssuerSettings, CallerSettings, CredentialSettings, Entries

__all__ = ["Registry", "Snapshot", "Source"]

log = structlog.get_logger("broker.vault")

Source = Literal["config", "api"]


@dataclass(frozen=True)
class Snapshot:
    version: int  # of the vault document it includes (0: none yet)
    credentials: Mapping[str, CredentialSettings]
    callers: CallerRegistry
    admins: KeyIndex[AdminSettings]
    caller_entries: Mapping[str, CallerSettings]
    sources: Mapping[str, Source] = field(default_factory=dict)  # "credentials.NAME" → where it came from
    caller_issuers: Mapping[str, CallerIssuerSettings] = field(default_factory=dict)

    @classmethod
    def build(cls, version: int, seed: Entries, api: Entries, jwts: CallerJWTs | None = None) -> Snapshot:
        credentials = {**api.credentials, **seed.credentials}  # the config file wins a name clash
        callers = {**api.callers, **seed.callers}
        issuers = {**api.caller_issuers, **seed.caller_issuers}
        sources: dict[str, Source] = {}
        for kind, config_names, api_names in (
            ("credentials", seed.credentials, api.credentials),
            ("callers", seed.callers, api.callers),
            ("caller_issuers", seed.caller_issuers, api.caller_issuers),
        ):
            sources.update({f"{kind}.{name}": "api" for name in api_names})
            sources.update({f"{kind}.{name}": "config" for name in config_names})
        return cls(
            version=version,
            credentials=credentials,
            callers=CallerRegistry(callers.values(), issuers=issuers.values(), jwts=jwts),
            admins=KeyIndex(seed.admins.values(), what="admin"),
            caller_entries=callers,
            sources=sources,
            caller_issuers=issuers,
        )

    def source(self, kind: str, name: str) -> Source | None:
        return self.sources.get(f"{kind}.{name}")


class Registry:
    """Holds the current snapshot; `apply` swaps in a new one and tells who cares what changed."""

    def __init__(self, seed: Entries, *, jwts: CallerJWTs | None = None) -> None:
        self.seed = seed
        self.jwts = jwts or CallerJWTs()
        self.snapshot = Snapshot.build(0, seed, Entries({}, {}, {}), self.jwts)
        self._listeners: list[Callable[[set[str]], None]] = []

    def on_credentials_changed(self, listener: Callable[[set[str]], None]) -> None:
        """`listener(names)` after every swap that added, changed or removed credentials."""
        self._listeners.append(listener)

    def forget_listeners(self) -> None:
        self._listeners.clear()

    def apply(self, version: int, api: Entries) -> set[str]:
        before = self.snapshot
        after = Snapshot.build(version, self.seed, api, self.jwts)
        self.snapshot = after  # one assignment: readers see the old snapshot or the new one
        changed = {
            name
            for name in before.credentials.keys() | after.credentials.keys()
            if before.credentials.get(name) != after.credentials.get(name)
        }
        if changed or (before.caller_entries, before.caller_issuers) != (after.caller_entries, after.caller_issuers):
            log.info("vault.applied", version=version, credentials_changed=sorted(changed))
        if changed:
            for listener in self._listeners:
                listener(changed)
        return changed
